"""Checkpoint selection inside the online RL stage (``select.every > 0``).

The longer a policy is optimised against a reward model, the more it exploits the RM's errors:
the gold score rises, then falls, while the RM's keeps rising (Gao et al. 2022). Selection scores
the policy every ``select.every`` updates (and before the first) on a dev split, the last
``select.n`` prompts of the stage's own split, which training then never sees (never the eval
split, never the gold judge):

- ``by: panel``: the simulated labeler panel compares one policy sample per dev prompt with the
  reference model's sample of the same prompt (drawn once, before training); the score is the
  policy's win-rate, ties half. The policy's answer is shown first on even prompts and second on
  odd ones, so a labeler's position bias cancels.
- ``by: reward``: the mean reward (RM and reward functions) of the policy's dev samples.

The best-scoring weights are kept (``loop.BestWeights``, so a resumed run finds the same best) and
exported; every score is logged as ``select/score`` and the export as ``select/best_step``. Dev
samples draw from their own seeded RNG, so selection leaves training's random stream unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from preflab import loop
from preflab.data.chat import token_budget


class Selection:
    def __init__(self, cfg: Any, dev_rows: list[dict], dev_ids: list[list[int]], generator: Any,
                 reference_generator: Any, score_samples: Callable[[Any, list[dict]], list[float]],
                 enabled: bool):
        s, r = cfg.select, cfg.rollout
        self.by, self.seed = s.by, cfg.run.seed + 101
        self.rows, self.ids, self.gen = dev_rows, dev_ids, generator
        self.sample_kw = dict(max_new_tokens=[token_budget(row, r.max_new_tokens) for row in dev_rows],
                              temperature=r.temperature, top_k=r.top_k,
                              top_p=r.top_p, min_new_tokens=r.min_new_tokens)
        self.score_samples = score_samples
        self.best = loop.BestWeights(Path(cfg.run.out) / "selected", enabled=enabled)
        self.reference_texts = self._texts(reference_generator) if s.by == "panel" else None

    def _samples(self, generator: Any) -> Any:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            return generator.generate(self.ids, **self.sample_kw)

    def _texts(self, generator: Any) -> list[str]:
        return list(self._samples(generator).texts)

    def score(self) -> float:
        """The current policy's dev score (higher is better)."""
        if self.by == "reward":
            values = self.score_samples(self._samples(self.gen), self.rows)
            return float(sum(values) / len(values))
        return panel_win_rate(self.rows, self._texts(self.gen), self.reference_texts, seed=self.seed)

    def offer(self, step: int, model: torch.nn.Module) -> float:
        """Score the policy after ``step`` updates and keep its weights if best so far."""
        value = self.score()
        self.best.offer(step, -value, model)  # BestWeights keeps the lowest
        return value

    def finish(self, model: torch.nn.Module, last_step: int) -> int | None:
        """Load the best weights into ``model`` when they are not the last step's; the chosen step."""
        if self.best.step is not None and self.best.step != last_step:
            self.best.load_into(model)
        return self.best.step


def panel_win_rate(rows: list[dict], policy: list[str], reference: list[str], *, seed: int) -> float:
    """How often the labeler panel (round robin over prompts) ranks the policy's answer above the
    reference's, ties half; the policy's answer comes first on even prompts, second on odd."""
    from preflab.data.suite.schema import SuitePrompt
    from preflab.feedback.labelers import default_panel

    panel = default_panel()
    wins = 0.0
    for i, (row, a, b) in enumerate(zip(rows, policy, reference, strict=True)):
        first = i % 2 == 0
        order = panel.at(i).rank(SuitePrompt.from_dict(row), [a, b] if first else [b, a], seed=seed).order
        mine = 0 if first else 1
        top = order[0]
        wins += 0.5 if len(top) > 1 else float(top[0] == mine)
    return wins / len(rows)
