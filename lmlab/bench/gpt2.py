"""The GPT-2 reference of the training benchmark: transformers' GPT2LMHeadModel holding lmlab's weights.

    gpt2_shape(shape)                 # a benchmark shape with lmlab's GPT-2 switches
    is_gpt2(model_config)             # whether GPT2LMHeadModel computes exactly this model
    gpt2_model(model_config, lmlab_state, device)

Design choices:
- GPT2LMHeadModel is the architecture of nanoGPT's model.py (pre-LayerNorm
  blocks, learned absolute positions, a GELU MLP of 4 d_model, one c_attn
  matrix for q/k/v, a head tied to the token embedding), in a maintained
  package. lmlab runs it through its switches: model.norm=layernorm,
  position=learned, ffn=gelu, tie_embeddings=true, and bias=true, because
  GPT-2 has a bias on every projection and LayerNorm (nanoGPT's bias=True).
  With those the two models have the same parameters and compute the same
  numbers, which the benchmark checks on the first step's loss.
- GPT-2's GELU is the tanh approximation ("gelu_new"); lmlab's `gelu` is the
  exact erf one, so the reference is configured with transformers' "gelu"
  (exact). Dropout is 0 everywhere; attention is SDPA, as lmlab's.
- Weights are mapped by hand here (lmlab's export writes Llama / Qwen3 only):
  c_attn = [q; k; v] transposed (GPT-2's Conv1D keeps (in, out) matrices),
  c_proj, c_fc and the MLP's c_proj transposed, norms and embeddings as they are.
"""

import torch

from lmlab.errors import LmlabError

GPT2_SWITCHES = {"norm": "layernorm", "norm_position": "pre", "position": "learned", "ffn": "gelu",
                 "tie_embeddings": True, "bias": True}
ARCHITECTURE = "GPT2LMHeadModel"


def gpt2_shape(shape):
    """A benchmark shape (dict of ModelConfig fields) with lmlab's GPT-2 switches on."""
    return {**shape, **GPT2_SWITCHES}


def is_gpt2(model_config):
    """True when GPT2LMHeadModel has exactly this model's parameters and computation."""
    m = model_config.resolved()
    return (all(getattr(m, key) == value for key, value in GPT2_SWITCHES.items())
            and not m.qk_norm and not m.key_norm and not m.memory and m.n_kv_heads == m.n_heads
            and m.head_dim * m.n_heads == m.d_model)


def gpt2_config(model_config):
    """transformers' GPT2Config for the model (no dropout, exact GELU, SDPA)."""
    import transformers

    m = model_config.resolved()
    return transformers.GPT2Config(
        vocab_size=m.vocab_size, n_positions=m.context_length, n_embd=m.d_model, n_layer=m.n_layers,
        n_head=m.n_heads, n_inner=m.d_ff, activation_function="gelu", resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, layer_norm_epsilon=m.norm_eps, initializer_range=m.init_std, tie_word_embeddings=True,
        bos_token_id=None, eos_token_id=None, attn_implementation="sdpa")


def gpt2_state_dict(lmlab_state, n_layers):
    """lmlab's state dict (its Hugging Face Llama-style names) under GPT2LMHeadModel's names and layouts."""
    s = lmlab_state
    out = {"transformer.wte.weight": s["embed_tokens.weight"], "transformer.wpe.weight": s["embed_positions.weight"],
           "transformer.ln_f.weight": s["norm.weight"], "transformer.ln_f.bias": s["norm.bias"]}
    for i in range(n_layers):
        ours, theirs = f"layers.{i}.", f"transformer.h.{i}."
        for a, b in (("input_layernorm", "ln_1"), ("post_attention_layernorm", "ln_2")):
            out[f"{theirs}{b}.weight"], out[f"{theirs}{b}.bias"] = s[f"{ours}{a}.weight"], s[f"{ours}{a}.bias"]
        qkv = [f"{ours}self_attn.{p}_proj" for p in "qkv"]
        out[f"{theirs}attn.c_attn.weight"] = torch.cat([s[f"{p}.weight"] for p in qkv]).t().contiguous()
        out[f"{theirs}attn.c_attn.bias"] = torch.cat([s[f"{p}.bias"] for p in qkv])
        for a, b in (("self_attn.o_proj", "attn.c_proj"), ("mlp.up_proj", "mlp.c_fc"), ("mlp.down_proj", "mlp.c_proj")):
            out[f"{theirs}{b}.weight"] = s[f"{ours}{a}.weight"].t().contiguous()
            out[f"{theirs}{b}.bias"] = s[f"{ours}{a}.bias"]
    return {name: t.detach().clone() for name, t in out.items()}


def gpt2_model(model_config, gpt2_weights, device):
    """GPT2LMHeadModel holding `gpt2_weights` (from gpt2_state_dict), its head tied to wte."""
    import transformers

    if not is_gpt2(model_config):
        raise LmlabError("the GPT-2 reference needs lmlab's GPT-2 switches: " +
                         ", ".join(f"model.{k}={str(v).lower()}" for k, v in GPT2_SWITCHES.items()))
    model = transformers.GPT2LMHeadModel(gpt2_config(model_config))
    missing, unexpected = model.load_state_dict(gpt2_weights, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise LmlabError(f"lmlab's weights do not fit GPT2LMHeadModel (missing {missing}, unexpected {unexpected}); "
                         f"lmlab.bench.gpt2 and transformers {transformers.__version__} disagree")
    model.tie_weights()
    assert model.lm_head.weight is model.transformer.wte.weight
    return model.to(device)
