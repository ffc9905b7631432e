"""preflab's sampling engine (generation/engine.py) against transformers' generate: greedy tokens,
EOS and min-new-tokens, sampling frequencies, prefix sharing, the n-samples row layout, LoRA."""

import math

import pytest
import torch

from helpers import varied_model
from preflab import models
from preflab.generation import engine, sampling
from preflab.rollout import HFGenerator, encode_prompts, left_pad

PROMPTS = ["hi", "a much longer prompt with many more words in it", "mid size one", "x", "another prompt"]


@pytest.fixture(scope="module")
def varied():
    return varied_model(0)


class EOSAs:
    """The tokenizer with another token id playing EOS (one the model emits often), so rows end early."""

    def __init__(self, tok, eos_id):
        self.tok, self.eos_token_id, self.pad_token_id = tok, eos_id, tok.pad_token_id

    def decode(self, ids, **kw):
        return self.tok.decode(ids, **kw)


def hf_generate(model, prompts, tok, *, max_new_tokens, min_new_tokens=0, bf16=False):
    """Greedy ``model.generate`` on left-padded prompts: (B, T) responses, pad after EOS."""
    q, m = left_pad(prompts, tok.pad_token_id)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = model.generate(input_ids=q, attention_mask=m, do_sample=False, max_new_tokens=max_new_tokens,
                             min_new_tokens=min_new_tokens, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id, temperature=None, top_k=None, top_p=None)
    return out[:, q.shape[1]:]


def engine_tokens(s):
    """Response ids with padding after EOS (as generate pads them)."""
    return torch.where(s.response_mask.bool(), s.response, torch.full_like(s.response, -1))


def same_as_generate(s, ref, pad):
    ours = engine_tokens(s)
    ref = torch.where(ref == pad, torch.full_like(ref, -1), ref)  # generate pads finished rows with pad
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("max_batch", [64, 2])
def test_greedy_equals_generate_on_mixed_length_prompts(varied, max_batch):
    model, tok = varied
    prompts = encode_prompts(tok, PROMPTS)
    assert len({len(p) for p in prompts}) == len(prompts)  # mixed lengths: left padding in play
    gen = HFGenerator(model, tok, max_batch=max_batch)
    s = gen.generate(prompts, max_new_tokens=24, temperature=0.0)
    assert gen.engine.fallback_reason is None  # the engine ran, not the generate fallback
    same_as_generate(s, hf_generate(model, prompts, tok, max_new_tokens=24), tok.pad_token_id)
    assert len({tuple(r.tolist()) for r in s.response}) == len(prompts)  # the test model is not degenerate
    assert (s.query_mask.sum(1) == torch.tensor([len(p) for p in prompts])).all()


def test_greedy_equals_generate_under_bf16_autocast(varied):
    """bf16: the engine's packed bf16 matmuls, fp32 residual stream and KV-group attention round
    like transformers' modules under autocast, so tokens are equal, not just close."""
    model, tok = varied
    prompts = encode_prompts(tok, PROMPTS)
    gen = HFGenerator(model, tok, bf16=True)
    s = gen.generate(prompts, max_new_tokens=24, temperature=0.0)
    assert gen.engine.fallback_reason is None
    same_as_generate(s, hf_generate(model, prompts, tok, max_new_tokens=24, bf16=True), tok.pad_token_id)


def frequent_token(model, tok, prompts):
    s = HFGenerator(model, tok).generate(prompts, max_new_tokens=24, temperature=0.0)
    counts = torch.bincount(s.response[:, 2:].flatten())
    return int(counts.argmax())


def test_eos_stops_rows_and_finished_rows_leave_the_batch(varied):
    model, tok = varied
    prompts = encode_prompts(tok, PROMPTS)
    etok = EOSAs(tok, frequent_token(model, tok, prompts))
    gen = HFGenerator(model, etok, compact_fraction=0.0)  # drop finished rows at once
    s = gen.generate(prompts, max_new_tokens=24, temperature=0.0)
    same_as_generate(s, hf_generate(model, prompts, etok, max_new_tokens=24), tok.pad_token_id)
    lengths = s.lengths.tolist()
    assert min(lengths) < 24 and len(set(lengths)) > 1  # rows ended at different steps
    for row, mask, ended, n in zip(s.response, s.response_mask, s.ended, lengths):
        assert bool(ended) == (row[n - 1] == etok.eos_token_id)  # ended rows end with EOS...
        assert (row[:n - 1] != etok.eos_token_id).all()  # ...their first
        assert (row[n:] == tok.pad_token_id).all() and mask[:n].all() and not mask[n:].any()


def test_min_new_tokens_masks_eos(varied):
    model, tok = varied
    prompts = encode_prompts(tok, PROMPTS)
    etok = EOSAs(tok, frequent_token(model, tok, prompts))
    s = HFGenerator(model, etok).generate(prompts, max_new_tokens=24, min_new_tokens=10, temperature=0.0)
    assert (s.lengths >= 10).all()
    assert (s.response[:, :9] != etok.eos_token_id).all()
    same_as_generate(s, hf_generate(model, prompts, etok, max_new_tokens=24, min_new_tokens=10), tok.pad_token_id)
    # with sampling too: no EOS before min_new_tokens
    torch.manual_seed(0)
    s = HFGenerator(model, etok).generate(prompts, max_new_tokens=12, min_new_tokens=6, temperature=2.0, n=8)
    assert (s.lengths >= 6).all() and (s.response[:, :5] != etok.eos_token_id).all()


def next_token_probs(model, prompt, temperature):
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt])).logits[0, -1].float()
    return (logits / temperature).softmax(-1)


def test_sampled_token_frequencies_match_softmax_over_temperature(varied):
    """4,000 samples of one prompt's first token (one prefill shared by all of them):
    frequencies within 5 standard errors of softmax(logits / T) for every token."""
    model, tok = varied
    prompt = encode_prompts(tok, ["tell me"])[0]
    n, T = 4000, 0.8
    torch.manual_seed(0)
    s = HFGenerator(model, tok, max_batch=n).generate([prompt], max_new_tokens=1, temperature=T, n=n)
    freq = torch.bincount(s.response[:, 0], minlength=len(tok)).float() / n
    p = next_token_probs(model, prompt, T)[:len(freq)]
    assert p.max() < 0.5 and (p > 0.01).sum() >= 10  # a spread-out distribution
    se = (p * (1 - p) / n).sqrt()
    assert ((freq - p).abs() <= 5 * se + 1e-3).all(), (freq - p).abs().max()
    # top-k: only the k most likely tokens, renormalised
    s = HFGenerator(model, tok, max_batch=n).generate([prompt], max_new_tokens=1, temperature=T, top_k=3, n=n)
    freq = torch.bincount(s.response[:, 0], minlength=len(p)).float() / n
    top = p.topk(3).indices
    q = torch.zeros_like(p)
    q[top] = p[top] / p[top].sum()
    assert freq[q == 0].sum() == 0
    assert ((freq - q).abs() <= 5 * (q * (1 - q) / n).sqrt() + 1e-3).all()


def test_counter_based_uniforms_are_uniform_and_independent():
    rows = torch.arange(200_000)
    u0, u1 = sampling.uniforms(123, rows, 0), sampling.uniforms(123, rows, 1)
    assert u0.dtype == torch.float64 and (u0 >= 0).all() and (u0 < 1).all()
    hist = torch.histc(u0.float(), bins=20, min=0, max=1) / len(rows)
    assert (hist - 0.05).abs().max() < 0.003  # 5 sigma ~ 0.0024
    assert abs(float(torch.corrcoef(torch.stack([u0, u1]))[0, 1])) < 0.01
    assert abs(float(torch.corrcoef(torch.stack([u0[:-1], u0[1:]]))[0, 1])) < 0.01  # neighbouring rows
    assert not torch.equal(u0, sampling.uniforms(124, rows, 0))
    assert torch.equal(sampling.uniforms(123, rows[5:9], 1), u1[5:9])  # a row's draw ignores its batch


def test_draw_is_inverse_cdf_of_softmax():
    logits = torch.tensor([[2.0, 1.0, 0.0, float("-inf")]])
    p = logits.softmax(-1)[0]
    cdf = p.double().cumsum(0)
    u = torch.tensor([0.0, float(cdf[0]) - 1e-6, float(cdf[0]) + 1e-6, float(cdf[1]) + 1e-6, 1 - 1e-12],
                     dtype=torch.float64)
    assert sampling.draw(logits.expand(5, -1), u).tolist() == [0, 0, 1, 2, 2]  # never the -inf token


def test_prefix_shared_samples_equal_unshared_ones(varied):
    model, tok = varied
    prompts = encode_prompts(tok, PROMPTS[:3])
    runs = {}
    for name, opts, ps, n in [("shared", {}, prompts, 4),
                              ("unshared", {"share_prefix": False}, prompts, 4),
                              ("repeated", {}, [p for p in prompts for _ in range(4)], 1),
                              ("small batches", {"max_batch": 3}, prompts, 4)]:
        torch.manual_seed(7)
        runs[name] = HFGenerator(model, tok, **opts).generate(ps, max_new_tokens=16, temperature=1.0, n=n)
    for name, s in runs.items():
        assert torch.equal(s.response, runs["shared"].response), name
        assert s.texts == runs["shared"].texts, name
    # the samples of one prompt differ from each other (one seed, different rows)
    assert len({tuple(r.tolist()) for r in runs["shared"].response[:4]}) > 1
    torch.manual_seed(8)
    other = HFGenerator(model, tok).generate(prompts, max_new_tokens=16, temperature=1.0, n=4)
    assert not torch.equal(other.response, runs["shared"].response)


def test_n_samples_are_contiguous_rows(varied):
    model, tok = varied
    prompts = encode_prompts(tok, PROMPTS[:3])
    gen = HFGenerator(model, tok)
    s = gen.generate(prompts, max_new_tokens=8, temperature=0.0, n=3)
    one = gen.generate(prompts, max_new_tokens=8, temperature=0.0)
    assert s.query.shape[0] == 9 and len(s.texts) == 9
    for p in range(3):
        for j in range(3):
            r = p * 3 + j
            assert s.query[r][s.query_mask[r].bool()].tolist() == prompts[p]
            assert s.texts[r] == one.texts[p]  # greedy: every sample of a prompt is its greedy answer


def test_lora_model_and_weight_updates(varied):
    """A peft-wrapped policy: the engine merges the active adapters (tokens equal generate's on the
    wrapped model) and rebuilds its weight snapshot after an in-place update (an optimizer step)."""
    import copy

    model, tok = varied
    lm = models.wrap_lora(copy.deepcopy(model), models.LoraOptions(r=4, alpha=8.0))
    with torch.no_grad():
        for name, prm in lm.named_parameters():
            if "lora_B" in name:
                prm.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    prompts = encode_prompts(tok, PROMPTS)
    gen = HFGenerator(lm, tok)
    s = gen.generate(prompts, max_new_tokens=16, temperature=0.0)
    assert gen.engine.fallback_reason is None
    same_as_generate(s, hf_generate(lm, prompts, tok, max_new_tokens=16), tok.pad_token_id)
    plain = HFGenerator(model, tok).generate(prompts, max_new_tokens=16, temperature=0.0)
    assert not torch.equal(plain.response, s.response)  # the adapters matter
    first = gen.engine.weights()
    assert gen.engine.weights() is first  # unchanged parameters: snapshot reused
    with torch.no_grad():
        for name, prm in lm.named_parameters():
            if "lora_A" in name:
                prm.mul_(-1.5)  # in place, like optimizer.step()
    assert gen.engine.weights() is not first
    s2 = gen.generate(prompts, max_new_tokens=16, temperature=0.0)
    same_as_generate(s2, hf_generate(lm, prompts, tok, max_new_tokens=16), tok.pad_token_id)
    with lm.disable_adapter():  # adapters off: the base model's tokens
        s3 = HFGenerator(lm, tok).generate(prompts, max_new_tokens=16, temperature=0.0)
    assert torch.equal(s3.response, plain.response)


def test_a_fused_optimizer_step_refreshes_the_snapshot(varied):
    """Fused AdamW (the RL stage's optimizer) updates parameters without bumping their version
    counters: the engine must still sample from the updated weights."""
    import copy

    model, tok = varied
    policy = copy.deepcopy(model)
    prompts = encode_prompts(tok, PROMPTS)
    gen = HFGenerator(policy, tok)
    before = gen.generate(prompts, max_new_tokens=12, temperature=0.0)
    opt = torch.optim.AdamW(policy.parameters(), lr=0.05, fused=True)
    for p in policy.parameters():
        p.grad = torch.randn_like(p)
    versions = [p._version for p in policy.parameters()]
    opt.step()
    assert [p._version for p in policy.parameters()] == versions  # why a version check alone is not enough
    after = gen.generate(prompts, max_new_tokens=12, temperature=0.0)
    assert not torch.equal(after.response, before.response)
    same_as_generate(after, hf_generate(policy, prompts, tok, max_new_tokens=12), tok.pad_token_id)


def test_other_architectures_fall_back_to_generate():
    from transformers import AutoModelForCausalLM, GPT2Config

    tok = models.load_tokenizer("tiny:")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2,
                                                        bos_token_id=1, eos_token_id=2, pad_token_id=0)).eval()
    prompts = encode_prompts(tok, PROMPTS[:2])
    gen = HFGenerator(model, tok)
    s = gen.generate(prompts, max_new_tokens=5, temperature=1.0, n=2)
    assert gen.engine.fallback_reason is not None and "gpt2" in gen.engine.fallback_reason
    assert s.query.shape[0] == 4 and s.response.shape[0] == 4


def test_snapshot_reads_every_layer(varied):
    model, _ = varied
    w = engine.snapshot(model, bf16=False)
    assert len(w.layers) == model.config.num_hidden_layers
    h, kv, d = w.n_heads, w.n_kv, w.head_dim
    assert w.layers[0].qkv.shape == ((h + 2 * kv) * d, model.config.hidden_size)
    assert math.isclose(w.eps, model.config.rms_norm_eps)


@pytest.mark.slow
def test_bf16_greedy_equals_generate_on_the_real_model():
    """SmolLM2-135M-Instruct, bf16 autocast over fp32 weights (rollout, labeling) and bf16 weights
    (evaluation): the engine's greedy tokens equal generate's."""
    spec = "bundled:smollm2-135m-instruct"
    tok = models.load_tokenizer(spec)
    prompts = encode_prompts(tok, ["What is the capital of France?", "Write a haiku about the sea.", "hi",
                                   "List three prime numbers and explain why each is prime, briefly."])
    for dtype in ("fp32", "bf16"):
        model = models.load_policy(spec, dtype=dtype).eval()
        gen = HFGenerator(model, tok, bf16=True)
        s = gen.generate(prompts, max_new_tokens=48, temperature=0.0)
        assert gen.engine.fallback_reason is None
        same_as_generate(s, hf_generate(model, prompts, tok, max_new_tokens=48, bf16=True), tok.pad_token_id)
