"""SFT on a tiny random model: learning, response-only loss, invariances, resume, atomicity, DDP."""

import json

import pytest
import torch

from helpers import end_rank, free_port, join_gloo_env, max_param_diff, model_weights, write_demos
from preflab import loop, models
from preflab.config import SFTConfig, load_config
from preflab.data.chat import IGNORE, collate, parse_demo, read_demos, tokenize_conversation
from preflab.errors import DataError, ModelError
from preflab.lm import TokenNLL
from preflab.stages import sft


def tiny_cfg(tmp_path, *overrides):
    demos = write_demos(tmp_path / "demos.jsonl", 16)
    base = ["model.path=tiny:", f"data.train={demos}", "data.val_fraction=0", "data.max_length=96",
            "optim.lr=1e-3", "optim.warmup_steps=0", "optim.schedule=constant", "train.bf16=false",
            "run.progress=false", f"run.out={tmp_path / 'run'}"]
    return load_config(SFTConfig, None, base + list(overrides))


def test_loss_drops_on_a_memorisable_batch(tmp_path):
    cfg = tiny_cfg(tmp_path, "train.batch_size=4", "train.max_steps=60", "optim.lr=3e-3")
    sft.train(cfg)
    rows = [r for r in map(json.loads, open(tmp_path / "run/metrics.jsonl")) if "train/loss" in r]
    assert rows[0]["train/loss"] > 4.0
    assert rows[-1]["train/loss"] < 0.5, rows[-1]
    # The saved directory loads in plain transformers.
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / "run/model")


def test_labels_cover_only_the_response():
    tok = models.load_tokenizer("tiny:")
    msgs = parse_demo({"prompt": "Hello there", "response": "General Kenobi"})
    ex = tokenize_conversation(tok, msgs, 512)
    labelled = tok.decode([t for t, lab in zip(ex.input_ids, ex.labels) if lab != IGNORE])
    assert labelled == "General Kenobi<|im_end|>"
    # Same response after a different prompt: identical labelled tokens.
    ex2 = tokenize_conversation(tok, parse_demo({"prompt": "A much longer prompt, really", "response": "General Kenobi"}), 512)
    assert [lab for lab in ex2.labels if lab != IGNORE] == [lab for lab in ex.labels if lab != IGNORE]


def test_prompt_labels_do_not_change_the_loss():
    """TokenNLL counts labelled positions only: the loss equals transformers' mean CE with the
    prompt masked, and rewriting the *ignored* label slots to other ignored values changes nothing."""
    tok = models.load_tokenizer("tiny:")
    model = models.load_policy("tiny:")
    ex = [tokenize_conversation(tok, parse_demo({"prompt": f"p{i} x", "response": f"answer {i}"}), 64) for i in range(3)]
    batch = collate(ex, tok.pad_token_id)
    nll, n = TokenNLL(model)(**batch)
    ref = model(**batch).loss  # transformers shifts and ignores -100 itself
    torch.testing.assert_close(nll / n, ref, rtol=1e-5, atol=1e-6)
    prompt_pos = batch["labels"] == IGNORE
    changed = batch["labels"].clone()
    changed[prompt_pos] = -100
    nll2, n2 = TokenNLL(model)(batch["input_ids"], batch["attention_mask"], changed)
    assert n2 == n and torch.equal(nll2, nll)
    # whereas unmasking the prompt positions does change it
    unmasked = torch.where(batch["attention_mask"].bool(), batch["input_ids"], IGNORE)
    nll3, n3 = TokenNLL(model)(batch["input_ids"], batch["attention_mask"], unmasked)
    assert n3 > n


@pytest.mark.parametrize("groups", [0, 2])
def test_gradient_accumulation_1x8_equals_8x1(tmp_path, groups):
    g = f"train.length_groups={groups}"
    a = tiny_cfg(tmp_path / "a", "train.batch_size=8", "train.grad_accum=1", "train.max_steps=2", g) if (tmp_path / "a").mkdir() is None else None
    b = tiny_cfg(tmp_path / "b", "train.batch_size=1", "train.grad_accum=8", "train.max_steps=2", g) if (tmp_path / "b").mkdir() is None else None
    wa, wb = model_weights(sft.train(a)), model_weights(sft.train(b))
    init = model_weights(models.resolve("tiny:"))
    assert max_param_diff(wa, init) > 1e-4  # it trained
    assert max_param_diff(wa, wb) < 2e-6


def _kill_at_step(monkeypatch, step):
    calls = {"n": 0}
    real = loop.clip_grad

    def boom(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == step:
            raise KeyboardInterrupt("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "clip_grad", boom)


def test_resume_reaches_the_same_parameters_and_metrics(tmp_path, monkeypatch):
    (tmp_path / "full").mkdir()
    (tmp_path / "cut").mkdir()
    full = tiny_cfg(tmp_path / "full", "train.batch_size=4", "train.max_steps=6", "optim.schedule=cosine",
                    "optim.warmup_steps=1")
    w_full = model_weights(sft.train(full))
    cut = tiny_cfg(tmp_path / "cut", "train.batch_size=4", "train.max_steps=6", "optim.schedule=cosine",
                   "optim.warmup_steps=1", "run.save_every=2")
    _kill_at_step(monkeypatch, 5)  # dies inside step 5, after the step-4 checkpoint
    with pytest.raises(KeyboardInterrupt):
        sft.train(cut)
    monkeypatch.undo()
    assert (tmp_path / "cut/run/checkpoints/step-000004").is_dir()
    w_cut = model_weights(sft.train(cut, resume=True))
    assert max_param_diff(w_full, w_cut) < 1e-6

    def losses(d):
        return [(r["step"], r["train/loss"]) for r in map(json.loads, open(d / "run/metrics.jsonl")) if "train/loss" in r]

    full_rows, cut_rows = losses(tmp_path / "full"), losses(tmp_path / "cut")
    assert [s for s, _ in full_rows] == [s for s, _ in cut_rows] == [1, 2, 3, 4, 5, 6]
    assert [v for _, v in full_rows] == pytest.approx([v for _, v in cut_rows], abs=1e-6)
    manifest = json.loads((tmp_path / "cut/run/manifest.json").read_text())
    assert manifest["status"] == "finished" and manifest["resumed_at"]


def test_existing_run_needs_resume(tmp_path):
    cfg = tiny_cfg(tmp_path, "train.batch_size=4", "train.max_steps=1")
    sft.train(cfg)
    from preflab.errors import PreflabError

    with pytest.raises(PreflabError, match="--resume"):
        sft.train(cfg)


def test_interrupted_checkpoint_write_leaves_previous_loadable(tmp_path, monkeypatch):
    from preflab.run import RunDir

    run = RunDir(tmp_path / "r", stage="t", config={}, seed=0)
    run.save_checkpoint(1, {"step": 1, "x": torch.ones(3)})
    real_save = torch.save

    def dying_save(obj, f, *a, **k):
        real_save(obj, f, *a, **k)  # the file is fully written ...
        raise OSError("disk full")  # ... but the process dies before the rename

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(OSError):
        run.save_checkpoint(2, {"step": 2, "x": torch.zeros(3)})
    monkeypatch.undo()
    assert [s for s, _ in run.checkpoints()] == [1]
    assert run.load_checkpoint()["step"] == 1
    assert not [p for p in (tmp_path / "r/checkpoints").iterdir() if p.name.startswith(".tmp")]


def test_malformed_jsonl_names_file_and_line(tmp_path):
    f = tmp_path / "demos.jsonl"
    f.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a"}\n')
    with pytest.raises(DataError, match=r"demos\.jsonl:2: .*response"):
        read_demos(str(f))
    f.write_text('{"prompt": "a", "response": "b"}\n\n{"prompt": "a", "response": }\n')
    with pytest.raises(DataError, match=r"demos\.jsonl:3: invalid JSON"):
        read_demos(str(f))
    f.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    with pytest.raises(DataError, match=r"demos\.jsonl:1: .*last message"):
        read_demos(str(f))


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        models.load_policy(str(tmp_path / "no-such-model"))
    with pytest.raises(ModelError, match="HF_HUB_OFFLINE"):
        models.resolve("someone/some-model")


def test_cli_runs_sft_and_reports_bad_keys(tmp_path, capsys):
    from preflab.cli import main

    demos = write_demos(tmp_path / "d.jsonl", 8)
    with pytest.raises(SystemExit) as e:
        main(["sft", "model.path=tiny:", "optim.lrr=1"])
    assert e.value.code == 2 and "optim.lrr: unknown key" in capsys.readouterr().err
    # A group joined before the command (as under torchrun) is closed when the stage ends.
    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    try:
        main(["sft", "--config", "configs/sft_tiny.yaml", f"data.train={demos}", f"run.out={tmp_path / 'o'}",
              "train.max_steps=1"])
        assert not torch.distributed.is_initialized()
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    assert (tmp_path / "o/model/config.json").is_file()



def _ddp_worker(rank, world, port, cfg_json):
    join_gloo_env(rank, world, port)
    cfg = SFTConfig.model_validate_json(cfg_json)
    sft.train(cfg)
    end_rank()


def test_two_gloo_ranks_equal_one_rank(tmp_path):
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    one = tiny_cfg(tmp_path / "one", "train.batch_size=8", "train.max_steps=3")
    two = tiny_cfg(tmp_path / "two", "train.batch_size=4", "train.max_steps=3")
    w_one = model_weights(sft.train(one))
    torch.multiprocessing.spawn(_ddp_worker, args=(2, free_port(), two.model_dump_json()), nprocs=2)
    w_two = model_weights(tmp_path / "two/run/model")

    def losses(d):
        return [r["train/loss"] for r in map(json.loads, open(d / "run/metrics.jsonl")) if "train/loss" in r]

    assert losses(tmp_path / "one") == pytest.approx(losses(tmp_path / "two"), abs=1e-5)
    assert max_param_diff(w_one, w_two) < 1e-5


def test_torchrun_stage_command_ends_both_ranks_cleanly(tmp_path):
    """`torchrun -m preflab.cli sft` on 2 gloo ranks: exit 0, and what the ranks wrote before they
    left through ``distributed.exit_now`` (no interpreter teardown) is complete on disk."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    demos = write_demos(tmp_path / "d.jsonl", 16)
    torchrun = Path(sys.executable).with_name("torchrun")
    proc = subprocess.run([str(torchrun), "--nproc_per_node", "2", "--master_port", str(free_port()),
                           "-m", "preflab.cli", "sft", "--config", "configs/sft_tiny.yaml", f"data.train={demos}",
                           f"run.out={tmp_path / 'o'}", "train.max_steps=2", "run.progress=false"],
                          capture_output=True, text=True, env=os.environ | {"OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((tmp_path / "o/manifest.json").read_text())
    assert manifest["status"] == "finished"
    assert [r["step"] for r in map(json.loads, open(tmp_path / "o/metrics.jsonl")) if "train/loss" in r] == [1, 2]
    assert models.load_policy(str(tmp_path / "o/model")) is not None


def _scripted_val_losses(monkeypatch, values):
    it = iter(values)
    monkeypatch.setattr(sft, "validation_loss", lambda *a, **k: next(it))


@pytest.mark.parametrize("killed", [False, True])
def test_select_best_exports_the_weights_with_the_lowest_validation_loss(tmp_path, monkeypatch, killed):
    """Val loss 3.0 at step 2, 1.0 at step 4, 2.0 at step 6 (and at the end): step 4's weights are
    exported, also when the run is killed in step 5 and resumed from the step-4 checkpoint."""
    common = ["train.batch_size=4", "data.val_fraction=0.25"]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    cfg = tiny_cfg(tmp_path / "a", *common, "train.max_steps=6", "train.eval_every=2", "train.select_best=true",
                   "run.save_every=2")
    if killed:
        _scripted_val_losses(monkeypatch, [3.0, 1.0])
        _kill_at_step(monkeypatch, 5)
        with pytest.raises(KeyboardInterrupt):
            sft.train(cfg)
        monkeypatch.undo()
        _scripted_val_losses(monkeypatch, [2.0, 2.0])
        out = sft.train(cfg, resume=True)
    else:
        _scripted_val_losses(monkeypatch, [3.0, 1.0, 2.0, 2.0])
        out = sft.train(cfg)
    monkeypatch.undo()
    step4 = sft.train(tiny_cfg(tmp_path / "b", *common, "train.max_steps=4"))
    assert max_param_diff(model_weights(out), model_weights(step4)) < 1e-6
    final = json.loads((tmp_path / "a/run/manifest.json").read_text())["final_metrics"]
    assert final["best/step"] == 4 and final["best/val_loss"] == 1.0
    # Without select_best the last step is exported: the two differ.
    last = model_weights(sft.train(tiny_cfg(tmp_path / "a", *common, "train.max_steps=6", "run.out=" + str(tmp_path / "c"))))
    assert max_param_diff(last, model_weights(step4)) > 1e-4
