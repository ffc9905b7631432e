"""FSDP2 (train.parallel=fsdp) on two gloo ranks on CPU: the same losses and weights as one rank and
as DDP, a sharded checkpoint that resumes to the uninterrupted result, and an export that plain
transformers loads; for SFT, the reward model and DPO. Every two-rank run of the module shares one
start of the two processes (the ``runs`` fixture). Two torchrun launches joined by a c10d
rendezvous (two "machines") give the single launch's result."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import end_rank, free_port, join_gloo_env, max_param_diff, model_weights, write_demos
from preflab import distributed, loop, models
from preflab.config import DPOConfig, RMConfig, SFTConfig, load_config
from preflab.lm import TokenNLL
from preflab.stages import dpo, reward, sft
from test_dpo import dpo_cfg
from test_dpo import write_demos as write_dpo_demos
from test_dpo import write_mixed as write_dpo_rankings
from test_reward import EXACT, rm_cfg, write_mixed

STAGES = {"sft": (sft.train, SFTConfig), "rm": (reward.train, RMConfig), "dpo": (dpo.train, DPOConfig)}


def sft_cfg(tmp_path, *overrides):
    tmp_path.mkdir(parents=True, exist_ok=True)
    demos = write_demos(tmp_path / "demos.jsonl", 16)
    base = ["model.path=tiny:", f"data.train={demos}", "data.val_fraction=0", "data.max_length=96",
            "optim.lr=1e-3", "optim.warmup_steps=0", "optim.schedule=constant", "train.bf16=false",
            "run.progress=false", f"run.out={tmp_path / 'run'}"]
    return load_config(SFTConfig, None, base + list(overrides))


class Stop(Exception):
    """Raised in place of an optimizer step: a run killed in the middle of that step."""


def _stop_at_step(step: int | None) -> None:
    calls = {"n": 0}
    real = loop.clip_grad

    def stop(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == step:
            raise Stop
        return real(*args, **kwargs)

    loop.clip_grad = stop


def _worker(rank, world, port, jobs):
    """Run ``jobs`` (stage, config JSON, resume, stop_at) one after the other on this rank."""
    join_gloo_env(rank, world, port)
    real = loop.clip_grad
    for stage, cfg_json, resume, stop_at in jobs:
        train, config = STAGES[stage]
        _stop_at_step(stop_at)  # every rank stops in the same step, before its collectives
        try:
            train(config.model_validate_json(cfg_json), resume=resume)
        except Stop:
            pass
        loop.clip_grad = real
    end_rank()


# 5 held-out demonstrations: 3 on rank 0 (2 batches of 2), 2 on rank 1 (1 batch) under FSDP.
COMMON = ["train.max_steps=4", "optim.schedule=cosine", "optim.warmup_steps=1", "data.val_fraction=0.3",
          "train.eval_every=2"]
# 4 held-out rankings scored every step (and for the RM's normalisation) by the two ranks together.
RM_COMMON = ["train.max_steps=2", "data.val_fraction=0.2", "train.eval_every=1"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """SFT, 4 steps of 8 sequences each: one process (batch 8); two FSDP ranks (2 x 2 accumulated);
    two DDP ranks (batch 4); the FSDP run again, checkpointed every 2 steps, killed in step 4 and
    resumed; one process and two FSDP ranks in bf16. The reward model and DPO, 2 steps of 8
    prompts: one process; two FSDP ranks."""
    root = tmp_path_factory.mktemp("fsdp")
    one = sft_cfg(root / "one", *COMMON, "train.batch_size=8")
    fsdp = sft_cfg(root / "fsdp", *COMMON, "train.batch_size=2", "train.grad_accum=2", "train.parallel=fsdp")
    ddp = sft_cfg(root / "ddp", *COMMON, "train.batch_size=4")
    cut = sft_cfg(root / "cut", *COMMON, "train.batch_size=2", "train.grad_accum=2", "train.parallel=fsdp",
                  "run.save_every=2")
    one_bf16 = sft_cfg(root / "one_bf16", *COMMON, "train.batch_size=8", "train.bf16=true")
    lora = ["model.lora.enabled=true", "model.lora.r=4", "model.lora.alpha=8"]
    lora_one = sft_cfg(root / "lora_one", *COMMON, *lora, "train.batch_size=8")
    lora_fsdp = sft_cfg(root / "lora_fsdp", *COMMON, *lora, "train.batch_size=4", "train.parallel=fsdp")
    fsdp_bf16 = sft_cfg(root / "fsdp_bf16", *COMMON, "train.batch_size=4", "train.parallel=fsdp", "train.bf16=true")
    rankings = write_mixed(root / "rankings.jsonl", n=20)
    dpo_rankings = write_dpo_rankings(root / "dpo_rankings.jsonl", n=20)
    for name in ("rm_one", "rm_fsdp", "dpo_one", "dpo_fsdp", "ptx_one", "ptx_fsdp", "rm_lora_one", "rm_lora_fsdp"):
        (root / name).mkdir()
    rm_one = rm_cfg(root / "rm_one", rankings, *EXACT, *RM_COMMON, "train.batch_prompts=8")
    rm_fsdp = rm_cfg(root / "rm_fsdp", rankings, *EXACT, *RM_COMMON, "train.batch_prompts=4", "train.parallel=fsdp")
    rm_lora_one = rm_cfg(root / "rm_lora_one", rankings, *EXACT, *RM_COMMON, *lora, "train.batch_prompts=8")
    rm_lora_fsdp = rm_cfg(root / "rm_lora_fsdp", rankings, *EXACT, *RM_COMMON, *lora, "train.batch_prompts=4",
                          "train.parallel=fsdp")
    dpo_one = dpo_cfg(root / "dpo_one", dpo_rankings, *EXACT, *RM_COMMON, "train.batch_prompts=8")
    dpo_fsdp = dpo_cfg(root / "dpo_fsdp", dpo_rankings, *EXACT, *RM_COMMON, "train.batch_prompts=4",
                       "train.parallel=fsdp", "eval.kl_prompts=2")
    ptx = [f"data.ptx={write_dpo_demos(root / 'dpo_demos.jsonl')}", "dpo.ptx_coef=1.0"]
    ptx_one = dpo_cfg(root / "ptx_one", dpo_rankings, *EXACT, *RM_COMMON, *ptx, "train.batch_prompts=8")
    ptx_fsdp = dpo_cfg(root / "ptx_fsdp", dpo_rankings, *EXACT, *RM_COMMON, *ptx, "train.batch_prompts=4",
                       "train.parallel=fsdp")
    sft.train(one)
    sft.train(one_bf16)
    sft.train(lora_one)
    reward.train(rm_one)
    reward.train(rm_lora_one)
    dpo.train(dpo_one)
    dpo.train(ptx_one)
    jobs = [("sft", fsdp, False, None), ("sft", ddp, False, None), ("sft", cut, False, 4), ("sft", cut, True, None),
            ("sft", fsdp_bf16, False, None), ("rm", rm_fsdp, False, None), ("dpo", dpo_fsdp, False, None),
            ("dpo", ptx_fsdp, False, None), ("sft", lora_fsdp, False, None), ("rm", rm_lora_fsdp, False, None)]
    jobs = [(stage, cfg.model_dump_json(), resume, stop_at) for stage, cfg, resume, stop_at in jobs]
    torch.multiprocessing.spawn(_worker, args=(2, free_port(), jobs), nprocs=2)
    return {d.name: d / "run" for d in root.iterdir() if d.is_dir()}


def losses(run_dir, key="train/loss"):
    return [(r["step"], r[key]) for r in map(json.loads, open(run_dir / "metrics.jsonl")) if key in r]


def test_decoder_layers_are_the_fsdp_units():
    model = models.load_policy("tiny:")
    layers = distributed.decoder_layers(TokenNLL(model))
    assert layers == list(model.model.layers) and len(layers) == 2


@pytest.mark.parametrize("name", ["fsdp", "ddp"])
def test_two_ranks_equal_one_rank(runs, name):
    """The same losses and weights from one process, two FSDP ranks and two DDP ranks."""
    w_one = model_weights(runs["one"] / "model")
    assert max_param_diff(w_one, model_weights(models.resolve("tiny:"))) > 1e-4  # it trained
    rows, ref = losses(runs[name]), losses(runs["one"])
    assert [s for s, _ in rows] == [s for s, _ in ref] == [1, 2, 3, 4]
    assert [v for _, v in rows] == pytest.approx([v for _, v in ref], abs=1e-5)
    assert max_param_diff(w_one, model_weights(runs[name] / "model")) < 1e-5
    val, val_ref = losses(runs[name], "val/loss"), losses(runs["one"], "val/loss")
    assert [s for s, _ in val] == [s for s, _ in val_ref] == [2, 4, 4]  # eval_every=2, and the final
    assert [v for _, v in val] == pytest.approx([v for _, v in val_ref], abs=1e-5)


def test_lora_two_fsdp_ranks_equal_one_rank(runs):
    """LoRA under FSDP2: the same losses as one process, and an export with the adapters merged into
    plain weights equal to the one-process export (which merged in place)."""
    w_one = model_weights(runs["lora_one"] / "model")
    assert max_param_diff(w_one, model_weights(models.resolve("tiny:"))) > 1e-4  # the merge changed weights
    rows, ref = losses(runs["lora_fsdp"]), losses(runs["lora_one"])
    assert [s for s, _ in rows] == [s for s, _ in ref] == [1, 2, 3, 4]
    assert [v for _, v in rows] == pytest.approx([v for _, v in ref], abs=1e-5)
    w = model_weights(runs["lora_fsdp"] / "model")
    assert set(w) == set(w_one) and not any("lora" in k for k in w)
    assert max_param_diff(w_one, w) < 1e-5


def test_fsdp_checkpoint_is_sharded_and_the_export_loads(runs):
    shards = runs["fsdp"] / "checkpoints/step-000004/sharded"
    assert sorted(p.name for p in shards.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(runs["fsdp"] / "model")
    assert loaded.config.architectures == ["LlamaForCausalLM"]
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()  # still tied
    assert model_weights(runs["fsdp"] / "model").keys() == model_weights(runs["one"] / "model").keys()


def test_sharded_checkpoint_resumes_to_the_uninterrupted_run(runs):
    full_rows, cut_rows = losses(runs["fsdp"]), losses(runs["cut"])
    assert [s for s, _ in cut_rows] == [s for s, _ in full_rows] == [1, 2, 3, 4]
    assert [v for _, v in cut_rows] == pytest.approx([v for _, v in full_rows], abs=1e-6)
    assert max_param_diff(model_weights(runs["fsdp"] / "model"), model_weights(runs["cut"] / "model")) < 1e-6
    manifest = json.loads((runs["cut"] / "manifest.json").read_text())
    assert manifest["status"] == "finished" and manifest["resumed_at"]
    assert "resumed at step 2" in (runs["cut"] / "log.txt").read_text()


def test_bf16_fsdp_is_within_bf16_tolerance_of_one_rank(runs):
    """FSDP's bf16 (bf16 weights in compute, fp32 reduction and master weights) against one process's
    bf16 autocast over fp32 weights: losses within 2e-3, the 4 steps' weight updates within 5%."""
    ref, got = losses(runs["one_bf16"]), losses(runs["fsdp_bf16"])
    assert [v for _, v in got] == pytest.approx([v for _, v in ref], abs=2e-3)
    init = model_weights(models.resolve("tiny:"))

    def update(run):
        w = model_weights(run / "model")
        return torch.cat([(w[k] - init[k]).flatten() for k in sorted(init)])

    one, fsdp = update(runs["one_bf16"]), update(runs["fsdp_bf16"])
    assert float((fsdp - one).norm() / one.norm()) < 0.05


def test_reward_model_two_fsdp_ranks_equal_one_rank(runs):
    """Training (FSDP runs full sequences where one process shares each prompt's keys and values
    among its K responses), held-out scoring by both ranks together, the normalisation and the
    export: as on one process."""
    assert max_param_diff(model_weights(runs["rm_one"] / "model"), model_weights(runs["rm_fsdp"] / "model")) < 1e-5
    one, fsdp = (json.loads((runs[n] / "manifest.json").read_text())["final_metrics"] for n in ("rm_one", "rm_fsdp"))
    for key in ("rm/norm_gain", "rm/norm_bias", "rm/accuracy", "rm/loss"):
        assert fsdp[key] == pytest.approx(one[key], abs=1e-5), key
    rows, ref = losses(runs["rm_fsdp"], "rm/loss"), losses(runs["rm_one"], "rm/loss")
    assert [s for s, _ in rows] == [s for s, _ in ref] == [1, 2]  # eval_every=1, and the final
    assert [v for _, v in rows] == pytest.approx([v for _, v in ref], abs=1e-5)
    from transformers import AutoModelForSequenceClassification

    assert AutoModelForSequenceClassification.from_pretrained(runs["rm_fsdp"] / "model").config.preflab_reward_model


def test_lora_reward_model_two_fsdp_ranks_equal_one_rank(runs):
    """The RM with LoRA adapters and a fully trained score head (peft's modules_to_save) under FSDP2:
    its export, merged from the gathered shards, equals the one-process export."""
    one, fsdp = (model_weights(runs[n] / "model") for n in ("rm_lora_one", "rm_lora_fsdp"))
    assert set(fsdp) == set(one) and not any("lora" in k or "modules_to_save" in k for k in fsdp)
    assert max_param_diff(one, fsdp) < 1e-5
    a, b = (json.loads((runs[n] / "manifest.json").read_text())["final_metrics"] for n in ("rm_lora_one", "rm_lora_fsdp"))
    assert b["rm/loss"] == pytest.approx(a["rm/loss"], abs=1e-5)


def test_dpo_two_fsdp_ranks_equal_one_rank(runs):
    """Training, the held-out preference metrics (both ranks together) and the export as on one
    process; the sampled KL to the reference is skipped under FSDP, and the log says so."""
    assert max_param_diff(model_weights(runs["dpo_one"] / "model"), model_weights(runs["dpo_fsdp"] / "model")) < 1e-5
    for key in ("train/loss", "val/loss", "val/rewards/accuracy"):
        rows, ref = losses(runs["dpo_fsdp"], key), losses(runs["dpo_one"], key)
        assert [s for s, _ in rows] == [s for s, _ in ref] and rows, key
        assert [v for _, v in rows] == pytest.approx([v for _, v in ref], abs=1e-5), key
    assert not losses(runs["dpo_fsdp"], "val/kl")
    assert "no KL to the reference" in (runs["dpo_fsdp"] / "log.txt").read_text()


def test_dpo_with_demonstrations_on_two_fsdp_ranks_equals_one_rank(runs):
    """The SFT-loss term's demonstrations ride the sharded forward pass: the same update as one process."""
    assert max_param_diff(model_weights(runs["ptx_one"] / "model"), model_weights(runs["ptx_fsdp"] / "model")) < 1e-5
    for key in ("train/loss", "train/ptx_nll"):
        rows, ref = losses(runs["ptx_fsdp"], key), losses(runs["ptx_one"], key)
        assert [s for s, _ in rows] == [s for s, _ in ref] and rows, key
        assert [v for _, v in rows] == pytest.approx([v for _, v in ref], abs=1e-5), key


def test_two_launches_joined_by_rendezvous_equal_one_launch(runs, tmp_path):
    """Two "machines" on this one: two ``torchrun --nnodes 2 --nproc_per_node 1`` launches that meet
    at a c10d rendezvous run the fixture's two-rank FSDP SFT run again, to the same losses and
    weights; rank 0 alone writes the run directory, both write their checkpoint shards into it."""
    config = tmp_path / "sft.yaml"
    config.write_text(json.dumps(json.loads((runs["fsdp"] / "manifest.json").read_text())["config"]))
    out = tmp_path / "run"
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--nnodes", "2", "--nproc_per_node", "1", "--rdzv-backend", "c10d",
           "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--rdzv-id", "two-launches",
           "-m", "preflab.cli", "sft", "--config", str(config), f"run.out={out}"]
    launches = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                 env=os.environ | {"OMP_NUM_THREADS": "1"}) for _ in range(2)]
    logs = [p.communicate(timeout=300)[0] for p in launches]
    assert [p.returncode for p in launches] == [0, 0], "\n".join(log[-3000:] for log in logs)
    assert [v for _, v in losses(out)] == pytest.approx([v for _, v in losses(runs["fsdp"])], abs=1e-6)
    assert max_param_diff(model_weights(runs["fsdp"] / "model"), model_weights(out / "model")) < 1e-6
    assert sorted(p.name for p in (out / "checkpoints/step-000004/sharded").iterdir()) == \
        [".metadata", "__0_0.distcp", "__1_0.distcp"]
