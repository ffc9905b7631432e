"""Shared test helpers: tiny configs and demonstration files."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file


def write_demos(path: Path, n: int = 16) -> Path:
    rows = [{"prompt": f"Say the number {i}.", "response": f"The number is {i}."} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def model_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(model_dir) / "model.safetensors"))


def max_param_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def free_port() -> int:
    """A free TCP port on loopback for a gloo rendezvous."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def join_gloo_env(rank: int, world: int, port: int) -> None:
    """The environment torchrun would set for ``rank`` of ``world`` (one thread per rank)."""
    import faulthandler
    import os

    faulthandler.enable(all_threads=True)  # a crashing rank prints where it was
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)


def end_rank() -> None:
    """End a spawned rank the way `preflab <stage>` ends one under torchrun (see
    ``distributed.exit_now``): every result is on disk by now."""
    from preflab import distributed

    torch.distributed.barrier()
    distributed.shutdown()
    distributed.exit_now(0)


# The tiny RL stage's tests (test_ppo.py, test_rl_stage.py) share a config, a programmatic reward
# and the metrics reader.
RL_TINY = "configs/rl_tiny.yaml"


def letter_tokens() -> torch.Tensor:
    """Token ids of the lowercase letters in the tiny tokenizer."""
    from preflab import models

    tok = models.load_tokenizer("tiny:")
    return torch.tensor([tok.convert_tokens_to_ids(c) for c in "abcdefghijklmnopqrstuvwxyz"])


def letter_reward(good):
    """Fraction of response tokens that are lowercase letters (about 10% for the random policy)."""

    def reward(s):
        hit = torch.isin(s.response, good).float() * s.response_mask
        return hit.sum(1) / s.response_mask.sum(1).clamp(min=1)

    return reward


def ppo_cfg(tmp_path, *overrides):
    from preflab.config import RLConfig, load_config

    return load_config(RLConfig, RL_TINY, [f"run.out={tmp_path}", *overrides])


def run_metrics(cfg) -> list[dict]:
    return [json.loads(line) for line in open(Path(cfg.run.out) / "metrics.jsonl")]


def run_cli(args, capsys=None) -> int:
    """``preflab ARGS`` in-process; its exit status (0 when it returns)."""
    from preflab.cli import main

    try:
        main(args)
    except SystemExit as e:
        return e.code or 0
    return 0


def wait_for(cond, timeout: float = 10.0) -> bool:
    """Poll ``cond()`` every 50 ms until it is true (True) or ``timeout`` seconds pass (False)."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return False


def varied_model(seed: int = 0):
    """A tiny random Llama whose greedy continuations vary from token to token (the default tiny
    model's init is so flat that greedy decoding repeats one token, which proves nothing), in eval
    mode, and its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM

    from preflab import models

    tok = models.load_tokenizer("tiny:")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(models.tiny_model_config(len(tok), initializer_range=0.3))
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    return model.eval(), tok
