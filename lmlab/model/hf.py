"""Hugging Face format in and out: a run <-> a LlamaForCausalLM / Qwen3ForCausalLM folder.

Design choices:
- Our parameter names are Hugging Face's without the "model." prefix, so
  weights move by a key rename and nothing else: fp32 as trained, no
  re-layout, no re-scaling. export -> import -> export gives the same bytes.
  Tied embeddings are stored once (as `save_pretrained` does).
- config.json is written by hand, not through `transformers`, so exporting
  needs no optional dependency. RoPE is described both ways: `rope_parameters`
  (transformers 5) and `rope_theta` + `rope_scaling: null` (transformers 4,
  vLLM and other readers of the older keys).
- The class is chosen from the switches. `LlamaForCausalLM`: RMSNorm, pre-norm,
  RoPE, SwiGLU, no QK-norm or KeyNorm; `model.bias` maps to attention_bias +
  mlp_bias, which put biases on q, k, v, o and gate, up, down, as we do.
  `Qwen3ForCausalLM` when `model.qk_norm` is on: Qwen3 applies one RMSNorm
  (weight over head_dim, eps = rms_norm_eps) to every head's query and key
  before RoPE, as we do; it has no MLP biases, so qk_norm + bias is refused.
  Anything else (LayerNorm, no norm, post-norm, NoPE, learned positions,
  SiLU / GELU FFN, KeyNorm) has no standard class and is refused with the
  switch that is the reason. Dropout does not matter at inference and exports.
- The tokenizer leaves as `Tokenizer.save` writes it: tokenizer.json plus an
  HF tokenizer_config.json (`PreTrainedTokenizerFast`; bos = eos = our
  end-of-text token, the document separator the model was trained on; pad =
  the pad token or, when there is none, end-of-text), with model_max_length.
  On the way in, HF's eos becomes our end-of-text token.
- Import reads local folders only: config.json, model.safetensors or shards
  listed in model.safetensors.index.json, tokenizer.json. A config that our
  model cannot reproduce exactly (RoPE scaling, sliding windows, partial
  rotary, another model type, quantization, ...) is refused, naming the key.
- Both directions write a whole folder atomically: it is built under a
  temporary name next to the target and renamed when complete, and an
  existing non-empty target is never overwritten.
"""

import json
from pathlib import Path

from lmlab import atomic
from lmlab.config import Config, ModelConfig, validate
from lmlab.errors import LmlabError

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}
# transformers' defaults for keys a config.json may leave out (None: derived from other keys)
HF_DEFAULTS = {
    "llama": {"max_position_embeddings": 2048, "head_dim": None, "num_key_value_heads": None},
    "qwen3": {"max_position_embeddings": 32768, "head_dim": 128, "num_key_value_heads": 32},
}


# --- out ---------------------------------------------------------------------------


def hf_architecture(model_config):
    """The HF class this model exports as; an LmlabError naming every switch that leaves both families."""
    m = model_config
    reasons = hf_refusals(m)
    if reasons:
        raise LmlabError("this model has no standard Hugging Face class: " + "; ".join(reasons))
    return ARCHITECTURES["qwen3"] if m.qk_norm else ARCHITECTURES["llama"]


def hf_refusals(model_config):
    """Every switch of the model that neither Llama nor Qwen3 computes, each with its reason ([] when none)."""
    m = model_config
    reasons = []
    if m.norm != "rmsnorm":
        reasons.append(f"model.norm={m.norm!r} (Llama and Qwen3 use rmsnorm)")
    if m.norm_position != "pre":
        reasons.append(f"model.norm_position={m.norm_position!r} (Llama and Qwen3 are pre-norm)")
    if m.position != "rope":
        reasons.append(f"model.position={m.position!r} (Llama and Qwen3 use rope)")
    if m.ffn != "swiglu":
        reasons.append(f"model.ffn={m.ffn!r} (Llama and Qwen3 use swiglu)")
    if m.key_norm:
        reasons.append("model.key_norm=true (no standard class normalises only the keys)")
    if m.logit_softcap:
        reasons.append(f"model.logit_softcap={m.logit_softcap:g} (Llama and Qwen3 do not cap their logits)")
    if m.qk_norm and m.bias:
        reasons.append("model.bias=true with model.qk_norm=true (Qwen3 has no biases in its MLP)")
    return reasons


def hf_config(model_config, bos_id, eos_id, pad_id):
    """config.json for the model (see hf_architecture for the choice of class)."""
    m = model_config
    architecture = hf_architecture(m)
    m = m.resolved()
    head_dim = m.head_dim
    config = {
        "architectures": [architecture],
        "vocab_size": m.vocab_size,
        "hidden_size": m.d_model,
        "intermediate_size": m.d_ff,
        "num_hidden_layers": m.n_layers,
        "num_attention_heads": m.n_heads,
        "num_key_value_heads": m.n_kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": m.context_length,
        "initializer_range": m.init_std,
        "rms_norm_eps": m.norm_eps,
        "rope_theta": m.rope_theta,
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta},
        "attention_bias": m.bias,
        "attention_dropout": 0.0,
        "tie_word_embeddings": m.tie_embeddings,
        "use_cache": True,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "torch_dtype": "float32",
    }
    if architecture == "LlamaForCausalLM":
        config.update(model_type="llama", mlp_bias=m.bias, pretraining_tp=1)
    else:
        config.update(model_type="qwen3", use_sliding_window=False, sliding_window=None,
                      max_window_layers=m.n_layers, layer_types=["full_attention"] * m.n_layers)
    return config


def hf_state_dict(model):
    """Our weights under HF names: everything but lm_head moves under "model."; a tied head is left out."""
    from lmlab.model import weights

    return {name if name.startswith("lm_head.") else f"model.{name}": tensor
            for name, tensor in weights.to_save(model).items()}


# --- in ----------------------------------------------------------------------------


def model_config_from_hf(hf, source="config.json"):
    """A ModelConfig that computes exactly what HF's config `hf` (a dict) describes; else an LmlabError."""
    model_type = hf.get("model_type")
    if model_type not in ARCHITECTURES:
        raise LmlabError(f"{source}: model_type {model_type!r} is not supported; lmlab imports "
                         f"{' and '.join(ARCHITECTURES.values())} folders")
    for architecture in hf.get("architectures") or []:
        if architecture != ARCHITECTURES[model_type]:
            raise LmlabError(f"{source}: architecture {architecture!r} is not supported; "
                             f"expected {ARCHITECTURES[model_type]}")
    rope_theta, attention_bias = _supported_settings(hf, model_type, source)
    hf = {**HF_DEFAULTS[model_type], **hf}
    try:
        d_model, n_heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
        head_dim = int(hf["head_dim"] or d_model // n_heads)
        model_config = ModelConfig(
            vocab_size=int(hf["vocab_size"]),
            context_length=int(hf["max_position_embeddings"]),
            d_model=d_model,
            n_layers=int(hf["num_hidden_layers"]),
            n_heads=n_heads,
            n_kv_heads=int(hf["num_key_value_heads"] or n_heads),
            d_ff=int(hf["intermediate_size"]),
            rope_theta=float(rope_theta),
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            init_std=float(hf.get("initializer_range", 0.02)),
            head_dim=0 if head_dim * n_heads == d_model else head_dim,
            qk_norm=model_type == "qwen3",
            bias=attention_bias,
        )
    except KeyError as e:
        raise LmlabError(f"{source}: missing key {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise LmlabError(f"{source}: {e}") from None
    try:
        validate(Config(model=model_config))
    except LmlabError as e:
        raise LmlabError(f"{source}: {e}") from None
    return model_config



def _supported_settings(hf, model_type, source):
    """(rope_theta, bias) of an HF config dict, after refusing what lmlab's model does not compute."""
    def refuse(key, why):
        raise LmlabError(f"{source}: {key}={json.dumps(hf.get(key))} is not supported ({why})")

    if hf.get("hidden_act", "silu") != "silu":
        refuse("hidden_act", "lmlab's SwiGLU uses silu")
    if hf.get("quantization_config"):
        refuse("quantization_config", "import unquantized weights")
    rope_theta = hf.get("rope_theta", 10000.0)
    rope_scaling = hf.get("rope_scaling") or {}
    if rope_scaling.get("rope_type", rope_scaling.get("type", "default")) != "default":
        refuse("rope_scaling", "lmlab implements plain RoPE only")
    rope_parameters = hf.get("rope_parameters") or {}
    if rope_parameters.get("rope_type", rope_parameters.get("type", "default")) != "default":
        refuse("rope_parameters", "lmlab implements plain RoPE only")
    if rope_parameters.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) != 1.0:
        refuse("partial_rotary_factor", "lmlab rotates every feature of a head")
    rope_theta = rope_parameters.get("rope_theta", rope_theta)
    if hf.get("use_sliding_window"):
        refuse("use_sliding_window", "lmlab attends over the whole context")
    if any(kind != "full_attention" for kind in hf.get("layer_types") or []):
        refuse("layer_types", "lmlab attends over the whole context in every layer")
    attention_bias = bool(hf.get("attention_bias", False))
    mlp_bias = bool(hf.get("mlp_bias", False)) if model_type == "llama" else False
    if attention_bias != mlp_bias:
        refuse("attention_bias", f"with mlp_bias={json.dumps(mlp_bias)}: lmlab's model.bias puts biases "
                                 "on attention and MLP together")
    return rope_theta, attention_bias


def read_hf_weights(hf_dir):
    """The folder's tensors under our names: one model.safetensors, or the shards its index lists."""
    from safetensors.torch import load_file

    hf_dir = Path(hf_dir)
    if (hf_dir / "model.safetensors").is_file():
        files = ["model.safetensors"]
    elif (hf_dir / "model.safetensors.index.json").is_file():
        index = atomic.read_json(hf_dir / "model.safetensors.index.json")
        files = sorted(set(index.get("weight_map", {}).values()))
        if not files:
            raise LmlabError(f"{hf_dir / 'model.safetensors.index.json'} lists no weight files")
    else:
        raise LmlabError(f"{hf_dir} has no model.safetensors (or model.safetensors.index.json); "
                         "save the model with safetensors (transformers' default) first")
    state = {}
    for file in files:
        if not (hf_dir / file).is_file():
            raise LmlabError(f"{hf_dir} lacks the weight shard {file}")
        for name, tensor in load_file(str(hf_dir / file)).items():
            if name.endswith("rotary_emb.inv_freq"):
                continue  # older checkpoints saved the RoPE table; we compute it
            state[name.removeprefix("model.")] = tensor
    return state


def load_hf_model(hf_dir):
    """(Transformer, Tokenizer, ModelConfig) from a local Hugging Face Llama / Qwen3 folder."""
    from lmlab.model import weights
    from lmlab.model.transformer import Transformer

    hf_dir = Path(hf_dir)
    if not hf_dir.is_dir():
        raise LmlabError(f"Hugging Face folder {hf_dir} does not exist")
    if not (hf_dir / "config.json").is_file():
        raise LmlabError(f"{hf_dir} has no config.json; is it a Hugging Face model folder?")
    hf = atomic.read_json(hf_dir / "config.json")
    model_config = model_config_from_hf(hf, source=str(hf_dir / "config.json"))
    tokenizer = load_hf_tokenizer(hf_dir, hf)
    if tokenizer.vocab_size > model_config.vocab_size:
        raise LmlabError(f"{hf_dir}: the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                         f"{model_config.vocab_size} embeddings")

    model = Transformer(model_config)
    try:
        weights.load(model, read_hf_weights(hf_dir))
    except weights.WeightsMismatch as e:
        raise LmlabError(f"{hf_dir}: the weights do not match config.json ({e})") from None
    return model.eval(), tokenizer, model_config


def load_hf_tokenizer(hf_dir, hf_config=None):
    """The folder's tokenizer, with HF's eos token as our end-of-text and a pad id even when it has none.

    eos comes from tokenizer_config.json, special_tokens_map.json, or else the
    eos_token_id of generation_config.json / config.json. With no pad token the
    Tokenizer pads with end-of-text (padding is kept out of the loss anyway).
    """
    from tokenizers import Tokenizer as HFTokenizer

    from lmlab.data.tokenizer import EOT, Tokenizer

    hf_dir = Path(hf_dir)
    if not (hf_dir / "tokenizer.json").is_file():
        raise LmlabError(f"{hf_dir} has no tokenizer.json; lmlab needs the fast tokenizer file")
    try:
        hf_tokenizer = HFTokenizer.from_file(str(hf_dir / "tokenizer.json"))
    except Exception as e:  # tokenizers raises plain Exception on bad JSON
        raise LmlabError(f"{hf_dir / 'tokenizer.json'} is not a valid tokenizer.json ({e})") from None

    def token_text(value):
        return value.get("content") if isinstance(value, dict) else value

    sources = [atomic.read_json(hf_dir / name) for name in ("tokenizer_config.json", "special_tokens_map.json")
               if (hf_dir / name).is_file()]
    eos = next((token_text(s.get("eos_token")) for s in sources if s.get("eos_token")), None)
    pad = next((token_text(s.get("pad_token")) for s in sources if s.get("pad_token")), None)
    if eos is None:
        configs = [atomic.read_json(hf_dir / "generation_config.json")] if (hf_dir / "generation_config.json").is_file() else []
        configs.append(hf_config if hf_config is not None else atomic.read_json(hf_dir / "config.json"))
        for config in configs:
            eos_id = config.get("eos_token_id")
            eos_id = eos_id[0] if isinstance(eos_id, list) and eos_id else eos_id
            if isinstance(eos_id, int) and hf_tokenizer.id_to_token(eos_id) is not None:
                eos = hf_tokenizer.id_to_token(eos_id)
                break
    eos = eos or EOT
    if hf_tokenizer.token_to_id(eos) is None:
        raise LmlabError(f"{hf_dir}: cannot tell the end-of-text token (no eos_token in tokenizer_config.json, "
                         f"no eos_token_id in config.json, no {EOT})")
    return Tokenizer(hf_tokenizer, eot=eos, pad=pad)
