"""The models preflab loads use ``models.sdpa_by_length``: transformers' sdpa attention, with
torch's math kernel on CPU for a pass over a cached prefix under autograd with a small attention
matrix (keys up to ``MATH_MAX_KEYS``, at most ``MATH_MAX_ELEMENTS``: its backward is faster
there), flash otherwise. The kernel changes speed and memory, never the numbers."""

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from preflab import models

FLASH_OPS = ("aten::_scaled_dot_product_flash_attention_for_cpu",)


def padded_batch(length: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 200, (3, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # left padding on one row, right padding on another
    mask[2, -3:] = 0
    return ids, mask


def uses_flash(model, ids, mask, prefix: int = 0, grad: bool = True) -> bool:
    """Whether the flash kernel runs in the forward (and backward) of ``ids[:, prefix:]`` over the
    cached keys of ``ids[:, :prefix]`` (computed without autograd: only the second pass counts)."""
    past = None
    if prefix:
        with torch.no_grad():
            past = model(input_ids=ids[:, :prefix], attention_mask=mask[:, :prefix], use_cache=True).past_key_values
    with torch.set_grad_enabled(grad), profile(activities=[ProfilerActivity.CPU]) as prof:
        out = model(input_ids=ids[:, prefix:], attention_mask=mask, past_key_values=past).logits
        if grad:
            out.float().sum().backward()
    return any(e.key.startswith(FLASH_OPS) for e in prof.key_averages())


@pytest.fixture
def policy(monkeypatch):
    monkeypatch.setattr(models, "MATH_MAX_KEYS", 32)
    model = models.load_policy("tiny:", dropout_off=True)
    assert model.config._attn_implementation == models.ATTENTION
    return model


@pytest.mark.parametrize("length, prefix, flash", [
    (24, 8, False),   # 16 queries over 24 keys, under autograd: math
    (40, 8, True),    # 40 keys > MATH_MAX_KEYS: flash
    (24, 0, True),    # queries == keys (no cached prefix): flash
])
def test_the_kernel_is_chosen_by_the_pass(policy, length, prefix, flash):
    assert uses_flash(policy, *padded_batch(length), prefix=prefix) == flash


def test_forward_only_passes_stay_on_flash(policy):
    assert uses_flash(policy, *padded_batch(24), prefix=8, grad=False)


@pytest.mark.parametrize("spare, flash", [(0, False), (-1, True)])
def test_a_larger_attention_matrix_than_the_budget_stays_on_flash(policy, monkeypatch, spare, flash):
    monkeypatch.setattr(models, "MATH_MAX_ELEMENTS", 3 * 4 * 16 * 24 + spare)  # rows x heads x queries x keys
    assert uses_flash(policy, *padded_batch(24), prefix=8) == flash


def test_scorers_use_it_too(monkeypatch):
    monkeypatch.setattr(models, "MATH_MAX_KEYS", 32)
    scorer = models.load_scorer("tiny:")
    assert scorer.config._attn_implementation == models.ATTENTION
    ids, mask = padded_batch(24)
    with torch.no_grad():
        past = scorer.model(input_ids=ids[:, :8], attention_mask=mask[:, :8], use_cache=True).past_key_values
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        scorer(input_ids=ids[:, 8:], attention_mask=mask, past_key_values=past).logits.sum().backward()
    assert not any(e.key.startswith(FLASH_OPS) for e in prof.key_averages())


@pytest.mark.parametrize("length", [24, 40])
def test_logits_and_gradients_equal_plain_sdpa(monkeypatch, length):
    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(models, "MATH_MAX_KEYS", 32)
    ours = models.load_policy("tiny:", dropout_off=True)
    plain = AutoModelForCausalLM.from_pretrained(models.resolve("tiny:"), attn_implementation="sdpa")
    ids, mask = padded_batch(length)

    def over_prefix(m):  # the second pass over the prefix's cache: math at 24 keys, flash at 40
        past = m(input_ids=ids[:, :8], attention_mask=mask[:, :8], use_cache=True).past_key_values
        return m(input_ids=ids[:, 8:], attention_mask=mask, past_key_values=past).logits

    got, want = over_prefix(ours), over_prefix(plain)
    keep = mask[:, 8:].bool()  # padded positions' outputs are not used by any loss
    torch.testing.assert_close(got[keep], want[keep], rtol=1e-5, atol=1e-5)
    (got[keep].float() ** 2).mean().backward()
    (want[keep].float() ** 2).mean().backward()
    for (name, a), b in zip(ours.named_parameters(), plain.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_saved_models_do_not_name_the_attention(tmp_path):
    """A saved directory loads anywhere (vLLM, plain transformers): the config does not carry our name."""
    model = models.load_policy("tiny:")
    out = models.save_model(model, models.load_tokenizer("tiny:"), tmp_path / "m")
    assert models.ATTENTION not in (out / "config.json").read_text()


def test_the_threshold_can_be_set_from_the_environment():
    """PREFLAB_MATH_MAX_KEYS=0 (memory before speed) puts even short keys on the flash kernel."""
    import os
    import subprocess
    import sys

    code = """
from preflab import models
print(models.MATH_MAX_KEYS)
"""
    for value, want in [("0", "0"), (None, "192")]:
        env = {k: v for k, v in os.environ.items() if k != "PREFLAB_MATH_MAX_KEYS"}
        env |= {"PREFLAB_MATH_MAX_KEYS": value} if value else {}
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
        assert out.stdout.strip() == want


def test_a_model_pickled_into_a_fresh_process_still_runs(tmp_path):
    """Spawned workers (multiprocessing, two-rank tests) get the model by pickle, without the
    parent's registration: the config's attention name registers it on unpickling."""
    import pickle
    import subprocess
    import sys

    model = models.load_policy("tiny:", dropout_off=True)
    ids, mask = padded_batch(24)
    want = model(input_ids=ids, attention_mask=mask).logits
    (tmp_path / "m.pkl").write_bytes(pickle.dumps((model, ids, mask)))
    code = f"""
import pickle, torch
model, ids, mask = pickle.loads(open({str(tmp_path / 'm.pkl')!r}, 'rb').read())
torch.save(model(input_ids=ids, attention_mask=mask).logits, {str(tmp_path / 'out.pt')!r})
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), want)
