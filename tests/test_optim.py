"""The learning-rate schedule and the fused AdamW against torch's for-loop AdamW."""

import math

import pytest
import torch

from preflab.config import OptimSection
from preflab.optim import adamw, lr_factor, schedule


def test_lr_factor_hand_computed():
    """Warm-up 4 steps from 0.1: 0.1, 0.325, 0.55, 0.775; then cosine from 1 to 0.1 over 10 steps:
    step 9 is halfway, 0.1 + 0.9 * 0.5 * (1 + cos(pi/2)) = 0.55; the last step reaches 0.1."""
    kw = dict(schedule="cosine", warmup_steps=4, warmup_start=0.1, min_ratio=0.1)
    assert [lr_factor(s, 14, **kw) for s in range(4)] == pytest.approx([0.1, 0.325, 0.55, 0.775])
    assert lr_factor(4, 14, **kw) == pytest.approx(1.0)
    assert lr_factor(9, 14, **kw) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 2)))
    assert lr_factor(14, 14, **kw) == pytest.approx(0.1)
    assert lr_factor(7, 14, schedule="constant", warmup_steps=0, warmup_start=0.0, min_ratio=0.1) == 1.0
    assert lr_factor(5, 10, schedule="linear", warmup_steps=0, warmup_start=0.0, min_ratio=0.0) == pytest.approx(0.5)


def test_schedule_delays_a_param_group():
    """Group 0 delayed 3 steps: 0.1 (waiting) x3, then its own warm-up 0.1, 0.55 and 1; group 1 starts at once."""
    opt = torch.optim.SGD([{"params": [torch.nn.Parameter(torch.zeros(1))]},
                           {"params": [torch.nn.Parameter(torch.zeros(1))]}], lr=2.0)
    cfg = OptimSection(lr=2.0, schedule="constant", warmup_steps=2, warmup_start=0.1)
    sched = schedule(opt, cfg, total_steps=10, delays=[3, 0])
    lrs = []
    for _ in range(6):
        lrs.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    assert [a for a, _ in lrs] == pytest.approx([0.2, 0.2, 0.2, 0.2, 1.1, 2.0])
    assert [b for _, b in lrs] == pytest.approx([0.2, 1.1, 2.0, 2.0, 2.0, 2.0])


def test_fused_adamw_matches_the_for_loop_version():
    torch.manual_seed(0)
    init = [torch.randn(7, 5), torch.randn(5)]
    a = [torch.nn.Parameter(t.clone()) for t in init]
    b = [torch.nn.Parameter(t.clone()) for t in init]
    cfg = OptimSection(lr=1e-2, weight_decay=0.1, eps=1e-6)
    fused = adamw(a, cfg)
    assert fused.defaults["fused"]
    loop = torch.optim.AdamW(b, lr=1e-2, betas=(0.9, 0.95), eps=1e-6, weight_decay=0.1, foreach=False)
    for _ in range(5):
        g = [torch.randn_like(t) for t in init]
        for p, q, gi in zip(a, b, g):
            p.grad, q.grad = gi.clone(), gi.clone()
        fused.step()
        loop.step()
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
