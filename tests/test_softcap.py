"""model.logit_softcap: logits = cap * tanh(logits / cap), in the plain and the chunked loss, refused by export."""

import math

import pytest
import torch

from lmlab.config import ModelConfig, load_config
from lmlab.errors import LmlabError
from lmlab.model.hf import hf_architecture
from lmlab.model.transformer import Transformer, chunked_lm_loss, lm_loss


def test_softcap_matches_a_hand_computation():
    """One row of logits by hand: cap * tanh(z / cap), then -log softmax at the target."""
    weight = torch.tensor([[4.0, 0.0], [0.0, 1.0], [-3.0, 2.0]])  # 3 tokens, d 2
    hidden = torch.tensor([[10.0, 1.0]])  # raw logits 40, 1, -28
    cap = 15.0
    capped = [cap * math.tanh(z / cap) for z in (40.0, 1.0, -28.0)]
    assert capped[0] == pytest.approx(14.8559, abs=1e-4) and capped[1] == pytest.approx(0.99852, abs=1e-5)
    want = math.log(sum(math.exp(c) for c in capped)) - capped[1]  # target token 1
    for got in (chunked_lm_loss(hidden, weight, torch.tensor([1]), 1, cap),
                lm_loss(cap * torch.tanh(hidden @ weight.T / cap), torch.tensor([1]))):
        assert got.item() == pytest.approx(want, rel=1e-6)
    uncapped = math.log(sum(math.exp(z) for z in (40.0, 1.0, -28.0))) - 1.0
    assert chunked_lm_loss(hidden, weight, torch.tensor([1]), 1).item() == pytest.approx(uncapped, rel=1e-6)


def test_chunked_softcap_gradients_equal_autograd_of_the_plain_loss():
    torch.manual_seed(0)
    hidden = (3 * torch.randn(37, 16)).requires_grad_()  # large logits, where the cap bends them
    weight = torch.randn(50, 16, requires_grad=True)
    targets = torch.randint(0, 50, (37,))
    targets[::5] = -100
    (lm_loss(10.0 * torch.tanh(hidden @ weight.T / 10.0), targets) * 0.5).backward()
    want = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    (chunked_lm_loss(hidden, weight, targets, 8, 10.0) * 0.5).backward()
    torch.testing.assert_close(hidden.grad, want[0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(weight.grad, want[1], rtol=1e-5, atol=1e-7)


def test_the_model_caps_its_logits_and_its_loss_alike():
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=64, context_length=16, d_model=32, n_layers=1, n_heads=2, logit_softcap=2.0)
    model = Transformer(config.resolved())
    with torch.no_grad():
        model.lm_head.weight.mul_(30)  # logits beyond the cap
        x = torch.randint(0, 64, (2, 16))
        logits = model(x)
        assert logits.abs().max() <= 2.0 and logits.abs().max() > 1.9
        plain = model(x, targets=x)
        model.loss_chunk = 7
        torch.testing.assert_close(model(x, targets=x), plain, rtol=1e-6, atol=0)
        torch.testing.assert_close(plain, lm_loss(logits, x), rtol=1e-6, atol=0)
    assert "softcap2" in model.summary()


def test_softcap_is_off_by_default_refused_by_export_and_checked():
    assert ModelConfig().logit_softcap == 0
    with pytest.raises(LmlabError, match=r"no standard Hugging Face class: model.logit_softcap=30"):
        hf_architecture(ModelConfig(logit_softcap=30.0))
    with pytest.raises(LmlabError, match="model.logit_softcap must be >= 0"):
        load_config("cpu-quickstart", ["model.logit_softcap=-1"])
