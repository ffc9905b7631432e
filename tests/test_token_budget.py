"""Per-prompt token budgets: a prompt row's own ``max_new_tokens`` (long-form tasks) reaches every
sampler (the engine, transformers' generate, generate_texts, the RL stage, labeling, evaluation), a
row stops at its own budget, and a row cut there counts as unfinished."""

import json

import pytest
import torch

from helpers import varied_model
from preflab.data.chat import read_prompts, token_budget, token_budgets
from preflab.data.suite.schema import SuitePrompt, load_prompts
from preflab.errors import DataError
from preflab.generation import engine
from preflab.rollout import (
    HFGenerateGenerator,
    HFGenerator,
    encode_prompts,
    generate_texts,
    response_mask_in_budget,
)

PROMPTS = ["hi", "a much longer prompt with many more words in it", "mid size one"]


@pytest.fixture(scope="module")
def varied():
    return varied_model(0)  # its greedy continuations do not end early (EOS never wins)


def test_row_budgets_from_rows():
    rows = [{"prompt": "a"}, {"prompt": "b", "max_new_tokens": 40}, SuitePrompt(id="c", prompt="c", max_new_tokens=9)]
    assert [token_budget(r, 16) for r in rows] == [16, 40, 9]
    assert token_budgets(rows, 16) == [16, 40, 9]
    assert token_budgets(rows[:1], 16) == 16  # no row of its own: the plain default (caches keyed by it stay valid)


def test_bad_budget_names_file_and_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"id": "a", "prompt": "x"}) + "\n" + json.dumps({"id": "b", "prompt": "y",
                                                                                  "max_new_tokens": 0}) + "\n")
    with pytest.raises(DataError, match=r"p\.jsonl:2.*max_new_tokens"):
        read_prompts(str(path))
    with pytest.raises(DataError, match=r"p\.jsonl:2.*max_new_tokens"):
        load_prompts(path)
    path.write_text(json.dumps({"id": "b", "prompt": "y", "max_new_tokens": "long"}) + "\n")
    with pytest.raises(DataError, match="max_new_tokens"):
        load_prompts(path)


def test_suite_row_round_trips_its_budget():
    p = SuitePrompt(id="a", prompt="Write at length.", max_new_tokens=256)
    assert SuitePrompt.from_dict(p.to_dict()).max_new_tokens == 256
    assert "max_new_tokens" not in SuitePrompt(id="b", prompt="x").to_dict()  # files without budgets are unchanged


def test_engine_stops_each_row_at_its_budget(varied):
    model, tok = varied
    ids = encode_prompts(tok, PROMPTS)
    gen = HFGenerator(model, tok)
    full = gen.generate(ids, max_new_tokens=8, temperature=0.0)
    assert full.lengths.tolist() == [8, 8, 8] and not full.ended.any()
    cut = gen.generate(ids, max_new_tokens=[3, 8, 5], temperature=0.0)
    assert cut.lengths.tolist() == [3, 8, 5]
    for i, b in enumerate([3, 8, 5]):  # the same tokens up to the budget, nothing after it
        assert torch.equal(cut.response[i, :b], full.response[i, :b])
        assert (cut.response_mask[i, b:] == 0).all()
    assert not cut.ended.any()
    with pytest.raises(ValueError, match="3 prompts"):
        gen.generate(ids, max_new_tokens=[3, 8], temperature=0.0)


def test_engine_budgets_per_prompt_with_n_samples(varied):
    model, tok = varied
    ids = encode_prompts(tok, PROMPTS[:2])
    torch.manual_seed(0)
    s = HFGenerator(model, tok).generate(ids, max_new_tokens=[2, 6], temperature=1.0, n=3)
    budget = torch.tensor([2, 2, 2, 6, 6, 6])  # rows p*n .. p*n+n-1 belong to prompt p
    assert (s.lengths <= budget).all()
    assert torch.equal(s.lengths[~s.ended], budget[~s.ended])  # a row that did not end ran to its own budget
    assert int(s.lengths[3:].max()) > 2


def test_sampled_draws_do_not_depend_on_other_rows_budgets(varied):
    model, tok = varied
    ids = encode_prompts(tok, PROMPTS)
    gen = HFGenerator(model, tok)
    torch.manual_seed(5)
    a = gen.generate(ids, max_new_tokens=6, temperature=1.0)
    torch.manual_seed(5)
    b = gen.generate(ids, max_new_tokens=[6, 2, 6], temperature=1.0)
    assert torch.equal(a.response[0], b.response[0]) and torch.equal(a.response[2], b.response[2])
    assert torch.equal(a.response[1, :2], b.response[1, :2])


def test_generate_fallback_cuts_to_the_same_budgets(varied):
    model, tok = varied
    ids = encode_prompts(tok, PROMPTS)
    ours = HFGenerator(model, tok).generate(ids, max_new_tokens=[3, 8, 5], temperature=0.0)
    hf = HFGenerateGenerator(model, tok).generate(ids, max_new_tokens=[3, 8, 5], temperature=0.0)
    assert hf.lengths.tolist() == [3, 8, 5] and not hf.ended.any()
    assert ours.texts == hf.texts


def test_an_eos_past_the_budget_does_not_count():
    eos = 2
    response = torch.tensor([[5, 6, eos, 0], [5, 6, 7, eos]])
    mask, ended = response_mask_in_budget(response, eos, [4, 3])
    assert mask.tolist() == [[1, 1, 1, 0], [1, 1, 1, 0]]
    assert ended.tolist() == [True, False]  # row 1's EOS came after its budget
    mask, ended = response_mask_in_budget(torch.tensor([[1, 2], [3, eos]]), eos, [1], n=2)
    assert mask.tolist() == [[1, 0], [1, 0]] and not ended.any()


def test_generate_texts_uses_each_prompts_budget(varied, tmp_path):
    model, tok = varied
    texts = generate_texts(model, tok, PROMPTS, max_new_tokens=[2, 8, 4], temperature=0.0, batch_size=2, bf16=False)
    full = generate_texts(model, tok, PROMPTS, max_new_tokens=8, temperature=0.0, batch_size=2, bf16=False)
    direct = HFGenerator(model, tok).generate(encode_prompts(tok, PROMPTS), max_new_tokens=[2, 8, 4],
                                              temperature=0.0).texts
    assert texts == direct  # each prompt with its own budget, across batches sorted by length
    assert texts[1] == full[1] and texts[0] != full[0] and texts[2] != full[2]


def test_engine_budget_list_equals_uniform_int(varied):
    model, tok = varied
    ids = encode_prompts(tok, PROMPTS)
    gen = HFGenerator(model, tok)
    a = gen.generate(ids, max_new_tokens=5, temperature=0.0)
    b = gen.generate(ids, max_new_tokens=[5, 5, 5], temperature=0.0)
    assert torch.equal(a.response, b.response) and a.texts == b.texts
    assert engine.per_prompt(4, 2) == [4, 4]
    with pytest.raises(ValueError, match=">= 1"):
        engine.per_prompt([0, 3], 2)


class BudgetSpy:
    """Wraps ``HFGenerator.generate``: records each call's per-prompt budgets (ints spread per prompt)."""

    def __init__(self, monkeypatch):
        self.calls: list[list[int]] = []
        real = HFGenerator.generate

        def spy(gen, prompts, *, max_new_tokens, **kw):
            self.calls.append(engine.per_prompt(max_new_tokens, len(prompts)))
            return real(gen, prompts, max_new_tokens=max_new_tokens, **kw)

        monkeypatch.setattr(HFGenerator, "generate", spy)

    def budgets(self) -> list[int]:
        return sorted(b for call in self.calls for b in call)


def budget_prompts(tmp_path, n=8):
    """Suite rows, every other one with its own budget of 3 tokens."""
    rows = [SuitePrompt(id=f"p{i}", prompt=f"Tell me about topic number {i}.", split="ppo",
                        max_new_tokens=3 if i % 2 else None) for i in range(n)]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r.to_dict()) + "\n" for r in rows))
    return path, rows


def test_rl_stage_samples_each_prompt_to_its_budget(tmp_path, monkeypatch):
    from helpers import letter_reward, letter_tokens, ppo_cfg
    from preflab.stages import rl as rl_stage

    path, _ = budget_prompts(tmp_path)
    cfg = ppo_cfg(tmp_path / "run", f"data.prompts={path}", "train.steps=1", "rollout.max_new_tokens=6")
    spy = BudgetSpy(monkeypatch)
    rl_stage.train(cfg, reward_fn=letter_reward(letter_tokens()))
    assert spy.budgets() == [3] * 4 + [6] * 4


def test_labeling_and_evaluation_sample_each_prompt_to_its_budget(tmp_path, monkeypatch):
    from preflab.evals.evaluate import evaluate
    from preflab.feedback.label_cli import collect_rankings

    _, rows = budget_prompts(tmp_path, n=4)
    spy = BudgetSpy(monkeypatch)
    collect_rankings(model_spec="tiny:", prompts=rows, store_path=tmp_path / "store.sqlite", k=2, max_new_tokens=5,
                     temperature=1.0, overlap=0.0, batch_size=8, bf16=False)
    assert spy.budgets() == [3] * 4 + [5] * 4  # k = 2 candidates of each prompt
    spy.calls.clear()
    evaluate({"sft": "tiny:"}, rows, out_dir=tmp_path / "eval", max_new_tokens=7, batch_size=8, progress=False,
             bf16=False)
    assert spy.budgets() == [3, 3, 7, 7]
