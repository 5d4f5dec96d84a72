"""Optimizer groups and the LR schedule's exact end points."""


import pytest
import torch

from lmlab.config import OptimConfig
from lmlab.training.optim import build_optimizer, lr_at, param_groups


@pytest.mark.parametrize("warmup, total", [(10, 100), (1, 7), (0, 50), (100, 100)])
def test_cosine_hits_the_peak_after_warmup_and_the_minimum_at_the_last_step(warmup, total):
    cfg = OptimConfig(lr=3e-3, min_lr=3e-4, warmup_steps=warmup)
    lrs = [lr_at(s, cfg, total) for s in range(total)]
    peak = max(warmup - 1, 0)
    assert lrs[peak] == pytest.approx(3e-3, abs=0)
    assert max(lrs) == lrs[peak]
    if total - 1 > peak:
        assert lrs[-1] == pytest.approx(3e-4, rel=1e-12)
        assert all(a >= b for a, b in zip(lrs[peak:], lrs[peak + 1:]))
    assert all(a < b for a, b in zip(lrs[:peak], lrs[1:peak + 1]))
    assert lrs[0] == pytest.approx(3e-3 / max(warmup, 1)) or warmup == 0


def test_cosine_midpoint_is_halfway():
    cfg = OptimConfig(lr=1.0, min_lr=0.0, warmup_steps=1)
    assert lr_at(50, cfg, 101) == pytest.approx(0.5)


def test_constant_schedule_keeps_the_peak():
    cfg = OptimConfig(lr=1e-3, warmup_steps=5, schedule="constant")
    assert [lr_at(s, cfg, 20) for s in (4, 10, 19)] == [1e-3] * 3


def test_no_weight_decay_on_norms_and_biases():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4), torch.nn.Embedding(5, 4))
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert {p.dim() for p in decay["params"]} == {2} and len(decay["params"]) == 2
    assert {p.dim() for p in no_decay["params"]} == {1} and len(no_decay["params"]) == 3


def test_fused_adamw_matches_the_reference_update():
    torch.manual_seed(0)
    a = torch.nn.Linear(8, 8)
    b = torch.nn.Linear(8, 8)
    b.load_state_dict(a.state_dict())
    cfg = OptimConfig(lr=1e-2, weight_decay=0.1, fused="true")
    fused = build_optimizer(a, cfg, torch.device("cpu"))
    plain = torch.optim.AdamW(param_groups(b, 0.1), lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    for _ in range(5):
        x = torch.randn(4, 8)
        for model, opt in ((a, fused), (b, plain)):
            opt.zero_grad()
            model(x).pow(2).sum().backward()
            opt.step()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)
    assert torch.isfinite(a.weight).all()
