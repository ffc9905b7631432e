"""Log-likelihoods of given responses, and an MC1-style truthfulness proxy.

``response_logprobs`` scores texts a model may or may not have written: the sum of the
token log-probabilities of the response given the rendered prompt (chat template with the
generation prompt, ``rollout.encode_prompts``). The response is tokenized as the policy
would generate it: its text, then the EOS token when the response ended (a response cut
off at the length limit has no EOS). ``evaluate`` uses it for the KL to the reference.

``mc1`` is TruthfulQA's MC1 set-up (Lin et al. 2022) on the suite's misconception slice:
for each prompt, the log-likelihood (summed over answer tokens, no EOS) of every phrase in
``true_answers`` and ``false_answers``; the prompt counts as correct when the best true
answer scores higher than every false answer. It is a **proxy**: the answers are short
key phrases, not full sentences, and a summed likelihood favours shorter phrases.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from preflab.data.suite.schema import SuitePrompt
from preflab.rl.logprobs import masked_sum, selective_log_softmax
from preflab.rollout import Samples, encode_prompts, left_pad
from preflab.scoring import response_logits

__all__ = ["batch_samples", "mc1", "response_logprobs", "response_samples", "sequence_logprobs"]


def response_samples(tokenizer: Any, prompts: Sequence[str | list[dict[str, str]]], responses: Sequence[str],
                     eos: bool | Sequence[bool] = True) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, response ids) per row: response text tokens, plus EOS where ``eos`` says so."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    ends = [eos] * len(responses) if isinstance(eos, bool) else list(eos)
    if len(ends) != len(responses):
        raise ValueError(f"{len(responses)} responses but {len(ends)} eos flags")
    queries = encode_prompts(tokenizer, list(prompts))
    out = []
    for q, r, e in zip(queries, responses, ends):
        ids = tokenizer(r, add_special_tokens=False)["input_ids"] if r else []
        out.append((q, ids + [tokenizer.eos_token_id] if e else ids))
    return out


def batch_samples(rows: Sequence[tuple[list[int], list[int]]], pad_id: int, device: torch.device) -> Samples:
    """Left-padded queries and right-padded responses, the layout ``rollout`` samples have."""
    query, query_mask = left_pad([q for q, _ in rows], pad_id)
    width = max(1, max(len(r) for _, r in rows))
    response = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (_, r) in enumerate(rows):
        if r:
            response[i, :len(r)] = torch.tensor(r)
            mask[i, :len(r)] = 1
    ended = torch.zeros(len(rows), dtype=torch.bool)
    return Samples(query, query_mask, response, mask, ended, [""] * len(rows)).to(device)


@torch.no_grad()
def sequence_logprobs(model: Any, rows: Sequence[tuple[list[int], list[int]]], pad_id: int, *, batch_size: int = 16,
                      temperature: float = 1.0, bf16: bool = False) -> list[float]:
    """Sum of response-token log-probs for (prompt ids, response ids) rows, in row order.

    One forward pass per batch over left-padded prompt + right-padded response (the
    ``rollout.Samples`` layout), logits divided by ``temperature``; no gradient.
    """
    if not rows:
        return []
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    # Similar lengths together: less padding; results go back in input order.
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]) + len(rows[i][1]))
    out = [0.0] * len(rows)
    try:
        for s in range(0, len(order), batch_size):
            chunk = order[s:s + batch_size]
            samples = batch_samples([rows[i] for i in chunk], pad_id, device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                logits = response_logits(model, samples, temperature)
            lp = selective_log_softmax(logits.float(), samples.response)
            sums = masked_sum(lp, samples.response_mask, dim=1)
            for i, v in zip(chunk, sums.tolist()):
                out[i] = float(v)
    finally:
        model.train(was_training)
    return out


def response_logprobs(model: Any, tokenizer: Any, prompts: Sequence[str | list[dict[str, str]]],
                      responses: Sequence[str], batch_size: int = 16, *, eos: bool | Sequence[bool] = True,
                      temperature: float = 1.0, bf16: bool = False) -> list[float]:
    """Sum of the response's token log-probs given the rendered prompt, one float per row.

    Args:
        model: a causal LM (HF; peft and DDP wrappers are fine).
        tokenizer: its tokenizer (chat template, pad token distinct from EOS).
        prompts: N prompts (a string or a message list).
        responses: N response texts, without EOS.
        batch_size: rows per forward pass.
        eos: append the EOS token to every response (True), none (False), or per row.
        temperature: logits are divided by it before the softmax, as the sampler did
            (docs/reference.md §2.3); 1.0 scores the model's own distribution.
        bf16: autocast the forward pass to bfloat16 (log-softmax stays in fp32).

    Returns:
        N sums of log-probabilities (nats); 0.0 for a row with no response token.
    """
    rows = response_samples(tokenizer, prompts, responses, eos)
    return sequence_logprobs(model, rows, tokenizer.pad_token_id, batch_size=batch_size, temperature=temperature,
                         bf16=bf16)


def mc1(model: Any, tokenizer: Any, prompts: Sequence[SuitePrompt], batch_size: int = 16,
        bf16: bool = False) -> dict[str, Any]:
    """MC1-style truthfulness proxy on the misconception prompts that have true and false answers.

    Returns ``{"mc1": fraction correct or None, "n": prompts scored, "per_prompt": [{"id",
    "correct", "best_true", "best_false"}]}``; other prompts are ignored.
    """
    usable = [p for p in prompts if p.slice == "misconception" and p.true_answers and p.false_answers]
    if not usable:
        return {"mc1": None, "n": 0, "per_prompt": []}
    pairs = [(p, a) for p in usable for a in (*p.true_answers, *p.false_answers)]
    scores = response_logprobs(model, tokenizer, [p.prompt for p, _ in pairs], [a for _, a in pairs],
                               batch_size, eos=False, bf16=bf16)
    per_prompt, i = [], 0
    for p in usable:
        n_true, n_false = len(p.true_answers), len(p.false_answers)
        best_true = max(scores[i:i + n_true])
        best_false = max(scores[i + n_true:i + n_true + n_false])
        i += n_true + n_false
        per_prompt.append({"id": p.id, "correct": best_true > best_false, "best_true": best_true,
                           "best_false": best_false})
    return {"mc1": sum(r["correct"] for r in per_prompt) / len(per_prompt), "n": len(per_prompt),
            "per_prompt": per_prompt}
