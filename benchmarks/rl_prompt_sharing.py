"""RL training step with k samples per prompt: each prompt run once (``scoring.tail_hidden``)
against the full sequences every peer trains on (TRL, OpenRLHF and veRL batch k full copies of a
prompt), in one process, alternating.

Workload: SmolLM2-135M-Instruct, 2 prompts x k = 4 samples per micro-batch (the demo's RLOO
micro-batch of 8), prompt 65 tokens (the demo's mean rendered prompt), response 64 tokens (its
``max_new_tokens``); random ordinary token ids, seed 0. Timed: the policy's log-probs of the
responses under bf16 autocast, then backward (the update's work per micro-batch), and the
no-grad forward alone (the scoring pass). Each path runs ``--steps`` times per round after a
warm-up; rounds alternate full, shared, full, shared; the median over rounds is reported. The
two paths' log-probs are compared in fp32 (equal) and each against fp32 under bf16 autocast.

The peers' way (k full copies of the prompt) is run here as its computation in preflab's model
code, not through a peer library: what is compared is the work, not a framework.

    .venv/bin/python benchmarks/rl_prompt_sharing.py   # JSON in benchmarks/results/rl_prompt_sharing.json
    .venv/bin/python benchmarks/rl_prompt_sharing.py --threads 1 --rounds 2 --steps 2   # brief
    .venv/bin/python benchmarks/rl_prompt_sharing.py --smoke   # tiny random model (seconds)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # common.py, machine.py
import common  # noqa: E402

MODEL = common.BUNDLED
PROMPTS, K, PROMPT_TOKENS, RESPONSE_TOKENS = 2, 4, 65, 64
SMOKE = {"MODEL": common.TINY, "PROMPTS": 1, "K": 2, "PROMPT_TOKENS": 6, "RESPONSE_TOKENS": 4}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3)
    common.add_options(ap)
    a = ap.parse_args()
    if a.smoke:
        globals().update(SMOKE)
        a.rounds, a.steps = 1, 1
    record = common.start(a)

    import torch

    from preflab import models, scoring
    from preflab.rl import selective_log_softmax
    from preflab.rollout import Samples

    threads = common.set_threads(a.threads)
    tok = models.load_tokenizer(MODEL)
    policy = models.load_policy(MODEL, dtype="fp32", device="cpu", dropout_off=True)
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(100, len(tok) - 100, (PROMPTS, PROMPT_TOKENS), generator=g)
    query = prompts.repeat_interleave(K, 0)
    response = torch.randint(100, len(tok) - 100, (PROMPTS * K, RESPONSE_TOKENS), generator=g)
    ones = torch.ones_like
    samples = Samples(query, ones(query), response, ones(response), torch.ones(len(query), dtype=torch.bool), [])
    head = policy.get_output_embeddings()

    def logprobs(shared: bool, bf16: bool = True) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            if shared:
                h = scoring.response_hidden(policy, samples)
            else:
                h = policy.get_decoder()(**samples.inputs(), use_cache=False).last_hidden_state[:, PROMPT_TOKENS - 1:-1]
            return selective_log_softmax(head(h).float(), response)

    def train_step(shared: bool) -> None:
        logprobs(shared).sum().backward()
        policy.zero_grad(set_to_none=True)

    def score_pass(shared: bool) -> None:
        with torch.no_grad():
            logprobs(shared)

    with torch.no_grad():  # the same numbers in fp32; in bf16 each path is as far from fp32 as the other
        exact = logprobs(False, bf16=False)
        diff = {"shared_vs_full_fp32": float((logprobs(True, bf16=False) - exact).abs().max()),
                "full_bf16_vs_fp32": float((logprobs(False) - exact).abs().mean()),
                "shared_bf16_vs_fp32": float((logprobs(True) - exact).abs().mean())}
    times: dict[tuple[str, str], list[float]] = {}
    for _ in range(a.rounds):
        for shared in (False, True):
            for name, fn in (("forward+backward", train_step), ("forward (no grad)", score_pass)):
                fn(shared)  # warm-up
                t0 = time.perf_counter()
                for _ in range(a.steps):
                    fn(shared)
                times.setdefault((name, "shared" if shared else "full"), []).append((time.perf_counter() - t0) / a.steps)
    rows = []
    print(f"| pass | full sequences (s) | prompt once (s) | speed-up | threads {threads} |")
    print("|---|---|---|---|---|")
    for name in ("forward+backward", "forward (no grad)"):
        full, shared = (statistics.median(times[(name, p)]) for p in ("full", "shared"))
        rows.append({"config": name, "status": "ran", "pass": name, "full_s": full, "shared_s": shared,
                     "speedup": full / shared})
        print(f"| {name} | {full:.3f} | {shared:.3f} | {full / shared:.2f}x | |")
    tokens_full = PROMPTS * K * (PROMPT_TOKENS + RESPONSE_TOKENS)
    tokens_shared = PROMPTS * (PROMPT_TOKENS - 1) + PROMPTS * K * (RESPONSE_TOKENS + 1)
    print(f"tokens through the model: {tokens_full} full, {tokens_shared} shared; log-probs: max |shared - full| in "
          f"fp32 {diff['shared_vs_full_fp32']:.1e}; mean |bf16 - fp32| full {diff['full_bf16_vs_fp32']:.3f}, "
          f"shared {diff['shared_bf16_vs_fp32']:.3f}")
    common.write(common.out_path(a, "rl_prompt_sharing"), "rl_prompt_sharing", record, results=rows,
                 rounds=a.rounds, steps=a.steps,
                 workload={"model": MODEL, "prompts": PROMPTS, "k": K, "prompt_tokens": PROMPT_TOKENS,
                           "response_tokens": RESPONSE_TOKENS},
                 tokens={"full": tokens_full, "shared": tokens_shared}, logprob_diffs=diff)


if __name__ == "__main__":
    main()
