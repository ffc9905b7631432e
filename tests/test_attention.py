"""The models preflab loads use ``models.sdpa_by_length``: transformers' sdpa attention, with
torch's math kernel on CPU for a small attention matrix under autograd (keys up to
``MATH_MAX_KEYS``, at most ``MATH_MAX_ELEMENTS``: its backward is faster there), flash otherwise.
The kernel changes speed and memory, never the numbers."""

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


def ops_of_forward_and_backward(model, ids, mask) -> set[str]:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        model(input_ids=ids, attention_mask=mask).logits.float().sum().backward()
    return {e.key for e in prof.key_averages()}


@pytest.mark.parametrize("length, flash", [(24, False), (40, True)])
def test_the_kernel_is_chosen_by_key_length(monkeypatch, length, flash):
    monkeypatch.setattr(models, "MATH_MAX_KEYS", 32)
    model = models.load_policy("tiny:", dropout_off=True)
    assert model.config._attn_implementation == models.ATTENTION
    ops = ops_of_forward_and_backward(model, *padded_batch(length))
    assert any(op.startswith(FLASH_OPS) for op in ops) == flash, sorted(ops)


@pytest.mark.parametrize("spare, flash", [(0, False), (-1, True)])
def test_a_larger_attention_matrix_than_the_budget_stays_on_flash(monkeypatch, spare, flash):
    monkeypatch.setattr(models, "MATH_MAX_KEYS", 32)
    monkeypatch.setattr(models, "MATH_MAX_ELEMENTS", 3 * 4 * 24 * 24 + spare)  # rows x heads x queries x keys
    model = models.load_policy("tiny:", dropout_off=True)
    ops = ops_of_forward_and_backward(model, *padded_batch(24))
    assert any(op.startswith(FLASH_OPS) for op in ops) == flash


def test_forward_only_passes_stay_on_flash(monkeypatch):
    monkeypatch.setattr(models, "MATH_MAX_KEYS", 32)
    model = models.load_policy("tiny:", dropout_off=True)
    ids, mask = padded_batch(24)
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        model(input_ids=ids, attention_mask=mask)
    assert any(e.key.startswith(FLASH_OPS) for e in prof.key_averages())


def test_scorers_use_it_too(monkeypatch):
    monkeypatch.setattr(models, "MATH_MAX_KEYS", 32)
    scorer = models.load_scorer("tiny:")
    assert scorer.config._attn_implementation == models.ATTENTION
    ids, mask = padded_batch(24)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        scorer(input_ids=ids, attention_mask=mask).logits.sum().backward()
    assert not any(e.key.startswith(FLASH_OPS) for e in prof.key_averages())


@pytest.mark.parametrize("length", [24, 40])
def test_logits_and_gradients_equal_plain_sdpa(monkeypatch, length):
    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(models, "MATH_MAX_KEYS", 32)
    ours = models.load_policy("tiny:", dropout_off=True)
    plain = AutoModelForCausalLM.from_pretrained(models.resolve("tiny:"), attn_implementation="sdpa")
    ids, mask = padded_batch(length)
    got, want = (m(input_ids=ids, attention_mask=mask).logits for m in (ours, plain))
    keep = mask.bool()  # padded positions' outputs are not used by any loss
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
