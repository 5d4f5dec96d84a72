"""Every fast path computes what the plain path computes, on a fixed batch of real text.

The plain path is the model's logits and `lm_loss`, eager, fp32, SDPA attention,
no checkpointing, torch's AdamW. Each test switches on one fast path through the
config (lmlab.training.fastpaths.prepare_model / lmlab.training.optim.build_optimizer) and compares
the loss and every parameter's gradient (or the optimizer's update).
"""

import sys
import types

import pytest
import torch
import torch.nn.functional as F

from evals_support import tiny_overrides
from lmlab.config import load_config, resolve_d_ff
from lmlab.data.corpora import ensure_data
from lmlab.data.batches import Batches
from lmlab.errors import LmlabError
from lmlab.training.fastpaths import prepare_model
from lmlab.model.layers import attend, eager_attention
from lmlab.model.transformer import Transformer, chunked_lm_loss, lm_loss
from lmlab.training.optim import build_optimizer, param_groups

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def setup(small_corpus, data_cache, tmp_path_factory):
    """(config, x, y): the tiny-run config and one batch of real stories, one document per row (-100 at padding)."""
    config = load_config(None, tiny_overrides(small_corpus, data_cache, tmp_path_factory.mktemp("runs")))
    tokenizer, shards = ensure_data(config.data, log=lambda *_: None)
    x, y = Batches(shards, "train", 4, 256, packing="document", seed=0).get(0, 0)
    assert (y == -100).sum() > 10 and (y != -100).sum() > 200  # padded rows: the ignored targets are exercised
    m = config.model
    m.context_length = 256
    m.vocab_size, m.d_model, m.n_kv_heads = tokenizer.vocab_size, 48, 2  # grouped-query attention
    m.d_ff = resolve_d_ff(m)
    return config, x, y


def fresh(config, seed=0, **train):
    """A freshly initialised model (same weights for the same seed) and its step_fn for the given train.* switches."""
    torch.manual_seed(seed)
    model = Transformer(config.model).train()
    saved = {key: getattr(config.train, key) for key in train}
    for key, value in train.items():
        setattr(config.train, key, value)
    try:
        return model, prepare_model(model, config, CPU)
    finally:
        for key, value in saved.items():  # the module-scoped config stays plain for the next test
            setattr(config.train, key, value)


def plain_loss_and_grads(config, x, y, seed=0):
    torch.manual_seed(seed)
    model = Transformer(config.model).train()
    loss = lm_loss(model(x), y)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def loss_and_grads(model, step_fn, x, y):
    loss = step_fn(x, targets=y)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def assert_grads_close(got, want, rtol, atol):
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=rtol, atol=atol, msg=name)


# --- chunked loss ---------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [1, 100, 1024, 10_000])  # one row, uneven chunks, exactly B*T, more than B*T
def test_chunked_loss_matches_the_full_logits_loss_and_gradients(setup, chunk):
    config, x, y = setup
    want_loss, want_grads = plain_loss_and_grads(config, x, y)
    model, step_fn = fresh(config, loss_chunk=chunk)
    loss, grads = loss_and_grads(model, step_fn, x, y)
    torch.testing.assert_close(loss, want_loss, rtol=1e-6, atol=0)
    assert_grads_close(grads, want_grads, rtol=1e-5, atol=1e-7)


def test_chunked_loss_with_tied_embeddings_and_without_autograd(setup):
    config, x, y = setup
    config.model.tie_embeddings = True
    try:
        want_loss, want_grads = plain_loss_and_grads(config, x, y)
        model, step_fn = fresh(config, loss_chunk=100)
        loss, grads = loss_and_grads(model, step_fn, x, y)
    finally:
        config.model.tie_embeddings = False
    torch.testing.assert_close(loss, want_loss, rtol=1e-6, atol=0)
    assert_grads_close(grads, want_grads, rtol=1e-5, atol=1e-7)  # head and embedding gradients add up in one tensor
    with torch.no_grad():  # evaluation: no gradient work, same value
        torch.testing.assert_close(step_fn(x, targets=y), want_loss, rtol=1e-6, atol=0)
        assert step_fn(x).shape == (*x.shape, config.model.vocab_size)  # without targets: logits, as before


def test_chunked_loss_scales_its_gradients_by_the_incoming_gradient():
    # A loss divided for accumulation (or multiplied by fp16's scaler) must pass that factor on.
    torch.manual_seed(0)
    hidden = torch.randn(37, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    targets = torch.randint(0, 50, (37,))
    targets[::5] = -100
    (lm_loss(hidden @ weight.T, targets) * 0.25).backward()
    want = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    (chunked_lm_loss(hidden, weight, targets, 8) * 0.25).backward()
    torch.testing.assert_close(hidden.grad, want[0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(weight.grad, want[1], rtol=1e-5, atol=1e-7)


# --- activation checkpointing, attention back-ends, precision ----------------------------


def test_activation_checkpointing_gives_exactly_the_same_loss_and_gradients(setup):
    config, x, y = setup
    config.model.dropout = 0.1  # recomputation must replay the same dropout masks
    try:
        torch.manual_seed(5)
        want_model, want_fn = fresh(config)
        torch.manual_seed(7)
        want_loss, want_grads = loss_and_grads(want_model, want_fn, x, y)
        model, step_fn = fresh(config, activation_checkpointing=True)
        torch.manual_seed(7)
        loss, grads = loss_and_grads(model, step_fn, x, y)
    finally:
        config.model.dropout = 0.0
    torch.testing.assert_close(loss, want_loss, rtol=0, atol=0)
    assert_grads_close(grads, want_grads, rtol=0, atol=0)


def test_eager_attention_matches_sdpa_in_training_and_with_the_kv_cache(setup):
    config, x, y = setup
    want_loss, want_grads = plain_loss_and_grads(config, x, y)
    model, step_fn = fresh(config, attention="eager")
    loss, grads = loss_and_grads(model, step_fn, x, y)
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=0)
    assert_grads_close(grads, want_grads, rtol=1e-4, atol=1e-6)
    model.eval()
    with torch.no_grad():  # prefill a chunk, then one token: the masked and the single-query shapes
        cache = model.new_kv_cache(batch_size=x.shape[0])
        cached = torch.cat([model(x[:, :40], kv_cache=cache), model(x[:, 40:50], kv_cache=cache),
                            model(x[:, 50:51], kv_cache=cache)], dim=1)  # (the padded tail is not needed here)
        for module in model.modules():
            if hasattr(module, "backend"):
                module.backend = "sdpa"
        torch.testing.assert_close(cached, model(x[:, :51]), rtol=1e-4, atol=1e-5)


def test_bf16_autocast_stays_close_to_fp32_with_fp32_master_weights(setup):
    config, x, y = setup
    want_loss, want_grads = plain_loss_and_grads(config, x, y)
    model, step_fn = fresh(config, precision="bf16")
    loss, grads = loss_and_grads(model, step_fn, x, y)
    assert loss.dtype == torch.float32 and all(p.dtype == torch.float32 for p in model.parameters())
    assert abs(loss.item() - want_loss.item()) < 2e-2
    for name, g in grads.items():  # bf16 keeps ~3 significant digits: directions agree, not values
        assert F.cosine_similarity(g.flatten(), want_grads[name].flatten(), dim=0) > 0.99, name


@pytest.mark.slow
def test_compiled_step_matches_eager_with_every_switch_on(setup):
    # ~40 s on the loaded 2-core test machine from a cold inductor cache.
    config, x, y = setup
    want_loss, want_grads = plain_loss_and_grads(config, x, y)
    model, step_fn = fresh(config, compile=True, loss_chunk=100, activation_checkpointing=True)
    loss, grads = loss_and_grads(model, step_fn, x, y)
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=0)
    assert_grads_close(grads, want_grads, rtol=1e-4, atol=1e-6)


def test_compiled_step_matches_eager(setup):
    # The default chunked loss compiles with the model, in one graph (fullgraph: a break is an error).
    config, x, y = setup
    config.model.n_layers = 1
    try:
        want_loss, want_grads = plain_loss_and_grads(config, x, y)
        torch.manual_seed(0)
        model = Transformer(config.model).train()
        model.loss_chunk = 600  # two uneven chunks
        compiled = torch.compile(model, fullgraph=True)
        loss, grads = loss_and_grads(model, lambda x, targets: compiled(x, targets=targets), x, y)
    finally:
        config.model.n_layers = 2
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=0)
    assert_grads_close(grads, want_grads, rtol=1e-4, atol=1e-6)


# --- optimizers ---------------------------------------------------------------------------


def adamw_trajectory(config, x, y, optimizer_for, steps=3):
    """Weights after `steps` AdamW updates on the real batch, the optimizer built by optimizer_for(model)."""
    torch.manual_seed(0)
    model = Transformer(config.model).train()
    optimizer = optimizer_for(model)
    for _ in range(steps):
        optimizer.zero_grad()
        lm_loss(model(x), y).backward()
        optimizer.step()
    return {name: p.detach().clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("fused", ["true", "false"])
def test_fused_and_unfused_adamw_follow_torch_adamw(setup, fused):
    config, x, y = setup
    o = config.optim
    want = adamw_trajectory(config, x, y, lambda m: torch.optim.AdamW(
        param_groups(m, o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, foreach=False))
    o.fused = fused
    try:
        got = adamw_trajectory(config, x, y, lambda m: build_optimizer(m, o, CPU))
    finally:
        o.fused = "auto"
    assert_grads_close(got, want, rtol=1e-5, atol=1e-6)


def test_adamw8bit_follows_adamw_when_bitsandbytes_is_installed(setup):
    bitsandbytes = pytest.importorskip("bitsandbytes")
    config, x, y = setup
    o = config.optim
    want = adamw_trajectory(config, x, y, lambda m: build_optimizer(m, o, CPU))
    o.name = "adamw8bit"
    try:
        optimizers = []
        got = adamw_trajectory(config, x, y, lambda m: optimizers.append(build_optimizer(m, o, CPU)) or optimizers[0])
    finally:
        o.name = "adamw"
    assert isinstance(optimizers[0], bitsandbytes.optim.AdamW8bit)
    torch.manual_seed(0)
    start = dict(Transformer(config.model).named_parameters())
    for name in want:  # quantised moments: AdamW's update in direction and size, not to the last digit
        want_step, got_step = want[name] - start[name].detach(), got[name] - start[name].detach()
        assert F.cosine_similarity(got_step.flatten(), want_step.flatten(), dim=0) > 0.99, name
        assert (got_step - want_step).abs().max() < 0.5 * want_step.abs().max(), name


def test_adamw8bit_without_bitsandbytes_is_one_clear_error(setup, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes -> ImportError
    config, _, _ = setup
    config.optim.name = "adamw8bit"
    try:
        with pytest.raises(LmlabError, match="optim.name=adamw8bit needs bitsandbytes.*pip install bitsandbytes"):
            build_optimizer(Transformer(config.model), config.optim, CPU)
    finally:
        config.optim.name = "adamw"


# --- optional attention back-ends ---------------------------------------------------------


@pytest.mark.parametrize("backend, package", [("flash_attn", "flash-attn"), ("xformers", "xformers")])
def test_a_missing_attention_backend_is_one_clear_error(setup, monkeypatch, backend, package):
    monkeypatch.setitem(sys.modules, backend, None)
    config, _, _ = setup
    with pytest.raises(LmlabError, match=f"train.attention={backend} needs the {package} package.*pip install {package}"):
        fresh(config, attention=backend)


def test_an_installed_gpu_backend_is_refused_on_cpu(setup, monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn", types.ModuleType("flash_attn"))
    config, _, _ = setup
    with pytest.raises(LmlabError, match="runs on CUDA GPUs only"):
        fresh(config, attention="flash_attn")


def test_optional_backends_get_their_layout_and_heads_right(monkeypatch):
    # Stand-ins with the packages' documented interfaces, computed with the eager
    # reference: (B, T, heads, head_dim) tensors; flash-attn takes fewer key/value
    # heads itself (grouped-query), xformers gets them repeated. What is under test is
    # lmlab's side: transposes, head grouping, scale and the causal flag.
    def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False):
        assert causal and dropout_p == 0.0 and q.shape[1] == k.shape[1] and q.shape[2] % k.shape[2] == 0
        return eager_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                               scale=softmax_scale).transpose(1, 2)

    class LowerTriangularMask:
        pass

    def memory_efficient_attention(q, k, v, attn_bias=None, p=0.0, scale=None):
        assert isinstance(attn_bias, LowerTriangularMask) and q.shape == k.shape == v.shape
        return eager_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                               scale=scale).transpose(1, 2)

    flash = types.ModuleType("flash_attn")
    flash.flash_attn_func = flash_attn_func
    xformers, ops = types.ModuleType("xformers"), types.ModuleType("xformers.ops")
    ops.memory_efficient_attention, ops.LowerTriangularMask, xformers.ops = memory_efficient_attention, LowerTriangularMask, ops
    monkeypatch.setitem(sys.modules, "flash_attn", flash)
    monkeypatch.setitem(sys.modules, "xformers", xformers)
    monkeypatch.setitem(sys.modules, "xformers.ops", ops)
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 6, 10, 8), torch.randn(2, 3, 10, 8), torch.randn(2, 3, 10, 8)
    for scale in (None, 0.7):
        want = attend(q, k, v, "sdpa", is_causal=True, scale=scale)
        for backend in ("flash_attn", "xformers"):
            torch.testing.assert_close(attend(q, k, v, backend, is_causal=True, scale=scale), want,
                                       rtol=1e-5, atol=1e-6, msg=backend)


# --- config -------------------------------------------------------------------------------


@pytest.mark.parametrize("override, message", [
    ("train.attention=flash", "train.attention.*choose one of sdpa, eager, flash_attn, xformers"),
    ("optim.name=adam", "optim.name.*choose one of adamw, adamw8bit"),
    ("train.loss_chunk=-1", "train.loss_chunk.*>= 0"),
])
def test_bad_fast_path_keys_are_clear_errors(override, message):
    with pytest.raises(LmlabError, match=message):
        load_config(None, [override])
