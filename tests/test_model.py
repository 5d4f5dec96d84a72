import dataclasses
import math

import pytest
import torch

from lmlab.config import ModelConfig, resolve_d_ff
from lmlab.model.transformer import Transformer, lm_loss


def tiny_config(**overrides):
    base = dict(vocab_size=97, context_length=32, d_model=32, n_layers=2, n_heads=4)
    config = ModelConfig(**{**base, **overrides})
    config.d_ff = resolve_d_ff(config)
    return config


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return Transformer(tiny_config(**overrides)).eval()


def random_ids(config, batch=2, length=None, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, config.vocab_size, (batch, length or config.context_length), generator=g)


# --- agreement with the Hugging Face reference ---------------------------------------


def to_hf_state_dict(state_dict):
    """Our keys -> LlamaForCausalLM keys: everything but lm_head lives under 'model.'."""
    return {(k if k.startswith("lm_head.") else f"model.{k}"): v for k, v in state_dict.items()}


def hf_llama(config):
    transformers = pytest.importorskip("transformers")
    hf_config = transformers.LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.d_model,
        intermediate_size=config.d_ff,
        num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads,
        num_key_value_heads=config.n_kv_heads or config.n_heads,
        head_dim=config.d_model // config.n_heads,
        max_position_embeddings=config.context_length,
        rms_norm_eps=config.norm_eps,
        rope_theta=config.rope_theta,
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=config.tie_embeddings,
        hidden_act="silu",
    )
    return transformers.LlamaForCausalLM(hf_config).eval()


HF_CASES = [
    dict(n_layers=1, n_heads=4, n_kv_heads=0, tie_embeddings=False),  # multi-head
    dict(n_layers=2, n_heads=4, n_kv_heads=2, tie_embeddings=True),  # grouped-query, tied
    dict(n_layers=3, n_heads=8, n_kv_heads=1, tie_embeddings=False, vocab_size=131, rope_theta=500000.0),  # multi-query
    dict(n_layers=2, d_model=48, n_heads=6, n_kv_heads=3, d_ff=80, norm_eps=1e-6, tie_embeddings=True, rope_theta=1234.5),
]


@pytest.mark.parametrize("case", HF_CASES, ids=lambda c: f"L{c['n_layers']}h{c['n_heads']}kv{c['n_kv_heads']}{'tied' if c['tie_embeddings'] else ''}")
def test_logits_match_transformers_llama(case):
    model = tiny_model(seed=3, **case)
    # Norm gains start at one; perturb them so that a swapped norm would show.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name == "norm.weight":
                p.add_(0.1 * torch.randn_like(p))
    hf = hf_llama(model.config)
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(model.state_dict()), strict=True)
    assert not missing and not unexpected
    ids = random_ids(model.config, batch=2, length=model.config.context_length)
    with torch.no_grad():
        ours = model(ids)
        theirs = hf(input_ids=ids).logits
    assert ours.shape == (2, model.config.context_length, model.config.vocab_size)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_parameter_names_follow_hf_llama_layout():
    model = tiny_model(n_layers=1)
    expected = {"embed_tokens.weight", "norm.weight", "lm_head.weight"} | {
        f"layers.0.{name}.weight"
        for name in [
            "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
            "input_layernorm", "post_attention_layernorm",
        ]
    }
    assert set(model.state_dict()) == expected  # RoPE tables are not saved


def test_switches_add_parameters_under_predictable_names():
    names = lambda **switches: set(tiny_model(n_layers=1, **switches).state_dict())  # noqa: E731
    llama = names()
    assert names(qk_norm=True) - llama == {"layers.0.self_attn.q_norm.weight", "layers.0.self_attn.k_norm.weight"}
    assert names(position="learned") - llama == {"embed_positions.weight"}
    assert names(key_norm=True) - llama == {"layers.0.self_attn.key_scale"}
    assert names(key_norm=True, key_norm_scale=4.0) == llama  # a fixed scale is not a parameter
    assert names(bias=True) - llama == {name.replace(".weight", ".bias") for name in llama
                                        if "proj" in name}
    assert llama - names(ffn="silu") == {"layers.0.mlp.gate_proj.weight"}
    assert llama - names(norm="none") == {"layers.0.input_layernorm.weight",
                                          "layers.0.post_attention_layernorm.weight", "norm.weight"}
    assert names(norm="layernorm", bias=True) >= {"norm.weight", "norm.bias", "layers.0.input_layernorm.bias"}


# --- behaviour -----------------------------------------------------------------------


def test_changing_a_later_token_never_changes_earlier_logits():
    model = tiny_model(n_kv_heads=2)
    ids = random_ids(model.config, batch=1)
    for t in [0, 5, 31]:
        changed = ids.clone()
        changed[0, t:] = (changed[0, t:] + 1) % model.config.vocab_size
        with torch.no_grad():
            a, b = model(ids), model(changed)
        torch.testing.assert_close(a[:, :t], b[:, :t], rtol=0, atol=0)
        assert not torch.allclose(a[:, t], b[:, t])


@pytest.mark.parametrize("n_kv_heads", [0, 2])
def test_kv_cache_prefill_then_single_tokens_matches_full_forward(n_kv_heads):
    model = tiny_model(n_kv_heads=n_kv_heads)
    ids = random_ids(model.config, batch=2)
    with torch.no_grad():
        full = model(ids)
        cache = model.new_kv_cache(batch_size=2, max_len=32)
        pieces = [model(ids[:, :10], kv_cache=cache)]
        for t in range(10, 32):
            pieces.append(model(ids[:, t:t + 1], kv_cache=cache))
    assert cache.pos == 32
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)


def test_kv_cache_in_chunks_matches_full_forward():
    model = tiny_model(n_kv_heads=1)
    ids = random_ids(model.config, batch=2)
    with torch.no_grad():
        full = model(ids)
        cache = model.new_kv_cache(batch_size=2, max_len=32)
        pieces = [model(ids[:, a:b], kv_cache=cache) for a, b in [(0, 1), (1, 7), (7, 8), (8, 20), (20, 32)]]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)


def test_kv_cache_overflow_and_positions_past_context_are_clear_errors():
    model = tiny_model()
    cache = model.new_kv_cache(batch_size=1, max_len=8)
    with torch.no_grad():
        model(torch.zeros(1, 6, dtype=torch.long), kv_cache=cache)
        with pytest.raises(ValueError, match="KV cache overflow"):
            model(torch.zeros(1, 3, dtype=torch.long), kv_cache=cache)
        with pytest.raises(ValueError, match="context_length is 32"):
            model(torch.zeros(1, 33, dtype=torch.long))
    with pytest.raises(ValueError, match="exceeds the model's context_length"):
        model.new_kv_cache(batch_size=1, max_len=64)


def test_one_batch_can_be_overfit():
    torch.manual_seed(0)
    config = tiny_config(vocab_size=64, context_length=16, d_model=32, n_layers=2, n_heads=4)
    model = Transformer(config)
    data = torch.randint(0, 64, (4, 17))
    x, y = data[:, :-1], data[:, 1:]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    for _ in range(200):
        loss = lm_loss(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05


def test_lm_loss_is_mean_over_targets_that_are_not_ignored():
    logits = torch.randn(2, 3, 5, dtype=torch.bfloat16)
    targets = torch.tensor([[1, -100, 4], [0, 2, -100]])
    keep = targets != -100
    expected = torch.nn.functional.cross_entropy(logits.float()[keep], targets[keep])
    loss = lm_loss(logits, targets)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, expected)


def test_num_params_matches_a_hand_count_and_counts_tied_embeddings_once():
    config = tiny_config(vocab_size=100, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=96)
    head_dim = 8
    attention = 32 * 32 + 2 * (32 * 2 * head_dim) + 32 * 32  # q, k, v (2 kv heads), o
    mlp = 3 * 32 * 96
    norms = 2 * 32
    body = 2 * (attention + mlp + norms) + 32  # + final norm
    embedding = 100 * 32
    untied = Transformer(config)
    assert untied.num_params() == body + 2 * embedding
    assert untied.num_params(non_embedding=True) == body
    tied = Transformer(dataclasses.replace(config, tie_embeddings=True))
    assert tied.lm_head.weight is tied.embed_tokens.weight
    assert tied.num_params() == body + embedding
    assert tied.num_params(non_embedding=True) == body


def test_flops_per_token_is_6n_plus_attention_term():
    untied = tiny_model(tie_embeddings=False)
    c = untied.config
    norms = sum(p.numel() for name, p in untied.named_parameters() if "norm" in name)
    n_matmul = untied.num_params() - c.vocab_size * c.d_model - norms  # lookups and gains are no matmuls
    assert untied.flops_per_token() == 6 * n_matmul + 12 * c.n_layers * c.d_model * c.context_length
    tied = tiny_model(tie_embeddings=True)
    assert tied.flops_per_token(seq_len=8) == 6 * (tied.num_params() - norms) + 12 * c.n_layers * c.d_model * 8


def test_summary_is_one_readable_line():
    config = ModelConfig(vocab_size=4096, context_length=256, d_model=256, n_layers=4, n_heads=8)
    config.d_ff = resolve_d_ff(config)
    summary = Transformer(config).summary()
    assert summary == (
        "Transformer 4L d256 h8/kv8 ff704 ctx256 vocab4096 rope(10000) swiglu rmsnorm untied"
        " | 5.3M params, 3.2M non-embedding"
    )


def test_init_scales_residual_projections_by_depth():
    torch.manual_seed(0)
    config = tiny_config(d_model=128, n_layers=8, n_heads=4, init_std=0.02)
    model = Transformer(config)
    block = model.layers[3]
    assert block.self_attn.q_proj.weight.std().item() == pytest.approx(0.02, rel=0.05)
    residual_std = 0.02 / math.sqrt(2 * 8)
    assert block.self_attn.o_proj.weight.std().item() == pytest.approx(residual_std, rel=0.05)
    assert block.mlp.down_proj.weight.std().item() == pytest.approx(residual_std, rel=0.05)
    assert torch.all(block.input_layernorm.weight == 1)


def test_dropout_acts_only_in_training():
    model = tiny_model(dropout=0.5)
    ids = random_ids(model.config, batch=1)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), model(ids), rtol=0, atol=0)
        model.train()
        assert not torch.allclose(model(ids), model(ids))


# --- precision and compilation -------------------------------------------------------


def test_bf16_autocast_runs_and_stays_close_to_fp32():
    model = tiny_model(n_kv_heads=2)
    ids = random_ids(model.config, batch=2)
    with torch.no_grad():
        reference = model(ids)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(ids)
            cache = model.new_kv_cache(batch_size=2)
            cached = torch.cat([model(ids[:, :16], kv_cache=cache), model(ids[:, 16:17], kv_cache=cache)], dim=1)
    assert logits.dtype == torch.bfloat16
    torch.testing.assert_close(logits.float(), reference, rtol=0, atol=0.05)
    torch.testing.assert_close(cached.float(), reference[:, :17], rtol=0, atol=0.05)
    # the loss (fp32) barely moves
    targets = random_ids(model.config, batch=2, seed=2)
    assert abs(lm_loss(logits, targets).item() - lm_loss(reference, targets).item()) < 1e-2


def test_torch_compile_forward_equals_eager_without_graph_breaks():
    # ~11 s from a cold inductor cache on 2 CPU cores, ~3 s warm.
    model = tiny_model(n_layers=1, n_kv_heads=2)
    ids = random_ids(model.config, batch=2)
    compiled = torch.compile(model, fullgraph=True)  # fullgraph: a graph break is an error
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids), model(ids), rtol=1e-5, atol=1e-5)
        # Dynamic shapes (what torch.compile switches to once it sees a second
        # length, and remembers across processes): the sequence length is
        # symbolic and must not leak into SDPA's is_causal flag.
        dynamic = torch.compile(model, fullgraph=True, dynamic=True)
        torch.testing.assert_close(dynamic(ids[:, :20]), model(ids[:, :20]), rtol=1e-5, atol=1e-5)


def test_torch_compile_gradients_equal_eager():
    # ~13 s alone from a cold inductor cache on 2 CPU cores, ~5 s after the forward test.
    model = tiny_model(n_layers=1, n_kv_heads=2).train()
    ids = random_ids(model.config, batch=2)
    compiled = torch.compile(model, fullgraph=True)
    lm_loss(compiled(ids), ids).backward()
    compiled_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    lm_loss(model(ids), ids).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(compiled_grads[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)
