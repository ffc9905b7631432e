"""Rollout: sampling layout, masks after EOS, and scoring passes that see what the sampler saw."""

import json

import torch

from preflab import models
from preflab.rl import selective_log_softmax
from preflab.rollout import HFGenerator, InverseCDFSampler, Samples, encode_prompts, response_mask_after_stop
from preflab.scoring import critic_values, response_logits, reward_scores


def test_mask_stops_after_first_stop_token():
    resp = torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8], [2, 5, 2, 6]])
    mask, ended = response_mask_after_stop(resp, stop_id=2)
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert ended.tolist() == [True, False, True]
    # truncation token after index 2 (lm-human-preferences truncate_after)
    mask, ended = response_mask_after_stop(resp, stop_id=2, start=2)
    assert mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 0]]
    assert ended.tolist() == [True, False, True]


def test_generation_layout_and_logprobs_match_the_sampler(tiny):
    """Log-probs recomputed by one forward pass over left-padded query + right-padded response
    equal the sampler's own (generate's output scores): positions and masks line up."""
    model, tok = tiny
    prompts = encode_prompts(tok, ["hi", "a longer prompt here", "mid size"])
    torch.manual_seed(1)
    gen = HFGenerator(model, tok)
    s = gen.generate(prompts, max_new_tokens=12, temperature=1.0)
    assert s.query.shape[0] == 3 and s.response.shape == s.response_mask.shape
    assert (s.query_mask.sum(1) == torch.tensor([len(p) for p in prompts])).all()
    # Greedy decoding reproduced from the forward pass: argmax of recomputed logits == tokens.
    g = gen.generate(prompts, max_new_tokens=10, temperature=0.0)
    with torch.no_grad():
        logits = response_logits(model, g, temperature=1.0)
    pred = logits.argmax(-1)
    m = g.response_mask.bool()
    assert torch.equal(pred[m], g.response[m])
    lp = selective_log_softmax(logits, g.response)
    assert torch.isfinite(lp[m]).all()


def _draw(sampler, scores, n=40000):
    torch.manual_seed(0)
    out = sampler(None, scores.expand(n, -1).clone())
    assert torch.equal(torch.isfinite(out).sum(1), torch.ones(n, dtype=torch.long))  # one token per row
    return torch.bincount(out.argmax(1), minlength=scores.shape[1]).float() / n


def test_inverse_cdf_sampler_draws_softmax_over_temperature():
    # Five tokens, logits [2, 1, 0, -1, -inf], T = 0.5: p ∝ exp([4, 2, 0, -2]) / sum
    #   = [0.8668, 0.1173, 0.0159, 0.0021, 0]; 40,000 draws: standard error <= 0.0017.
    scores = torch.tensor([[2.0, 1.0, 0.0, -1.0, float("-inf")]])
    freq = _draw(InverseCDFSampler(0.5), scores)
    torch.testing.assert_close(freq, torch.tensor([0.8668, 0.1173, 0.0159, 0.0021, 0.0]), atol=0.006, rtol=0)
    assert freq[4] == 0  # a masked token (e.g. EOS under min_new_tokens) is never drawn


def test_inverse_cdf_sampler_top_k_and_top_p():
    # p = [0.5, 0.3, 0.15, 0.05] at T = 1. top_k=2: [0.625, 0.375, 0, 0].
    scores = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    torch.testing.assert_close(_draw(InverseCDFSampler(1.0, top_k=2), scores),
                               torch.tensor([0.625, 0.375, 0.0, 0.0]), atol=0.01, rtol=0)
    # top_p=0.7: mass above token 1 is 0.5 < 0.7 (kept), above token 2 is 0.8 (dropped): [0.625, 0.375, 0, 0].
    # Order must not matter: the same probabilities shuffled.
    perm = torch.tensor([2, 0, 3, 1])
    freq = _draw(InverseCDFSampler(1.0, top_p=0.7), scores[:, perm])
    torch.testing.assert_close(freq, torch.tensor([0.0, 0.625, 0.0, 0.375]), atol=0.01, rtol=0)


def test_seeded_sampling_repeats(tiny):
    model, tok = tiny
    prompts = encode_prompts(tok, ["hi", "a longer prompt here"])
    gen = HFGenerator(model, tok)
    runs = []
    for _ in range(2):
        torch.manual_seed(5)
        runs.append(gen.generate(prompts, max_new_tokens=8, temperature=1.0).response)
    assert torch.equal(runs[0], runs[1])


def test_temperature_divides_training_logits(tiny):
    model, tok = tiny
    s = HFGenerator(model, tok).generate(encode_prompts(tok, ["x"]), max_new_tokens=5, temperature=1.0)
    with torch.no_grad():
        l1, l2 = response_logits(model, s, 1.0), response_logits(model, s, 2.0)
    torch.testing.assert_close(l2, l1 / 2)


def test_reward_and_values_read_the_right_positions(tiny):
    """The reward of a row depends only on its own real tokens: adding padding (another, longer
    row in the batch) does not change it; values exist for every response column."""
    _, tok = tiny
    rm = models.load_scorer("tiny:")
    a = encode_prompts(tok, ["short"])[0]
    b = encode_prompts(tok, ["a much much longer prompt"])[0]
    from preflab.rollout import left_pad

    def batch(prompts, responses):
        q, qm = left_pad(prompts, tok.pad_token_id)
        width = max(len(r) for r in responses)
        resp = torch.full((len(responses), width), tok.pad_token_id)
        rm_ = torch.zeros_like(resp)
        for i, r in enumerate(responses):
            resp[i, :len(r)] = torch.tensor(r)
            rm_[i, :len(r)] = 1
        return Samples(q, qm, resp, rm_, torch.ones(len(responses), dtype=torch.bool), [""] * len(responses))

    r1 = [10, 11, 12, 2]
    r2 = [10, 11, 12, 13, 14, 15, 16, 2]
    with torch.no_grad():
        alone = reward_scores(rm, batch([a], [r1]))
        together = reward_scores(rm, batch([a, b], [r1, r2]))
        v = critic_values(rm, batch([a, b], [r1, r2]))
    torch.testing.assert_close(alone[0], together[0], rtol=1e-4, atol=1e-5)
    assert v.shape == (2, 8)
    # Stored normalisation is applied.
    rm.config.preflab_reward_bias = 3.0
    with torch.no_grad():
        shifted = reward_scores(rm, batch([a], [r1]))
    torch.testing.assert_close(shifted, alone + 3.0)


def test_generate_cli(tmp_path):
    from preflab.cli import main

    p = tmp_path / "p.jsonl"
    p.write_text(json.dumps({"id": "a", "prompt": "hello"}) + "\n" + json.dumps({"id": "b", "messages": [{"role": "user", "content": "yo"}]}) + "\n")
    out = tmp_path / "o.jsonl"
    main(["generate", "--model", "tiny:", "--prompts", str(p), "--out", str(out), "--max-new-tokens", "5"])
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["a", "b"] and all(isinstance(r["response"], str) for r in rows)
