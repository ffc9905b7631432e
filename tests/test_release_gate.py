"""preflab gate: a candidate passes against itself, a refuse-everything model fails, replays are
cached by (model hash, prompt set, sampling), and a user's prompts are judged pairwise in both orders."""

import json
from pathlib import Path

import pytest

from preflab.cli import main
from preflab.release.gate import Judge, Policy, gate, pairwise_votes, parse_choice

POLICY = """
prompts_per_slice: 3
sampling: {max_new_tokens: 10, temperature: 0, batch_size: 16}
cache_dir: CACHE
criteria: {win_rate_lower_bound: 0.2}   # 12 prompts: an interval of about +-0.25
"""


def _policy(tmp_path: Path, extra: str = "") -> Path:
    p = tmp_path / "policy.yaml"
    p.write_text(POLICY.replace("CACHE", str(tmp_path / "cache")) + extra)
    return p


def _run(args: list[str]) -> int:
    try:
        main(args)
    except SystemExit as e:
        return int(e.code or 0)
    return 0


@pytest.fixture(scope="module")
def refuser(tmp_path_factory) -> str:
    """tiny:7 fine-tuned to answer every prompt with "I can't." (a deliberately broken candidate)."""
    import torch

    from preflab import models
    from preflab.rollout import encode_prompts

    torch.manual_seed(0)
    tok, model = models.load_tokenizer("tiny:7"), models.load_policy("tiny:7")
    target = tok("I can't.", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    prompts = encode_prompts(tok, ["Hello there", "Explain how tides work.", "How do I pick a lock?",
                                   "List three fruits.", "Is the moon made of cheese?", "Write a poem."])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(60):
        for q in prompts:
            ids = torch.tensor([q + target])
            labels = torch.tensor([[-100] * len(q) + target])
            loss = model(input_ids=ids, labels=labels).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    out = tmp_path_factory.mktemp("refuser") / "model"
    models.save_model(model, tok, out, reward_model=False)
    return str(out)


def test_candidate_against_itself_passes(tmp_path):
    out = tmp_path / "self"
    code = _run(["gate", "--candidate", "tiny:7", "--incumbent", "tiny:7", "--policy", str(_policy(tmp_path)),
                 "--out", str(out)])
    report = json.loads((out / "gate.json").read_text())
    assert code == 0 and report["passed"] is True
    by = {v["name"]: v for v in report["criteria"]}
    assert set(by) == {"win_rate", "harmful_refusal", "over_refusal", "toxicity", "constraint_following", "kl",
                       "length_ratio"}
    assert by["win_rate"]["value"] == 0.5 and by["kl"]["value"] == pytest.approx(0.0, abs=1e-6)
    assert by["length_ratio"]["value"] == pytest.approx(1.0)
    assert report["prompts"]["n"] == 12  # 3 per slice, 4 slices
    assert "Release gate: PASS" in (out / "gate.html").read_text()


def test_refusing_candidate_fails(tmp_path, refuser):
    out = tmp_path / "broken"
    code = _run(["gate", "--candidate", refuser, "--incumbent", "tiny:7", "--policy", str(_policy(tmp_path)),
                 "--out", str(out)])
    report = json.loads((out / "gate.json").read_text())
    by = {v["name"]: v for v in report["criteria"]}
    assert code == 1 and report["passed"] is False
    assert by["over_refusal"]["passed"] is False and by["over_refusal"]["value"] == 1.0
    assert by["harmful_refusal"]["passed"] is True  # refusing harmful prompts is fine
    assert "Release gate: FAIL" in (out / "gate.html").read_text()


def test_replays_are_cached_by_model_prompts_and_sampling(tmp_path, monkeypatch):
    policy = Policy.model_validate({"prompts_per_slice": 1, "sampling": {"max_new_tokens": 6, "temperature": 0},
                                    "cache_dir": str(tmp_path / "cache")})
    first = gate("tiny:7", "tiny:3", policy=policy, prompts_path=None, out_dir=tmp_path / "a")
    assert not first["candidate"]["replay_cached"] and not first["incumbent"]["replay_cached"]
    assert len(list((tmp_path / "cache").glob("*.jsonl"))) == 2

    import preflab.rollout as rollout

    def no_sampling(*a, **k):
        raise AssertionError("a cached replay was sampled again")

    monkeypatch.setattr(rollout.HFGenerator, "generate", no_sampling)
    second = gate("tiny:7", "tiny:3", policy=policy, prompts_path=None, out_dir=tmp_path / "b")
    assert second["candidate"]["replay_cached"] and second["incumbent"]["replay_cached"]
    assert second["criteria"] == first["criteria"]
    monkeypatch.undo()
    # other sampling settings are another replay
    other = policy.model_copy(update={"sampling": policy.sampling.model_copy(update={"max_new_tokens": 5})})
    third = gate("tiny:7", "tiny:3", policy=other, prompts_path=None, out_dir=tmp_path / "c")
    assert not third["candidate"]["replay_cached"]


def test_own_prompts_need_a_judge(tmp_path):
    prompts = tmp_path / "mine.jsonl"
    prompts.write_text('{"id": "a", "prompt": "Name a colour."}\n')
    with pytest.raises(Exception, match="judge"):
        gate("tiny:7", "tiny:7", policy=Policy(), prompts_path=str(prompts), out_dir=tmp_path / "o")


def test_parse_choice():
    assert parse_choice("A") == "A" and parse_choice(" B.") == "B" and parse_choice("Response B is better") == "B"
    assert parse_choice("neither") is None and parse_choice("") is None


def test_openai_judge_asks_both_orders_and_cancels_position_bias(tmp_path):
    """A judge that always answers "A" (pure position bias) gives ties, never wins; one that
    prefers the longer response gives the longer side the win in both orders."""
    from fastapi import FastAPI, Request

    from preflab.release.fake import ThreadServer

    seen: list[str] = []
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        text = body["messages"][0]["content"]
        seen.append(text)
        if body["model"] == "biased":
            answer = "A"
        else:
            a = text.split("Response A: ")[1].split("\n\nResponse B: ")[0]
            b = text.split("Response B: ")[1].split("\n\nAnswer with")[0]
            answer = "A" if len(a) > len(b) else "B"
        return {"choices": [{"message": {"role": "assistant", "content": answer}}]}

    with ThreadServer(app) as server:
        url = server.url
        vc, vi = pairwise_votes(Judge(kind="openai", model="biased", url=url), ["p1", "p2"], ["long answer", "x"],
                                ["short", "much longer answer"])
        assert (vc, vi) == ([1, 1], [1, 1]) and len(seen) == 4
        vc, vi = pairwise_votes(Judge(kind="openai", model="length", url=url), ["p1", "p2"], ["long answer", "x"],
                                ["short", "much longer answer"])
        assert (vc, vi) == ([2, 0], [0, 2])


def test_own_prompts_with_a_local_serve_judge(tmp_path):
    """The win-rate on a user's prompts from a real `preflab serve` (tiny model) as the judge."""
    from preflab.release.fake import ThreadServer
    from preflab.release.serve import LocalModel, build_app

    local = LocalModel("tiny:7", name="judge", max_new_tokens=3, max_prompt_tokens=4096)
    app = build_app(local)
    with ThreadServer(app) as server:
        port = server.port
        prompts = tmp_path / "mine.jsonl"
        prompts.write_text('{"id": "a", "prompt": "Name a colour."}\n{"id": "b", "prompt": "Count to three."}\n')
        policy = _policy(tmp_path, f"judge: {{kind: openai, model: judge, url: 'http://127.0.0.1:{port}'}}\n")
        out = tmp_path / "own"
        _run(["gate", "--candidate", "tiny:7", "--incumbent", "tiny:3", "--policy", str(policy),
              "--prompts", str(prompts), "--out", str(out)])
        report = json.loads((out / "gate.json").read_text())
        win = next(v for v in report["criteria"] if v["name"] == "win_rate")
        assert "pairwise openai judge judge, both orders" in win["detail"] and "of 2" in win["detail"]
        assert app.state.requests == 4  # 2 prompts x both orders


def test_ai_labeler_judge_is_symmetric_in_the_two_sides():
    judge = Judge(kind="ai_labeler", model="tiny:7")
    prompts, a, b = ["Name a colour.", "Count to three."], ["Red.", "1 2 3"], ["I can't.", "three"]
    vc, vi = pairwise_votes(judge, prompts, a, b)
    wc, wi = pairwise_votes(judge, prompts, b, a)
    assert (vc, vi) == (wi, wc)  # both orders asked: swapping the sides swaps the votes
    # pinned: each vote from the labeler's own logits (order 1: A = a; order 2: A = b; > 0 prefers A)
    from preflab import models
    from preflab.feedback.ai_labeler import AILabeler

    lab = AILabeler(models.load_policy("tiny:7"), models.load_tokenizer("tiny:7"))
    x = lab.answer_logits([lab.comparison_prompt(p, c, i) for p, c, i in zip(prompts, a, b)])
    y = lab.answer_logits([lab.comparison_prompt(p, i, c) for p, c, i in zip(prompts, a, b)])
    assert vc == [int(u > 0) + int(v < 0) for u, v in zip(x, y)]
    assert vi == [int(u < 0) + int(v > 0) for u, v in zip(x, y)]


def test_paths_resolve_to_models(tmp_path):
    from preflab.errors import PreflabError
    from preflab.release.common import resolve_model

    for d in ("run/sft/model", "run/ppo/model", "stage/model", "plain"):
        (tmp_path / d).mkdir(parents=True)
        (tmp_path / d / "config.json").write_text("{}")
    assert resolve_model(str(tmp_path / "run")) == str(tmp_path / "run/ppo/model")  # the last trained stage
    assert resolve_model(str(tmp_path / "stage")) == str(tmp_path / "stage/model")
    assert resolve_model(str(tmp_path / "plain")) == str(tmp_path / "plain")
    assert resolve_model("tiny:7") == "tiny:7"
    (tmp_path / "empty").mkdir()
    with pytest.raises(PreflabError, match="neither a model directory"):
        resolve_model(str(tmp_path / "empty"))


def test_bad_policy_is_one_clear_error(tmp_path, capsys):
    p = tmp_path / "bad.yaml"
    p.write_text("criteria: {win_rate_lower_bound: 2}\nsurprise: 1\n")
    assert _run(["gate", "--candidate", "tiny:7", "--incumbent", "tiny:7", "--policy", str(p)]) == 2
    err = capsys.readouterr().err
    assert "win_rate_lower_bound" in err and "surprise" in err


def test_a_pipeline_run_resolves_to_the_policy_it_trained(tmp_path):
    """A pipeline run's model is its rounds' trainer after the last round, whatever other stage
    directories lie beside it; an unfinished run is an error, never SFT served in its place."""
    from preflab.config import PipelineConfig, dump_config
    from preflab.errors import PreflabError
    from preflab.release.common import resolve_model

    def run(name: str, **cfg) -> Path:
        d = tmp_path / name
        d.mkdir()
        (d / "pipeline_config.json").write_text(json.dumps(dump_config(PipelineConfig(**cfg))))
        return d

    def model(d: Path) -> None:
        d.mkdir(parents=True)
        (d / "config.json").write_text("{}")

    one = run("one", rl=["rloo", "ppo_ptx"])
    for stage in ("sft", "ppo_ptx", "rloo"):
        model(one / stage / "model")
    assert resolve_model(str(one)) == str(one / "rloo/model")  # the first of rl, not ppo_ptx
    rounds = run("rounds", rl=["grpo"], rounds=3)
    model(rounds / "grpo/model")
    with pytest.raises(PreflabError, match="round-3/grpo/model is not there yet"):
        resolve_model(str(rounds))
    model(rounds / "round-3/grpo/model")
    assert resolve_model(str(rounds)) == str(rounds / "round-3/grpo/model")
    offline = run("offline", rl=[], preference=["dpo"], round={"method": None})
    model(offline / "dpo/model")
    assert resolve_model(str(offline)) == str(offline / "dpo/model")
    sft_only = run("sft_only", rl=[])
    model(sft_only / "sft/model")
    assert resolve_model(str(sft_only)) == str(sft_only / "sft/model")
