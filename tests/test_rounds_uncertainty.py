"""`round.select: uncertainty`: a round ranks the prompts of a larger pool whose samples of the
current policy the reward-model ensemble disagrees on most, refits every member for the next pick,
and refuses to start without an ensemble. The pick runs on a tiny policy's real samples and the real
labeler panel; only the members' scores are scripted."""

import json
import random
import shutil

import pytest

from preflab import models, scoring
from preflab.errors import ConfigError
from preflab.feedback.store import PreferenceStore
from preflab.pipeline import Pipeline
from test_rounds import _cfg


def test_uncertainty_needs_an_ensemble_named_by_its_key(tmp_path):
    with pytest.raises(ConfigError, match=r"round.select: uncertainty .* rm_ensemble >= 2 \(it is 1\)"):
        Pipeline(_cfg(rounds=2, rl=["rloo"], round={"select": "uncertainty"}), tmp_path)
    Pipeline(_cfg(rounds=2, rl=["rloo"], rm_ensemble=2, round={"select": "uncertainty"}), tmp_path)
    Pipeline(_cfg(rounds=2, rl=["rloo"], rm={"train": {"heads": 2}}, round={"select": "uncertainty"}), tmp_path)
    Pipeline(_cfg(rounds=1, rl=["rloo"], round={"select": "uncertainty"}), tmp_path)  # no round picks
    assert _cfg().round.select == "random" and _cfg().round.pool == 3


@pytest.mark.parametrize("rm_init", ["sft", "previous"])
def test_every_member_is_refit_each_round_but_the_last(tmp_path, rm_init):
    pipe = Pipeline(_cfg(rounds=3, rl=["rloo"], rm_ensemble=3, round={"select": "uncertainty", "rm_init": rm_init}),
                    tmp_path)
    steps = list(pipe.steps)
    at = steps.index("round-2/rm")
    assert steps[at:at + 4] == ["round-2/rm", "round-2/rm-2", "round-2/rm-3", "round-2/onpolicy"]
    assert "round-3/rm" in steps and not any(s.startswith("round-3/rm-") for s in steps)  # no round 4 picks
    for name in ("rm", "rm-2", "rm-3"):
        c = pipe.stage_configs[f"round-2/{name}"]
        assert c.run.out == str(tmp_path / "round-2" / name) and c.run.seed == pipe.stage_configs[name].run.seed
        assert c.data.train == f"store:{tmp_path / 'round-2/store.sqlite'}"
        previous = tmp_path / name / "model"  # round 1's member of the same seed
        assert c.model.path == str(tmp_path / "sft/model" if rm_init == "sft" else previous)
    assert [c.run.seed for c in (pipe.stage_configs[f"round-2/{n}"] for n in ("rm", "rm-2", "rm-3"))] == [0, 1, 2]
    assert pipe.rounds.members(2) == [tmp_path / "round-2" / n / "model" for n in ("rm", "rm-2", "rm-3")]
    # random rounds refit one RM, as before
    plain = Pipeline(_cfg(rounds=3, rl=["rloo"], rm_ensemble=3), tmp_path)
    assert not any(s.startswith("round-") and "/rm-" in s for s in plain.steps)


def test_the_pool_is_round_pool_times_round_prompts_and_rounds_do_not_overlap(tmp_path):
    pipe = Pipeline(_cfg(rounds=3, rl=["rloo"], rm_ensemble=2, labeling={"limit": 8},
                         round={"select": "uncertainty", "prompts": 8, "heldout": 4, "pool": 3}), tmp_path)
    pipe.step_suite()
    rm_split = pipe._split("rm")
    (p2, h2), (p3, h3), (pf, hf) = (pipe.rounds.fresh_prompts(r) for r in (2, 3, 4))
    assert (len(p2), len(h2), len(p3), len(h3), len(pf), len(hf)) == (24, 4, 24, 4, 0, 4)
    assert [p.id for p in p2 + h2 + p3 + h3 + hf] == [p.id for p in rm_split[8:8 + 60]]  # in order, none twice
    with pytest.raises(ConfigError, match="round.pool"):
        Pipeline(_cfg(rounds=3, rl=["rloo"], rm_ensemble=2, round={"select": "uncertainty", "pool": 50}),
                 tmp_path).rounds.fresh_prompts(3)


def test_the_round_ranks_the_prompts_whose_samples_the_members_disagree_on_most(tmp_path, monkeypatch):
    k, n, pool_x = 2, 8, 3
    pipe = Pipeline(_cfg(rounds=2, rl=["rloo"], rm_ensemble=2, labeling={"k": k, "limit": 8},
                         round={"select": "uncertainty", "prompts": n, "heldout": 0, "pool": pool_x}), tmp_path)
    pipe.step_suite()
    shutil.copytree(models.ensure_tiny("tiny:"), tmp_path / "rloo" / "model")  # round 1's policy
    with PreferenceStore(tmp_path / "store.sqlite"):  # round 1's store (empty here)
        pass
    pool, _ = pipe.rounds.fresh_prompts(2)
    # each pool prompt's disagreement: a shuffle, so the top 8 are neither the first 8 nor the last
    disagreement = [i / len(pool) for i in range(len(pool))]
    random.Random(3).shuffle(disagreement)
    top = sorted(sorted(range(len(pool)), key=lambda i: -disagreement[i])[:n])
    assert top != list(range(n)) and top != list(range(len(pool) - n, len(pool)))
    seen = {}

    def scripted(members, prompts, responses, **kw):
        """Member scores base +- s: their std is s. A prompt's two samples get 1.5 and 0.5 times its
        disagreement (their mean); the base, unrelated to it, differs sample by sample."""
        seen.update(members=members, prompts=list(prompts), responses=list(responses))
        s = [disagreement[j // k] * (1.5 if j % k == 0 else 0.5) for j in range(len(responses))]
        base = [10.0 * ((7 * j) % 5) for j in range(len(responses))]
        return [[b + x for b, x in zip(base, s)], [b - x for b, x in zip(base, s)]]

    monkeypatch.setattr(scoring, "ensemble_text_scores", scripted)
    pipe.rounds.step_label(2)

    assert seen["members"] == [str(tmp_path / "rm/model"), str(tmp_path / "rm-2/model")]
    assert seen["prompts"] == [p.prompt for p in pool for _ in range(k)] and len(seen["responses"]) == k * len(pool)
    with PreferenceStore(tmp_path / "round-2/store.sqlite") as store:
        ranked = store.rankings(split="rm")
        by_prompt = {r.prompt: sorted(t for _, t, _ in store.candidates(r.prompt_id)) for r in ranked}
    assert set(by_prompt) == {pool[i].prompt for i in top} and len(by_prompt) == n
    for i in top:  # the candidates ranked are the very samples the members were scored on
        assert by_prompt[pool[i].prompt] == sorted(seen["responses"][i * k:(i + 1) * k])
    sel = json.loads((tmp_path / "round-2/selection.json").read_text())
    assert [p["id"] for p in sel["pool"]] == [p.id for p in pool]
    assert [i for i, p in enumerate(sel["pool"]) if p["picked"]] == top
    assert [p["disagreement"] for p in sel["pool"]] == pytest.approx(disagreement)


def test_three_rounds_each_pick_with_the_ensemble_the_previous_round_refit(tmp_path):
    from preflab.cli import main

    out = tmp_path / "run"
    main(["pipeline", "--preset", "tiny", "--out", str(out), "rounds=3", "rl=[rloo]", "round.prompts=8",
          "round.heldout=0", "rm_ensemble=2", "round.select=uncertainty", "eval.models=[sft,rloo]"])
    done = [s["step"] for s in json.loads((out / "pipeline.json").read_text())["steps"]]
    assert done.index("round-2/rm") < done.index("round-2/rm-2") < done.index("round-2/rloo")
    assert "round-3/rm" in done and "round-3/rm-2" not in done
    member = json.loads((out / "round-2/rm-2/manifest.json").read_text())
    assert member["status"] == "finished" and member["config"]["data"]["train"] == f"store:{out / 'round-2/store.sqlite'}"
    for r, members in ((2, [out / "rm/model", out / "rm-2/model"]),
                       (3, [out / "round-2/rm/model", out / "round-2/rm-2/model"])):
        sel = json.loads((out / f"round-{r}/selection.json").read_text())
        assert sel["members"] == [str(m) for m in members] and len(sel["pool"]) == 24 and sel["picked"] == 8
        picked = [p for p in sel["pool"] if p["picked"]]
        assert min(p["disagreement"] for p in picked) >= max(p["disagreement"] for p in sel["pool"] if not p["picked"])
        with PreferenceStore(out / f"round-{r}/store.sqlite") as store, PreferenceStore(
                out / ("store.sqlite" if r == 2 else "round-2/store.sqlite")) as before:
            fresh = {x.prompt for x in store.rankings(split="rm")} - {x.prompt for x in before.rankings(split="rm")}
        pool = {p.id: p.prompt for p in Pipeline(_cfg(), out)._split("rm")}
        assert fresh == {pool[p["id"]] for p in picked}
