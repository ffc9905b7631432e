"""Where samples are laid out, checked by content rather than counts: the k samples of a prompt in
the fallback generator and in the engine (prefill batching and prefix sharing), the RL stage's
episode-to-prompt map, and top-p's boundary (the smallest set whose mass reaches top_p)."""

import json

import pytest
import torch

from helpers import ppo_cfg
from preflab import models, rewards
from preflab.generation import engine, sampling
from preflab.rollout import HFGenerateGenerator, HFGenerator, InverseCDFSampler, encode_prompts
from preflab.stages import rl as rl_stage

PROMPTS = ["hi", "a much longer prompt with many more words in it", "mid size one", "x", "another prompt"]


@pytest.fixture(scope="module")
def tok():
    return models.load_tokenizer("tiny:")


@pytest.fixture(scope="module")
def llama(tok):
    """A tiny random Llama whose greedy continuations differ from prompt to prompt."""
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(models.tiny_model_config(len(tok), initializer_range=0.3))
    return model.eval()


@pytest.fixture(scope="module")
def gpt2(tok):
    """An architecture the engine does not run: HFGenerator falls back to model.generate."""
    from transformers import AutoModelForCausalLM, GPT2Config

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(GPT2Config(
            vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2, initializer_range=0.5,
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    return model.eval()


def query_of(s, r):
    return s.query[r][s.query_mask[r].bool()].tolist()


def response_of(s, r):
    return s.response[r][s.response_mask[r].bool()].tolist()


def greedy_alone(gen, prompt, max_new_tokens):
    """The greedy response of one prompt generated on its own (no batch, no padding)."""
    return response_of(gen.generate([prompt], max_new_tokens=max_new_tokens, temperature=0.0), 0)


# ---------------------------------------------------------------------------------------------
# The k samples of a prompt
# ---------------------------------------------------------------------------------------------


def test_fallback_generator_gives_k_contiguous_rows_per_prompt_by_content(gpt2, tok):
    prompts = encode_prompts(tok, PROMPTS[:3])
    gen = HFGenerator(gpt2, tok)
    s = gen.generate(prompts, max_new_tokens=6, temperature=0.0, n=3)
    assert gen.engine.fallback_reason is not None  # the generate fallback ran
    alone = [greedy_alone(HFGenerateGenerator(gpt2, tok), p, 6) for p in prompts]
    assert len({tuple(a) for a in alone}) == 3  # the prompts' answers differ: the layout is visible
    for r in range(9):
        assert query_of(s, r) == prompts[r // 3], r
        assert response_of(s, r) == alone[r // 3], r
    # sampled: row r still belongs to prompt r // n
    torch.manual_seed(0)
    t = HFGenerateGenerator(gpt2, tok).generate(prompts, max_new_tokens=4, temperature=1.0, n=2)
    assert [query_of(t, r) for r in range(6)] == [p for p in prompts for _ in range(2)]


@pytest.mark.parametrize("share_prefix,max_batch", [(True, 64), (True, 3), (False, 4)])
def test_engine_rows_hold_their_prompts_greedy_answer_whatever_the_batching(llama, tok, share_prefix, max_batch):
    """Mixed-length prompts, one of them repeated, n = 2: output row r holds prompt r // n and that
    prompt's greedy answer as generated alone, whether prompts share a prefill and however the
    rows are cut into micro-batches."""
    # "mid size one" and "mid size two": two prompts of the same token length
    prompts = encode_prompts(tok, [PROMPTS[0], PROMPTS[1], PROMPTS[2], "mid size two", PROMPTS[0], PROMPTS[3]])
    assert len(prompts[2]) == len(prompts[3]) and prompts[2] != prompts[3]
    gen = HFGenerator(llama, tok, share_prefix=share_prefix, max_batch=max_batch)
    alone = {tuple(p): greedy_alone(HFGenerator(llama, tok), p, 10) for p in prompts}
    assert len({tuple(a) for a in alone.values()}) == 5
    s = gen.generate(prompts, max_new_tokens=10, temperature=0.0, n=2)
    assert gen.engine.fallback_reason is None
    for r in range(12):
        assert query_of(s, r) == prompts[r // 2], r
        assert response_of(s, r) == alone[tuple(prompts[r // 2])], r


def test_prefill_batches_are_whole_groups_within_max_batch_and_each_prompt_prefilled_once(llama, tok, monkeypatch):
    calls, prefills = [], []
    real_decode, real_forward = engine.Engine._decode, engine.forward

    def spy_decode(self, w, rows, groups, *a):
        calls.append([list(g) for g in groups])
        return real_decode(self, w, rows, groups, *a)

    def spy_forward(w, ids, pos, cache, cos, sin):
        if ids.shape[1] > 1:
            prefills.append(ids.shape[0])
        return real_forward(w, ids, pos, cache, cos, sin)

    monkeypatch.setattr(engine.Engine, "_decode", spy_decode)
    monkeypatch.setattr(engine, "forward", spy_forward)
    # 3 distinct prompts; the repeated one and "mid size two" have the same token length
    prompts = encode_prompts(tok, [PROMPTS[2], "mid size two", PROMPTS[2], PROMPTS[0]])
    rows, _ = engine.Engine(llama, tok, max_batch=6).generate(prompts, max_new_tokens=3, temperature=0.0, n=2)
    assert rows == [p for p in prompts for _ in range(2)]
    out_rows = sorted(r for c in calls for g in c for r in g)
    assert out_rows == list(range(8))  # every output row decoded exactly once
    assert all(sum(map(len, c)) <= 6 for c in calls)
    for c in calls:  # a group is one distinct prompt: all its rows (n samples and repeats) together
        for g in c:
            assert len({tuple(rows[r]) for r in g}) == 1
    assert sorted(len(g) for c in calls for g in c) == [2, 2, 4]  # PROMPTS[2]: 2 repeats x n = 2
    assert sum(prefills) == 3  # one prefill row per distinct prompt
    calls.clear()
    prefills.clear()
    engine.Engine(llama, tok, max_batch=6, share_prefix=False).generate(prompts, max_new_tokens=3, temperature=0.0,
                                                                         n=2)
    assert sum(prefills) == 8 and all(len(g) == 1 for c in calls for g in c)


# ---------------------------------------------------------------------------------------------
# Top-p's boundary
# ---------------------------------------------------------------------------------------------


def _kept(logits, top_p):
    return torch.isfinite(sampling.process(logits, temperature=1.0, top_p=top_p))[0].tolist()


def test_top_p_keeps_the_smallest_set_whose_mass_reaches_top_p_at_the_exact_boundary():
    logits = torch.tensor([[0.3, 2.0, -1.0, 1.0]])  # sorted: tokens 1, 3, 0, 2
    ps = torch.sort(logits.float().softmax(-1)[0], descending=True).values
    above = ps.cumsum(-1) - ps  # the mass above each token, as the code computes it
    two = float(above[2])  # the mass of the top two tokens
    assert _kept(logits, two) == [False, True, False, True]  # reached exactly: the third is out
    assert _kept(logits, two + 1e-6) == [True, True, False, True]  # just above: the third is needed
    assert _kept(logits, two - 1e-6) == [False, True, False, True]
    one = float(above[1])
    assert _kept(logits, one) == [False, True, False, False]
    assert _kept(logits, one + 1e-6) == [False, True, False, True]
    assert _kept(logits, 1.0) == [True, True, True, True]
    assert _kept(logits, 1e-9) == [False, True, False, False]  # the most likely token always stays


def test_rollout_sampler_has_the_same_top_p_boundary():
    logits = torch.tensor([[0.3, 2.0, -1.0, 1.0]])
    ps = torch.sort(logits.softmax(-1)[0], descending=True).values
    two = float((ps.cumsum(-1) - ps)[2])
    for top_p, want in ((two, [0.0, 1.0, 0.0, 1.0]), (two + 1e-6, [1.0, 1.0, 0.0, 1.0])):
        torch.manual_seed(0)
        out = InverseCDFSampler(1.0, top_p=top_p)(None, logits.expand(4000, -1).clone())
        drawn = (torch.bincount(out.argmax(1), minlength=4) > 0).float().tolist()
        assert drawn == want, top_p


def test_engine_passes_top_p_and_top_k_to_the_sampler(llama, tok):
    """top_p -> 0 (or top_k = 1) leaves only the most likely token: sampling at T = 1 is greedy."""
    prompts = encode_prompts(tok, PROMPTS[:3])
    greedy = HFGenerator(llama, tok).generate(prompts, max_new_tokens=8, temperature=0.0, n=2)
    for kw in ({"top_p": 1e-6}, {"top_k": 1}):
        torch.manual_seed(0)
        s = HFGenerator(llama, tok).generate(prompts, max_new_tokens=8, temperature=1.0, n=2, **kw)
        assert torch.equal(s.response, greedy.response), kw
    torch.manual_seed(0)
    free = HFGenerator(llama, tok).generate(prompts, max_new_tokens=8, temperature=1.0, n=2)
    assert not torch.equal(free.response, greedy.response)


# ---------------------------------------------------------------------------------------------
# The RL stage: episode j belongs to the prompt whose tokens it was sampled from
# ---------------------------------------------------------------------------------------------


def test_rl_episodes_map_to_the_prompts_they_were_sampled_from(tmp_path, tok, monkeypatch):
    seen = {}

    def reward_fn(s):
        seen["queries"] = [tok.decode(s.query[r][s.query_mask[r].bool()]) for r in range(s.query.shape[0])]
        seen["texts"] = list(s.texts)
        return torch.zeros(s.query.shape[0])

    def fake_sum(funcs, prompt_rows, texts):
        seen["rows"] = list(prompt_rows)
        seen["reward_texts"] = list(texts)
        return [0.0] * len(texts)

    monkeypatch.setattr(rewards, "weighted_sum", fake_sum)
    cfg = ppo_cfg(tmp_path, "algo.estimator=rloo", "rollout.samples_per_prompt=2", "rollout.batch_size=4",
                  "ppo.minibatch_size=4", "ppo.epochs=1", "train.steps=1", "rollout.max_new_tokens=3",
                  "rewards.funcs=[{fn: 'preflab.rewards:constraints', weight: 1.0}]")
    rl_stage.train(cfg, reward_fn=reward_fn)
    from preflab.data.chat import read_prompts

    rows = read_prompts(cfg.data.prompts, cfg.data.split)
    assert len(seen["queries"]) == len(seen["rows"]) == 8
    assert seen["reward_texts"] == seen["texts"]
    prompts_of_queries = [next(i for i, r in enumerate(rows) if r["prompt"] in q) for q in seen["queries"]]
    assert len(set(prompts_of_queries)) == 4  # four prompts, two episodes each, in contiguous pairs
    assert prompts_of_queries[0::2] == prompts_of_queries[1::2]
    for j, (q, row) in enumerate(zip(seen["queries"], seen["rows"])):
        assert row["prompt"] in q, j  # the reward functions read episode j's own prompt
    logged = [json.loads(x) for x in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert [x["prompt_index"] for x in logged] == prompts_of_queries
    assert [x["response"] for x in logged] == seen["texts"]



