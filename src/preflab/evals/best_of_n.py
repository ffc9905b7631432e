"""Best-of-N as a method: sample n responses per prompt from a policy, return the one the reward
model scores highest. It trains nothing, so it is the KL-efficient baseline (Gao et al. 2022):
its KL to the policy is at most log n - (n - 1) / n nats, and anything trained against the same
reward model should be read against it. ``best_of_n`` gives one response per prompt, so an
evaluation harness can treat it like a trained model; ``pick_best`` reranks candidates that were
sampled already (cached generations). Rejection-sampling fine-tuning (``stages/rs.py``) trains on
its picks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from preflab.rollout import HFGenerator, encode_prompts
from preflab.scoring import reward_scores, score_texts


@dataclass
class BestOfN:
    """Per prompt, in prompt order: the picked response, its reward and whether it ended with EOS,
    and all n candidates with their rewards and EOS flags (candidates[i][j]: sample j of prompt i);
    ``picks[i]``: which sample was picked (two samples can share a text, not their EOS or reward)."""

    texts: list[str]
    scores: list[float]
    ended: list[bool]
    candidates: list[list[str]]
    candidate_scores: list[list[float]]
    candidate_ended: list[list[bool]]
    picks: list[int] = field(default_factory=list)

    @property
    def kl_bound(self) -> float:
        """The analytic upper bound on KL(best-of-n || policy) in nats: log n - (n - 1) / n."""
        n = len(self.candidates[0]) if self.candidates else 1
        return math.log(n) - (n - 1) / n


def argbest(scores: list[float], ended: list[bool] | None = None, require_eos: bool = False) -> int | None:
    """Index of the highest score (the first of equal ones); ``require_eos``: among ended samples
    only (None when none ended)."""
    idx = [j for j in range(len(scores)) if not require_eos or (ended is not None and ended[j])]
    if not idx:
        return None
    return max(idx, key=lambda j: (scores[j], -j))


@torch.no_grad()
def best_of_n(policy: Any, reward_model: Any, tokenizer: Any, prompts: list, *, n: int, max_new_tokens: int = 64,
              temperature: float = 0.7, top_p: float = 1.0, batch_prompts: int = 8, bf16: bool = True,
              require_eos: bool = False, max_prompt_tokens: int | None = None, seed: int | None = None) -> BestOfN:
    """Sample ``n`` responses to each prompt from ``policy`` and keep the one ``reward_model``
    scores highest (its stored normalisation applied; the RM reads the rendered prompt, the
    response and EOS, as in PPO). Policy and reward model share ``tokenizer`` (the RM is trained
    from the SFT model). ``require_eos``: a response cut off at ``max_new_tokens`` is never picked
    unless all of a prompt's samples were (then the best of those is returned, ``ended`` False).
    ``seed``: sampling is reproducible and the global RNG is left as it was.

    Args:
        prompts: strings or chat-message lists.
    Returns:
        ``BestOfN`` in prompt order.
    """
    device = next(policy.parameters()).device
    ids = encode_prompts(tokenizer, prompts, max_prompt_tokens)
    gen = HFGenerator(policy, tokenizer, bf16=bf16)
    texts: list[list[str]] = []
    scores: list[list[float]] = []
    ended: list[list[bool]] = []
    was_training = reward_model.training
    reward_model.eval()
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        for s in range(0, len(ids), batch_prompts):
            samples = gen.generate(ids[s:s + batch_prompts], max_new_tokens=max_new_tokens, temperature=temperature,
                                   top_p=top_p, n=n)  # n contiguous rows per prompt
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                r = reward_scores(reward_model, samples.trim_query().to(next(reward_model.parameters()).device))
            r = r.float().cpu().tolist()
            done = samples.ended.cpu().tolist()
            for i in range(len(r) // n):
                texts.append(samples.texts[i * n:(i + 1) * n])
                scores.append(r[i * n:(i + 1) * n])
                ended.append([bool(x) for x in done[i * n:(i + 1) * n]])
    reward_model.train(was_training)
    picks = [argbest(sc, e, require_eos) for sc, e in zip(scores, ended)]
    picks = [p if p is not None else argbest(sc) for p, sc in zip(picks, scores)]
    return BestOfN([t[p] for t, p in zip(texts, picks)], [sc[p] for sc, p in zip(scores, picks)],
                   [e[p] for e, p in zip(ended, picks)], texts, scores, ended, picks)


def pick_best(reward_model: Any, tokenizer: Any, prompts: list, candidates: list[list[str]], *,
              max_length: int = 384, batch_size: int = 16, bf16: bool = False) -> tuple[list[str], list[float],
                                                                                       list[list[float]]]:
    """Rerank given candidates (``candidates[i]``: responses to prompt i): (the best text per prompt,
    its normalised reward, all rewards). Texts are scored as ``encode_pair`` gives them (prompt,
    response, EOS)."""
    flat_p = [p for p, c in zip(prompts, candidates) for _ in c]
    flat_r = [r for c in candidates for r in c]
    flat = score_texts(reward_model, tokenizer, flat_p, flat_r, max_length=max_length, batch_size=batch_size,
                       bf16=bf16, normalise=True)
    out_s, at = [], 0
    for c in candidates:
        out_s.append(flat[at:at + len(c)])
        at += len(c)
    best = [argbest(s) for s in out_s]
    return [c[b] for c, b in zip(candidates, best)], [s[b] for s, b in zip(out_s, best)], out_s
