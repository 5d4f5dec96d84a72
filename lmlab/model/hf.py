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

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

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
    if m.qk_norm and m.bias:
        reasons.append("model.bias=true with model.qk_norm=true (Qwen3 has no biases in its MLP)")
    if reasons:
        raise LmlabError("this model has no standard Hugging Face class: " + "; ".join(reasons))
    return ARCHITECTURES["qwen3"] if m.qk_norm else ARCHITECTURES["llama"]


def hf_config(model_config, bos_id, eos_id, pad_id):
    """config.json for the model (see hf_architecture for the choice of class)."""
    m = model_config
    architecture = hf_architecture(m)
    head_dim = m.head_dim or m.d_model // m.n_heads
    config = {
        "architectures": [architecture],
        "vocab_size": m.vocab_size,
        "hidden_size": m.d_model,
        "intermediate_size": m.d_ff,
        "num_hidden_layers": m.n_layers,
        "num_attention_heads": m.n_heads,
        "num_key_value_heads": m.n_kv_heads or m.n_heads,
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
    state = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and model.config.tie_embeddings:
            continue
        state[name if name.startswith("lm_head.") else f"model.{name}"] = tensor.detach().cpu().contiguous()
    return state


def export_hf(run, out_dir, log=None):
    """Write a run (a directory or a loaded `Run`) as a Hugging Face folder; returns its path."""
    from safetensors.torch import save_file

    from lmlab.rundir.run import Run, load_run

    if not isinstance(run, Run):
        run = load_run(run)
    model_config = run.config.model
    architecture = hf_architecture(model_config)  # refuse before anything is written
    out_dir = Path(out_dir)
    with _atomic_dir(out_dir) as tmp:
        save_file(hf_state_dict(run.model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        eot_id, pad_id = _write_tokenizer(run.tokenizer, tmp, model_config.context_length)
        _write_json(tmp / "config.json", hf_config(model_config, eot_id, eot_id, pad_id))
        _write_json(tmp / "generation_config.json",
                    {"bos_token_id": eot_id, "eos_token_id": eot_id, "pad_token_id": pad_id})
    if log:
        log(f"{architecture} ({run.model.num_params():,} parameters) -> {out_dir}")
    return out_dir


def _write_tokenizer(tokenizer, folder, context_length):
    """tokenizer.json + tokenizer_config.json into `folder`; returns (eot id, pad id)."""
    tokenizer.save(folder)  # tokenizer.json and an HF-style tokenizer_config.json (PreTrainedTokenizerFast)
    config = _read_json(folder / "tokenizer_config.json")
    config["model_max_length"] = context_length  # what the positions cover; HF's default is "infinite"
    _write_json(folder / "tokenizer_config.json", config)
    return int(tokenizer.eot_id), int(tokenizer.pad_id)


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


def read_hf_weights(hf_dir):
    """The folder's tensors under our names: one model.safetensors, or the shards its index lists."""
    from safetensors.torch import load_file

    hf_dir = Path(hf_dir)
    if (hf_dir / "model.safetensors").is_file():
        files = ["model.safetensors"]
    elif (hf_dir / "model.safetensors.index.json").is_file():
        index = _read_json(hf_dir / "model.safetensors.index.json")
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
    from lmlab.model.transformer import Transformer

    hf_dir = Path(hf_dir)
    if not hf_dir.is_dir():
        raise LmlabError(f"Hugging Face folder {hf_dir} does not exist")
    if not (hf_dir / "config.json").is_file():
        raise LmlabError(f"{hf_dir} has no config.json; is it a Hugging Face model folder?")
    hf = _read_json(hf_dir / "config.json")
    model_config = model_config_from_hf(hf, source=str(hf_dir / "config.json"))
    tokenizer = load_hf_tokenizer(hf_dir, hf)
    if tokenizer.vocab_size > model_config.vocab_size:
        raise LmlabError(f"{hf_dir}: the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                         f"{model_config.vocab_size} embeddings")

    state = read_hf_weights(hf_dir)
    if model_config.tie_embeddings:
        state.pop("lm_head.weight", None)  # some folders store the tied head anyway; it is the embedding
        if "embed_tokens.weight" in state:
            state["lm_head.weight"] = state["embed_tokens.weight"]
    model = Transformer(model_config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or wrong_shape:
        problems = [f"{label}: {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"
                    for label, keys in (("missing", missing), ("unexpected", unexpected),
                                        ("wrong shape", wrong_shape)) if keys]
        raise LmlabError(f"{hf_dir}: the weights do not match config.json ({'; '.join(problems)})")
    model.load_state_dict(state)
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

    sources = [_read_json(hf_dir / name) for name in ("tokenizer_config.json", "special_tokens_map.json")
               if (hf_dir / name).is_file()]
    eos = next((token_text(s.get("eos_token")) for s in sources if s.get("eos_token")), None)
    pad = next((token_text(s.get("pad_token")) for s in sources if s.get("pad_token")), None)
    if eos is None:
        configs = [_read_json(hf_dir / "generation_config.json")] if (hf_dir / "generation_config.json").is_file() else []
        configs.append(hf_config if hf_config is not None else _read_json(hf_dir / "config.json"))
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


def import_hf(hf_dir, run_dir, log=None):
    """Turn a local Hugging Face Llama / Qwen3 folder into a run directory; returns its path.

    The run loads with `lmlab.rundir.run.load_run`, samples with `lmlab generate` and
    exports back to the same folder. Its config records the source folder as
    model.init_from and data.tokenizer, so `lmlab train --config RUN/config.toml`
    continues from these weights with this tokenizer.
    """
    from lmlab.rundir.run import save_config, save_weights

    hf_dir, run_dir = Path(hf_dir), Path(run_dir)
    model, tokenizer, model_config = load_hf_model(hf_dir)
    model_config.init_from = str(hf_dir.resolve())
    config = Config(model=model_config, name=run_dir.name)
    config.data.tokenizer = str(hf_dir.resolve())
    validate(config)
    with _atomic_dir(run_dir) as tmp:
        save_config(tmp, config)
        tokenizer.save(tmp)
        save_weights(model, tmp)
    if log:
        log(model.summary())
        log(f"{hf_dir} -> {run_dir}")
    return run_dir


# --- files -------------------------------------------------------------------------


@contextlib.contextmanager
def _atomic_dir(target):
    """Yield an empty temporary directory that becomes `target` when the block succeeds."""
    target = Path(target)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise LmlabError(f"{target} already exists; give a new directory (nothing was overwritten)")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        # mkdtemp, mkstemp and safetensors make private (0600 / 0700) files; a
        # folder meant for sharing gets the user's usual permissions instead.
        umask = os.umask(0)
        os.umask(umask)
        for path in tmp.rglob("*"):
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)
        os.chmod(tmp, 0o777 & ~umask)
        if target.exists():
            target.rmdir()  # an empty directory the user made for us
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _read_json(path):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LmlabError(f"{path} is not valid JSON: {e}") from None


def _write_json(path, obj):
    Path(path).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")
