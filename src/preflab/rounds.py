"""Rounds 2..n of the main job: InstructGPT's iteration of the recipe on the current policy.

Round 1 is the pipeline's graph (SFT samples ranked, RM, the trainers). Each further round r:

    round-r/label     K samples per fresh RM-split prompt from the current policy, ranked by the
                      labeler panel through the store's queue; the store of round r-1 plus these
                      rankings becomes RUN/round-r/store.sqlite (split ``rm``). A further
                      ``round.heldout`` prompts are ranked by three labelers each and stored under
                      split ``heldout-r``: never trained on. With ``round.select: uncertainty`` the
                      ranked prompts are those of a ``round.pool`` times larger pool whose samples
                      the previous round's reward-model ensemble disagrees on most.
    round-r/rm        the RM refit on every ``rm`` ranking so far (from SFT, or warm from the
                      previous RM: ``round.rm_init``); with ``round.select: uncertainty``, also
                      ``round-r/rm-2``, ... (the ensemble's other members; not in the last round).
    round-r/onpolicy  the RM before and after the refit scored on ``heldout-r`` (the current
                      policy's samples), beside the labelers' pairwise agreement on the same samples.
    round-r/METHOD    the round's trainer from the current policy, against the new RM, with its KL
                      to the SFT model or the previous policy (``round.kl_anchor``).
    round-r/eval      the new policy against the run's SFT model on the run's eval prompts (the
                      SFT samples and IFEval scores of RUN/eval are reused).

After the last round, ``final/label`` and ``final/onpolicy`` rank held-out samples of the final
policy and score the final RM on them. Every step is a pipeline step: recorded in pipeline.json
when it ends, skipped on a rerun, its training stages resumed from their checkpoints.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from preflab.config import deep_merge, round_dir, round_method
from preflab.data.jsonl import atomic_write_text
from preflab.errors import ConfigError

ROUND_STEPS = ("label", "rm", "onpolicy", "{method}", "eval")
# A round's RM refit trains on every ranking so far (half an hour by round 3 of the demo's recipe on
# 2 CPU cores): checkpointed every this many steps, so a killed run resumes it, unless `rm.run.save_every`
# says otherwise.
REFIT_SAVE_EVERY = 32


def refit_members(cfg: Any, r: int) -> list[str]:
    """The ensemble members beside the RM that round ``r`` refits (rm-2, ...): with ``round.select:
    uncertainty``, for the next round's pick; none in the last round (no round after it picks)."""
    if cfg.round.select != "uncertainty" or r >= cfg.rounds:
        return []
    return [f"rm-{i}" for i in range(2, cfg.rm_ensemble + 1)]


def round_steps(cfg: Any) -> list[str]:
    """The steps of rounds 2..n and the final on-policy check (none when ``rounds`` is 1)."""
    if cfg.rounds < 2:
        return []
    method = round_method(cfg)
    steps = []
    for r in range(2, cfg.rounds + 1):
        for s in ROUND_STEPS:
            steps.append(f"round-{r}/{s.format(method=method)}")
            if s == "rm":
                steps += [f"round-{r}/{m}" for m in refit_members(cfg, r)]
    return steps + (["final/label", "final/onpolicy"] if cfg.round.heldout else [])


class Rounds:
    """Paths, stage configs and steps of rounds 2..n of one pipeline run."""

    def __init__(self, pipe: Any):  # the pipeline.Pipeline whose rounds these are (it imports this module)
        self.pipe, self.cfg, self.out = pipe, pipe.cfg, pipe.out
        self.method = round_method(self.cfg) if self.cfg.rounds > 1 else None
        heads = pipe.stage_configs["rm"].train.heads
        if self.cfg.rounds > 1 and self.cfg.round.select == "uncertainty" and self.cfg.rm_ensemble < 2 and heads < 2:
            raise ConfigError(f"round.select: uncertainty picks prompts by the reward-model ensemble's disagreement "
                              f"and needs rm_ensemble >= 2 (it is {self.cfg.rm_ensemble}) or rm.train.heads >= 2; "
                              "set one of them to 2 or more, or round.select: random")

    # -- where each round's pieces live ---------------------------------------------------------

    def dir(self, r: int) -> Path:
        return round_dir(self.out, r)

    def policy(self, r: int) -> Path:
        """The policy round ``r`` ends with (round 1: the pipeline's own run of the method)."""
        return self.dir(r) / self.method / "model"

    def rm(self, r: int) -> Path:
        return self.dir(r) / "rm" / "model"

    def members(self, r: int) -> list[Path]:
        """The reward-model ensemble after round ``r``: RUN/rm, RUN/rm-2, ... (round 1), or the round's refits."""
        return [self.rm(r), *(self.dir(r) / m / "model" for m in self.pipe.members)]

    def store(self, r: int) -> Path:
        return self.pipe.store if r == 1 else self.dir(r) / "store.sqlite"

    def fresh_prompts(self, r: int) -> tuple[list, list]:
        """Round ``r``'s (train, heldout) RM-split prompts: the ones after every earlier round's; with
        ``round.select: uncertainty`` train is the pool the round picks from. ``r = rounds + 1`` is
        the final check (held-out prompts only)."""
        c = self.cfg
        pool = c.round.prompts * (c.round.pool if c.round.select == "uncertainty" else 1)
        start = c.labeling.limit + (r - 2) * (pool + c.round.heldout)
        rows = self.pipe._split("rm")
        n_train = pool if r <= c.rounds else 0
        need = start + n_train + c.round.heldout
        if need > len(rows):
            lower = "round.prompts/round.heldout" + ("/round.pool" if pool > c.round.prompts else "")
            raise ConfigError(f"rounds: round {r if r <= c.rounds else 'final'} needs {need} RM-split prompts and "
                              f"the suite has {len(rows)} (raise suite.n, or lower {lower})")
        return rows[start:start + n_train], rows[start + n_train:need]

    # -- stage configs (dicts; the pipeline validates them before anything runs) ----------------

    def stage_dicts(self) -> dict[str, tuple[str, dict[str, Any]]]:
        """step -> (registry stage, config dict) for every training step of rounds 2..n."""
        out: dict[str, tuple[str, dict[str, Any]]] = {}
        pipe, c = self.pipe, self.cfg
        for r in range(2, c.rounds + 1):
            d = self.dir(r)
            for i, name in enumerate(["rm", *refit_members(c, r)]):  # member i: round 1's seed, seed + i
                rm = pipe.stage_dict("rm")
                rm["model"]["path"] = str(pipe.out / "sft/model") if c.round.rm_init == "sft" else str(
                    self.members(r - 1)[i])
                rm["data"]["train"] = f"store:{self.store(r)}"
                rm["run"]["out"] = str(d / name)
                rm["run"].setdefault("save_every", REFIT_SAVE_EVERY)  # a refit grows with every round: resumable
                if i:
                    rm["run"]["seed"] = c.seed + i
                out[f"round-{r}/{name}"] = ("rm", rm)
            ref = str(pipe.out / "sft/model") if c.round.kl_anchor == "sft" else str(self.policy(r - 1))
            trainer = pipe.method_dict(self.method, policy=str(self.policy(r - 1)), reward_model=str(self.rm(r)),
                                       store=self.store(r), reference=ref, out=d / self.method,
                                       seed=c.seed + 1000 * (r - 1))
            out[f"round-{r}/{self.method}"] = (pipe.stage_of(self.method), deep_merge(trainer, c.round.overrides))
        return out

    # -- steps ----------------------------------------------------------------------------------

    def run_step(self, step: str) -> None:
        """Run ``round-r/WHAT`` or ``final/WHAT`` (the final check is round ``rounds + 1``)."""
        where, _, what = step.partition("/")
        r = self.cfg.rounds + 1 if where == "final" else int(where.removeprefix("round-"))
        if what in self.pipe.members:  # a refit ensemble member
            return self.pipe.train(step)
        steps = {"label": self.step_label, "rm": self.step_rm, "onpolicy": self.step_onpolicy,
                 "eval": self.step_eval, self.method: self.step_train}
        steps[what](r)

    def step_label(self, r: int) -> None:
        """Rank fresh samples of the current policy into a copy of the previous round's store,
        renamed into place only when complete (a kill leaves no half store behind)."""
        from preflab.feedback.label_cli import collect_rankings

        lab, d = self.cfg.labeling, self.dir(r) if r <= self.cfg.rounds else self.out / "final"
        d.mkdir(parents=True, exist_ok=True)
        train, heldout = self.fresh_prompts(r)
        dest = self.store(r) if r <= self.cfg.rounds else d / "store.sqlite"
        tmp = dest.with_suffix(".sqlite.partial")
        for p in (tmp, Path(f"{tmp}-wal"), Path(f"{tmp}-shm")):
            p.unlink(missing_ok=True)
        shutil.copyfile(self.store(min(r - 1, self.cfg.rounds)), tmp)
        policy = str(self.policy(r - 1))
        seed = self.cfg.seed + 1000 * (r - 1)
        common = dict(model_spec=policy, store_path=tmp, k=lab.k, max_new_tokens=lab.max_new_tokens,
                      temperature=lab.temperature, batch_size=lab.batch_size, bf16=lab.bf16, seed=seed)
        if train and self.cfg.round.select == "uncertainty":
            train, candidates = self.pick_uncertain(r, train, d, seed)
            collect_rankings(prompts=train, split="rm", overlap=lab.overlap, candidates=candidates, **common)
        elif train:
            collect_rankings(prompts=train, split="rm", overlap=lab.overlap,
                             samples_cache=d / "label_samples.jsonl", **common)
        if heldout:
            collect_rankings(prompts=heldout, split=f"heldout-{r}", overlap=1.0,
                             samples_cache=d / "heldout_samples.jsonl", **common)
        tmp.rename(dest)

    def pick_uncertain(self, r: int, pool: list, d: Path, seed: int) -> tuple[list, list[str]]:
        """Of round ``r``'s pool, the ``round.prompts`` prompts whose K samples of the current policy
        the previous round's ensemble disagrees on most (the members' std of the normalised reward,
        averaged over the K samples), in pool order, with their samples (the candidates labeled).
        Writes RUN/round-r/selection.json: every pool prompt's disagreement and whether it was picked."""
        from preflab import models
        from preflab.feedback.label_cli import sample_candidates
        from preflab.rl.stats import ensemble_spread, most_uncertain
        from preflab.scoring import ensemble_text_scores

        lab, k, policy = self.cfg.labeling, self.cfg.labeling.k, str(self.policy(r - 1))
        flat = sample_candidates(models.load_policy(policy), models.load_tokenizer(policy), pool, k=k,
                                 max_new_tokens=lab.max_new_tokens, temperature=lab.temperature,
                                 batch_size=lab.batch_size, bf16=lab.bf16, cache=d / "pool_samples.jsonl", seed=seed,
                                 cache_key=policy)
        members = [str(m) for m in self.members(r - 1)]
        scores = ensemble_text_scores(members, [p.prompt for p in pool for _ in range(k)], flat,
                                      max_length=self.pipe.stage_configs["rm"].data.max_length,
                                      batch_size=lab.batch_size, bf16=lab.bf16)
        disagreement = ensemble_spread(scores)[1].reshape(len(pool), k).mean(1)
        picked = sorted(most_uncertain(disagreement, self.cfg.round.prompts))
        atomic_write_text(d / "selection.json", json.dumps({
            "round": r, "policy": policy, "members": members, "k": k, "picked": len(picked),
            "pool": [{"id": p.id, "disagreement": float(u), "picked": i in picked}
                     for i, (p, u) in enumerate(zip(pool, disagreement))]}, indent=2))
        return [pool[i] for i in picked], [t for i in picked for t in flat[i * k:(i + 1) * k]]

    def step_rm(self, r: int) -> None:
        self.pipe.train(f"round-{r}/rm")

    def step_onpolicy(self, r: int) -> None:
        """RM accuracy on held-out rankings of the current policy's samples: the RM the policy was
        trained against (round r-1's) and the refit one (round r's), beside the labelers' agreement,
        and all of them against the gold judge on the pairs it decides (``rm_eval.gold_agreement``)."""
        from preflab.evals.rm_eval import evaluate, gold_agreement, gold_totals, rm_scores
        from preflab.feedback.ranking_sources import read_groups

        if not self.cfg.round.heldout:
            return
        final = r > self.cfg.rounds
        d = self.out / "final" if final else self.dir(r)
        store = d / "store.sqlite" if final else self.store(r)
        source, split = f"store:{store}", f"heldout-{r}"
        rms = {"rm_before": self.rm(r - 1)} if final else {"rm_before": self.rm(r - 1), "rm_after": self.rm(r)}
        result: dict[str, Any] = {"round": "final" if final else r, "policy": str(self.policy(r - 1)), "split": split}
        groups = [g for g in read_groups(source, None, split) if g.pairs()]
        scores = {key: rm_scores(str(rm), groups, self.pipe.stage_configs["rm"].data.max_length, 16,
                                 self.cfg.eval.bf16) for key, rm in rms.items()}
        for key, rm in rms.items():
            rep = evaluate(groups, scores[key], temperature_scaling=False, worst_k=0)
            result[key] = {"model": str(rm), "accuracy": rep["accuracy"], "ci": rep["ci"], "n_pairs": rep["n_pairs"],
                           "n_groups": rep["n_groups"]}
            labelers = rep.get("labelers")
            if labelers:  # labeler vs labeler on the prompts ranked by several, and the RM on the same pairs
                result["labeler_agreement"] = {k: labelers[k] for k in ("agreement", "n_pairs", "n_prompts")}
                result[key]["accuracy_on_shared"] = labelers["rm_accuracy"]
        gold = gold_totals(source, split, groups)
        if gold is not None:
            result["gold"] = gold_agreement(groups, gold, scores)
        atomic_write_text(d / "onpolicy.json", json.dumps(result, indent=2, default=str))

    def step_train(self, r: int) -> None:  # the trainer's step is named after its method
        self.pipe.train(f"round-{r}/{self.method}")

    def step_eval(self, r: int) -> None:
        """The round's policy against the SFT model, on the run's eval prompts and settings."""
        d = self.dir(r) / "eval"
        cached = self.out / "eval/generations/sft.jsonl"
        if cached.is_file() and not (d / "generations/sft.jsonl").exists():
            (d / "generations").mkdir(parents=True, exist_ok=True)
            shutil.copyfile(cached, d / "generations/sft.jsonl")
        self.pipe.evaluate_paths({"sft": str(self.out / "sft/model"), f"{self.method}@{r}": str(self.policy(r))},
                                 d, reward_model=str(self.rm(r)), ifeval_reuse=self.out / "eval")  # SFT's IFEval too
