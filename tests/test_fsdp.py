"""FSDP2 (train.parallel=fsdp) on two gloo ranks on CPU: the same losses and weights as one rank and
as DDP, a sharded checkpoint that resumes to the uninterrupted result, and an export that plain
transformers loads."""

import json

import pytest
import torch

from helpers import end_rank, free_port, join_gloo_env, max_param_diff, model_weights, write_demos
from preflab import distributed, loop, models
from preflab.config import SFTConfig, load_config
from preflab.lm import TokenNLL
from preflab.stages import sft


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
    """Run ``jobs`` (config JSON, resume, stop_at) one after the other on this rank: one start of
    the two processes for every two-rank run of this module."""
    join_gloo_env(rank, world, port)
    real = loop.clip_grad
    for cfg_json, resume, stop_at in jobs:
        _stop_at_step(stop_at)  # every rank stops in the same step, before its collectives
        try:
            sft.train(SFTConfig.model_validate_json(cfg_json), resume=resume)
        except Stop:
            pass
        loop.clip_grad = real
    end_rank()


COMMON = ["train.max_steps=4", "optim.schedule=cosine", "optim.warmup_steps=1"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """4 steps of 8 sequences each: one process (batch 8); two FSDP ranks (2 x 2 accumulated); two
    DDP ranks (batch 4); the FSDP run again, checkpointed every 2 steps, killed in step 4 and
    resumed; and one process and two FSDP ranks in bf16."""
    root = tmp_path_factory.mktemp("fsdp")
    one = sft_cfg(root / "one", *COMMON, "train.batch_size=8")
    fsdp = sft_cfg(root / "fsdp", *COMMON, "train.batch_size=2", "train.grad_accum=2", "train.parallel=fsdp")
    ddp = sft_cfg(root / "ddp", *COMMON, "train.batch_size=4")
    cut = sft_cfg(root / "cut", *COMMON, "train.batch_size=2", "train.grad_accum=2", "train.parallel=fsdp",
                  "run.save_every=2")
    one_bf16 = sft_cfg(root / "one_bf16", *COMMON, "train.batch_size=8", "train.bf16=true")
    fsdp_bf16 = sft_cfg(root / "fsdp_bf16", *COMMON, "train.batch_size=4", "train.parallel=fsdp", "train.bf16=true")
    sft.train(one)
    sft.train(one_bf16)
    jobs = [(c.model_dump_json(), False, None) for c in (fsdp, ddp, cut, fsdp_bf16)]
    jobs[2:3] = [(cut.model_dump_json(), False, 4), (cut.model_dump_json(), True, None)]
    torch.multiprocessing.spawn(_worker, args=(2, free_port(), jobs), nprocs=2)
    return {name: root / name / "run" for name in ("one", "fsdp", "ddp", "cut", "one_bf16", "fsdp_bf16")}


def losses(run_dir):
    return [(r["step"], r["train/loss"]) for r in map(json.loads, open(run_dir / "metrics.jsonl"))
            if "train/loss" in r]


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
