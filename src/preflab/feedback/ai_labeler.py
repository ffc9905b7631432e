"""AI labeler (RLAIF): rank K candidates by asking a causal LM which of two responses is better.

For every pair (i, j) the judge model reads a comparison prompt (``COMPARE_TEMPLATE``,
rendered with its chat template) twice, once with i as "Response A" and once with j as A,
and we read the log-probability of the answer tokens "A" and "B" at the next position.
With d(x, y) = log p("A" | x first) - log p("B" | x first),

    P(i > j) = sigmoid((d(i, j) - d(j, i)) / 2)

so a constant preference for the first-listed answer (position bias) cancels (Lee et al.
2023, "RLAIF", sec. 2.1 average both orders; Zheng et al. 2023, "Judging LLM-as-a-judge",
position bias). Pairwise win probabilities are aggregated by Borda count (expected wins,
``sum_j P(i > j)``, Copeland's score with soft wins); candidates whose scores lie within
``tie_margin`` of a tier's top are tied.

Exact symmetry: the 2 * C(K, 2) comparison prompts are deduplicated and sorted by text
before they are batched, so the numbers for a pair of texts do not depend on the order in
which the candidates were given: permuting the candidates permutes the result.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from preflab.data.suite.schema import SuitePrompt
from preflab.feedback.labelers import LabelResult, tiers_from_scores

COMPARE_TEMPLATE = (
    "Which response is better? Judge how helpful, honest and harmless it is, and whether it follows "
    "the instructions.\n\n"
    "Request: {prompt}\n\n"
    "Response A: {a}\n\n"
    "Response B: {b}\n\n"
    "Answer with A or B."
)


def _answer_token_ids(tokenizer: Any, letter: str) -> list[int]:
    ids = []
    for variant in (letter, " " + letter):
        toks = tokenizer(variant, add_special_tokens=False)["input_ids"]
        if toks:
            ids.append(int(toks[0]))
    return sorted(set(ids))


class AILabeler:
    """Rank with a causal LM's preference between pairs of responses; see the module docstring.

    Args:
        model, tokenizer: any causal LM and its tokenizer (with a chat template; ``load_tokenizer``
            supplies one).
        name: the labeler id stored with its rankings.
        tie_margin: Borda scores (expected wins, in [0, K-1]) this close to a tier's top are tied.
        max_chars: each response is cut to this many characters in the comparison prompt.
        batch_size: comparison prompts per forward pass.
    """

    def __init__(self, model: Any, tokenizer: Any, *, name: str = "ai", tie_margin: float = 0.05,
                 max_chars: int = 1200, batch_size: int = 8, template: str = COMPARE_TEMPLATE):
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.tie_margin = tie_margin
        self.max_chars = max_chars
        self.batch_size = batch_size
        self.template = template
        self.a_ids = _answer_token_ids(tokenizer, "A")
        self.b_ids = [i for i in _answer_token_ids(tokenizer, "B") if i not in self.a_ids]
        self.a_ids = [i for i in self.a_ids if i not in self.b_ids]
        if not self.a_ids or not self.b_ids:
            raise ValueError("the tokenizer has no distinct first token for the answers 'A' and 'B'")

    def comparison_prompt(self, prompt: str, a: str, b: str) -> str:
        """The rendered text the model reads for "is A better than B"."""
        from preflab.data.chat import render_prompt

        cut = self.max_chars
        msg = self.template.format(prompt=prompt.strip(), a=a.strip()[:cut], b=b.strip()[:cut])
        return render_prompt(self.tokenizer, msg)

    def answer_logits(self, texts: Sequence[str]) -> np.ndarray:
        """(N,) log p(A) - log p(B) at the next token after each rendered text (A/B over their variants)."""
        import torch

        from preflab.lm import unwrap
        from preflab.rollout import left_pad, position_ids

        model = unwrap(self.model)
        device = next(model.parameters()).device
        tok = self.tokenizer
        out = np.empty(len(texts))
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                for s in range(0, len(texts), self.batch_size):
                    chunk = texts[s:s + self.batch_size]
                    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in chunk]
                    inp, mask = left_pad(ids, tok.pad_token_id)
                    inp, mask = inp.to(device), mask.to(device)
                    logits = model(input_ids=inp, attention_mask=mask, position_ids=position_ids(mask),
                                   use_cache=False).logits[:, -1].float()
                    logp = torch.log_softmax(logits, dim=-1)
                    la = torch.logsumexp(logp[:, self.a_ids], dim=-1)
                    lb = torch.logsumexp(logp[:, self.b_ids], dim=-1)
                    out[s:s + len(chunk)] = (la - lb).cpu().numpy()
        finally:
            model.train(was_training)
        return out

    def win_matrix(self, prompt: str, candidates: Sequence[str]) -> np.ndarray:
        """(K, K) P(i better than j), symmetrised over both orders; 0.5 on the diagonal."""
        k = len(candidates)
        keys = {(i, j): self.comparison_prompt(prompt, candidates[i], candidates[j])
                for i, j in itertools.permutations(range(k), 2)}
        texts = sorted(set(keys.values()))  # canonical batch: independent of candidate order
        d = dict(zip(texts, self.answer_logits(texts)))
        w = np.full((k, k), 0.5)
        for i, j in itertools.combinations(range(k), 2):
            x = (d[keys[i, j]] - d[keys[j, i]]) / 2
            w[i, j] = 1.0 / (1.0 + math.exp(-x))
            w[j, i] = 1.0 / (1.0 + math.exp(x))
        return w

    def rank(self, prompt: SuitePrompt | Mapping[str, Any] | str, candidates: Sequence[str], **_: Any) -> LabelResult:
        """Rank ``candidates``: Borda scores of the win matrix, tied within ``tie_margin``.

        ``perceived`` holds the Borda scores; ``gold`` is empty (the AI labeler never sees it);
        ``time_s`` is the wall time spent.
        """
        if len(candidates) < 2:
            raise ValueError(f"a ranking needs at least 2 candidates, got {len(candidates)}")
        text = prompt if isinstance(prompt, str) else (
            prompt.prompt if isinstance(prompt, SuitePrompt) else str(prompt["prompt"]))
        t0 = time.perf_counter()
        w = self.win_matrix(text, candidates)
        # expected wins against the other K-1; fsum is exactly rounded, so independent of order
        borda = [math.fsum(w[i, j] for j in range(len(candidates)) if j != i) for i in range(len(candidates))]
        order = tiers_from_scores(borda, self.tie_margin)
        return LabelResult(order=order, time_s=round(time.perf_counter() - t0, 3), perceived=tuple(borda), gold=())


__all__ = ["AILabeler", "COMPARE_TEMPLATE"]
