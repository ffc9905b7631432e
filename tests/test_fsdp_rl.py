"""FSDP2 (train.parallel=fsdp) in the online RL stage, on two gloo ranks on CPU: the update of one
scored rollout equals one rank's, and the engine then samples from the updated weights (gathered
once per rollout); whole runs (PPO with a value head, and with a critic from the reward model over
k = 2 samples per prompt) equal two DDP ranks' metrics and weights; a run killed in step 3 resumes
from its sharded checkpoint to the uninterrupted result; the export loads in plain transformers.
Every two-rank run shares one start of the two processes (the ``runs`` fixture)."""

import copy
import json

import pytest
import torch

from helpers import (
    end_rank,
    free_port,
    join_gloo_env,
    letter_reward,
    letter_tokens,
    max_param_diff,
    model_weights,
    ppo_cfg,
)
from preflab import distributed, models, rl_update, scoring
from preflab.config import RLConfig
from preflab.errors import ConfigError
from preflab.rollout import GatheredGenerator, HFGenerator, encode_prompts
from preflab.stages import rl as rl_stage
from test_ppo import _scored_batch, _update

FIELDS = ("mask", "logprobs", "ref_logprobs", "values", "scores", "kl", "rewards", "non_score_reward",
          "advantages", "returns")
KEYS = ("objective/score", "objective/kl", "objective/entropy", "loss/policy", "loss/value", "policy/approxkl",
        "policy/ratio", "response/length_mean", "advantage/mean", "return/mean")


class Stop(Exception):
    """Raised in place of an update: a run killed in the middle of that step."""


def _prompts():
    from preflab.data.chat import read_prompts

    tok = models.load_tokenizer("tiny:")
    return encode_prompts(tok, [r["prompt"] for r in read_prompts("builtin:prompts")[:8]])


def _sample(gen):
    torch.manual_seed(123)
    return gen.generate(_prompts(), max_new_tokens=8, temperature=1.0).response


def _update_job(rank, blob_path):
    """Two FSDP ranks update on 4 rollouts each; then both sample (the gathered weights)."""
    blob = torch.load(blob_path, weights_only=False)
    half = list(range(rank * 4, rank * 4 + 4))
    b = blob["batch"]
    part = rl_update.Scored(b.samples.select(half), *(getattr(b, f)[half] for f in FIELDS))
    ac = blob["ac"]
    dist = distributed.init(torch.device("cpu"))
    gen = GatheredGenerator(distributed.FullCopy(ac.policy), models.load_tokenizer("tiny:"))
    # The reference, sharded as the RL stage shards it: its logits are the whole model's.
    ref = copy.deepcopy(ac.policy).eval().requires_grad_(False)
    layers = sum(p.numel() for layer in distributed.decoder_layers(ref) for p in layer.parameters())
    with torch.no_grad():
        whole = scoring.response_logits(ref, part.samples, 0.7)
        distributed.shard_frozen(ref)
        sharded = scoring.response_logits(ref, part.samples, 0.7)
    local = sum(p.to_local().numel() for p in ref.parameters() if hasattr(p, "to_local"))
    assert sum(p.numel() for layer in distributed.decoder_layers(ref) for p in layer.parameters()) == layers
    distributed.wrap(ac, "fsdp", bf16=False)
    assert distributed.is_sharded(ac)
    before = _sample(gen)
    before_bf16 = _sample(GatheredGenerator(gen.full, gen.tokenizer, bf16=True))
    # test_ppo._update's optimizer and schedule, on the sharded parameters (no DDP around them)
    opt = torch.optim.AdamW([p for p in ac.parameters() if p.requires_grad], lr=1e-3, eps=1e-5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    rl_update.ppo_update(ac, part, optimizer=opt, scheduler=sched, cfg=blob["cfg"], device=torch.device("cpu"),
                         ptx_batches=None, generator=torch.Generator().manual_seed(0), dist=dist)
    after = _sample(gen)
    state = distributed.full_state_dict(ac)
    if rank == 0:
        torch.save({"state": state, "before": before, "before_bf16": before_bf16, "after": after,
                    "gathers": gen.full.gathers, "whole_copies": gen.whole_copies,
                    "reference": (torch.equal(whole, sharded), local, layers)}, blob_path + ".out")


def _worker(rank, world, port, jobs):
    join_gloo_env(rank, world, port)
    good = letter_tokens()
    real = rl_stage.ppo_update
    for kind, arg, resume, stop_at in jobs:
        if kind == "update":
            _update_job(rank, arg)
            continue
        def dying(*a, calls={"n": 0}, stop_at=stop_at, **k):  # noqa: B006 (a fresh count per job)
            calls["n"] += 1
            if calls["n"] == stop_at:
                raise Stop
            return real(*a, **k)

        rl_stage.ppo_update = dying
        try:
            rl_stage.train(RLConfig.model_validate_json(arg), resume=resume, reward_fn=letter_reward(good))
        except Stop:
            pass
        rl_stage.ppo_update = real
    end_rank()


LORA = ["models.policy.lora.enabled=true", "models.policy.lora.r=4", "models.policy.lora.alpha=8"]
CRITIC = ["models.critic=reward_model", "rollout.samples_per_prompt=2", "rollout.batch_size=4"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """3 RL steps of 4 prompts per rank (the tiny config, 2 PPO epochs of 2 minibatches) on two FSDP
    ranks and on two DDP ranks; the FSDP run checkpointed every step, killed in step 3 and resumed;
    the same with the critic a separate model from the reward model (k = 2); and one rollout's
    update with sampling before and after it."""
    root = tmp_path_factory.mktemp("fsdp_rl")
    base = ["rollout.batch_size=4", "ppo.minibatch_size=2"]
    cfgs = {
        "fsdp": ppo_cfg(root / "fsdp", *base, "train.parallel=fsdp"),
        "ddp": ppo_cfg(root / "ddp", *base),
        "cut": ppo_cfg(root / "cut", *base, "train.parallel=fsdp", "train.save_every=1"),
        "critic_fsdp": ppo_cfg(root / "critic_fsdp", *CRITIC, "ppo.minibatch_size=4", "train.parallel=fsdp"),
        "critic_ddp": ppo_cfg(root / "critic_ddp", *CRITIC, "ppo.minibatch_size=4"),
        "lora_fsdp": ppo_cfg(root / "lora_fsdp", *base, *LORA, "train.parallel=fsdp"),
        "lora_ddp": ppo_cfg(root / "lora_ddp", *base, *LORA),
    }
    one = ppo_cfg(root / "update", "rollout.batch_size=8", "ppo.minibatch_size=8", "ppo.epochs=2")
    two = ppo_cfg(root / "update", "rollout.batch_size=4", "ppo.minibatch_size=4", "ppo.epochs=2")
    ac, batch = _scored_batch(one, letter_tokens())
    blob = str(root / "update.pt")
    torch.save({"ac": copy.deepcopy(ac), "batch": batch, "cfg": two}, blob)
    gen = HFGenerator(ac.policy, models.load_tokenizer("tiny:"))
    before = _sample(gen)
    before_bf16 = _sample(HFGenerator(ac.policy, models.load_tokenizer("tiny:"), bf16=True))
    _update(ac, batch, one)
    single = {"state": ac.state_dict(), "before": before, "before_bf16": before_bf16, "after": _sample(gen)}
    jobs = [("update", blob, False, None)]
    for name in ("fsdp", "ddp", "critic_fsdp", "critic_ddp", "lora_fsdp", "lora_ddp"):
        jobs.append(("stage", cfgs[name].model_dump_json(), False, None))
    jobs += [("stage", cfgs["cut"].model_dump_json(), False, 3), ("stage", cfgs["cut"].model_dump_json(), True, None)]
    torch.multiprocessing.spawn(_worker, args=(2, free_port(), jobs), nprocs=2)
    out = {name: root / name for name in cfgs}
    return {**out, "single": single, "update": torch.load(blob + ".out", weights_only=False)}


def rows(run_dir):
    return [json.loads(line) for line in open(run_dir / "metrics.jsonl")]


def test_fsdp_update_equals_one_rank_and_the_engine_samples_the_updated_weights(runs):
    single, fsdp = runs["single"], runs["update"]
    assert max(float((fsdp["state"][k] - v).abs().max()) for k, v in single["state"].items()) < 1e-5
    assert torch.equal(fsdp["before"], single["before"])  # the snapshot of the shards samples as the whole model
    assert torch.equal(fsdp["before_bf16"], single["before_bf16"])  # ... in bf16 too
    assert torch.equal(fsdp["after"], single["after"])  # ... and after the update, the updated weights
    assert not torch.equal(fsdp["after"], fsdp["before"])
    # The engine gathered the weights one at a time into its snapshot: no full copy of the model.
    assert fsdp["gathers"] == fsdp["whole_copies"] == 0
    same, local, layers = fsdp["reference"]  # the sharded reference: half its layers' weights per rank
    assert same and local == layers // 2 > 0


@pytest.mark.parametrize("name", ["fsdp", "critic_fsdp", "lora_fsdp"])
def test_two_fsdp_ranks_equal_two_ddp_ranks(runs, name):
    """Whole runs; lora_fsdp: LoRA adapters on the policy (sampled through a gathered full copy, as
    the engine does not snapshot sharded LoRA layers; merged in the export)."""
    ddp = name.replace("fsdp", "ddp")
    got, ref = rows(runs[name]), rows(runs[ddp])
    assert [r["step"] for r in got] == [r["step"] for r in ref] == [1, 2, 3]
    for key in KEYS:
        assert [r[key] for r in got] == pytest.approx([r[key] for r in ref], abs=1e-5), key
    w = model_weights(runs[name] / "model")
    assert max_param_diff(w, model_weights(runs[ddp] / "model")) < 1e-5
    assert max_param_diff(w, model_weights(models.resolve("tiny:"))) > 1e-4  # it trained
    if name == "critic_fsdp":
        assert max_param_diff(model_weights(runs[name] / "critic"), model_weights(runs[ddp] / "critic")) < 1e-5
    if name == "lora_fsdp":  # adapters trained, merged in the export
        assert json.loads((runs[name] / "manifest.json").read_text())["config"]["models"]["policy"]["lora"]["enabled"]
        assert not any("lora" in k for k in w)


def test_rl_checkpoint_is_sharded_and_the_export_loads(runs):
    ckpt = sorted((runs["fsdp"] / "checkpoints").iterdir())[-1] / "sharded"
    assert sorted(p.name for p in ckpt.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    loaded = AutoModelForCausalLM.from_pretrained(runs["fsdp"] / "model")
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()  # still tied
    assert AutoModelForSequenceClassification.from_pretrained(runs["critic_fsdp"] / "critic") is not None


def test_sharded_rl_checkpoint_resumes_to_the_uninterrupted_run(runs):
    full, cut = rows(runs["fsdp"]), rows(runs["cut"])
    assert [r["step"] for r in cut] == [1, 2, 3]
    for key in KEYS:
        assert [r[key] for r in cut] == pytest.approx([r[key] for r in full], abs=1e-6), key
    assert max_param_diff(model_weights(runs["fsdp"] / "model"), model_weights(runs["cut"] / "model")) < 1e-6
    assert "resumed at step 2" in (runs["cut"] / "log.txt").read_text()


@pytest.mark.parametrize("override", ["select.every=1", "ptx.coef=0.5", "rollout.backend=vllm"])
def test_unsupported_under_fsdp_is_refused(tmp_path, override):
    cfg = ppo_cfg(tmp_path, "train.parallel=fsdp", override)
    with pytest.raises(ConfigError, match="train.parallel=fsdp"):
        rl_stage.refuse_under_fsdp(cfg)


def test_prefix_sharing_is_off_only_with_gradients_through_sharded_layers():
    assert not scoring._fsdp_layers(models.load_policy("tiny:").get_decoder())
