"""Configs: four dataclass sections, TOML presets, dotted command-line overrides.

Design choices:
- Every knob is a dataclass field with a default and a one-line comment, so the
  dataclasses below are the reference of all keys.
- A run is described by one resolved `Config`; it is written to the run
  directory as TOML so that `lmlab train --config runs/x/config.toml` repeats it.
- Unknown keys and wrong types are `LmlabError`s naming the closest valid key.
- Derived values ("0 = derive": d_ff, n_kv_heads, head_dim, vocab size) are
  computed in one place, `ModelConfig.resolved`, and the trainer writes the
  resolved section back, so the saved config holds the numbers actually used.
- Switches are `Literal[...]` fields: their allowed values are written once,
  in the annotation, and `validate` checks every one of them.
"""

import dataclasses
import difflib
import math
import re
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import tomli_w

from lmlab.errors import LmlabError

# A length of time in seconds; config files and the command line may also say "90m", "1.5h", "1h30m".
Duration = typing.NewType("Duration", float)
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(value, key="duration"):
    """Seconds from a number or a string like '90', '90s', '90m', '1.5h', '1h30m'."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) or isinstance(value, str) and re.fullmatch(r"\s*(\d+(\.\d*)?|\.\d+)\s*", value):
        seconds = float(value)
    elif isinstance(value, str) and re.fullmatch(r"((\d+(\.\d*)?|\.\d+)[smhd])+", value.strip().lower()):
        parts = re.findall(r"(\d+(?:\.\d*)?|\.\d+)([smhd])", value.strip().lower())
        seconds = sum(float(number) * _DURATION_UNITS[unit] for number, unit in parts)
    else:
        raise LmlabError(f"config key '{key}' wants a duration (seconds, or like 90m, 1.5h, 1h30m), got {value!r}")
    if not math.isfinite(seconds) or seconds < 0:
        raise LmlabError(f"config key '{key}' must be a duration >= 0, got {value!r}")
    return seconds


@dataclass
class ModelConfig:
    vocab_size: int = 0  # 0 = follow the tokenizer; larger pads the embedding (e.g. to a multiple of 64)
    context_length: int = 256  # maximum sequence length seen in training
    d_model: int = 256  # residual stream width
    n_layers: int = 4  # transformer blocks
    n_heads: int = 8  # query heads; d_model must divide by it (unless head_dim is set)
    n_kv_heads: int = 0  # key/value heads for grouped-query attention; 0 = n_heads
    d_ff: int = 0  # feed-forward hidden width; 0 = 8/3 d_model rounded up to 64 for swiglu, 4 d_model for silu / gelu / relu2
    rope_theta: float = 10000.0  # RoPE base frequency
    norm_eps: float = 1e-5  # epsilon of every norm (RMSNorm, LayerNorm, QK-norm)
    tie_embeddings: bool = False  # share the input embedding with the LM head
    init_std: float = 0.02  # std of the normal init; residual projections are scaled by 1/sqrt(2 n_layers)
    dropout: float = 0.0  # dropout on attention weights and residual branches
    norm: Literal["rmsnorm", "layernorm", "none"] = "rmsnorm"  # rmsnorm, layernorm (nanoGPT's: gain, and a bias when model.bias), none (no norm anywhere)
    norm_position: Literal["pre", "post"] = "pre"  # pre: x + f(Norm(x)) (Llama); post: Norm(x + f(x)) (original Transformer)
    position: Literal["rope", "nope", "learned"] = "rope"  # rope (rotary, rope_theta), nope (no position information), learned (absolute embedding)
    ffn: Literal["swiglu", "silu", "gelu", "relu2"] = "swiglu"  # swiglu: W2(SiLU(W1 x) * W3 x); silu: W2 SiLU(W1 x); gelu: W2 GELU(W1 x); relu2: W2 ReLU(W1 x)^2 (modded-nanogpt)
    zero_init_proj: bool = False  # start the residual-writing projections (o_proj, down_proj) at zero: each block begins as the identity (modded-nanogpt)
    logit_softcap: float = 0.0  # logits = cap * tanh(logits / cap) at the LM head (Gemma 2, modded-nanogpt); 0 = off
    head_dim: int = 0  # width of one attention head; 0 = d_model / n_heads
    qk_norm: bool = False  # RMSNorm of queries and keys over each head before RoPE (as in Qwen3)
    key_norm: bool = False  # KeyNorm: keys L2-normalised per head, logits = scale * q.k/|k| instead of q.k/sqrt(head_dim)
    key_norm_scale: float = 0.0  # KeyNorm logit scale: > 0 fixed; 0 = learned, one per head, starting at 1
    bias: bool = False  # biases in the attention and feed-forward projections (and LayerNorm); never in lm_head
    memory: int = 0  # Transformer-XL memory: keys/values of each row's last M tokens carried to its next segment (needs data.packing = stream); 0 = off
    init_from: str = ""  # local Hugging Face Llama / Qwen3 folder to start from (its architecture and weights)

    def resolved(self, vocab_size=0):
        """A copy with every "0 = derive" field filled in: the numbers the model is built with.

        The one place the derived values are computed (d_ff, n_kv_heads, head_dim, and
        vocab_size from the tokenizer's `vocab_size` when given); the model, export,
        resume and benchmarks read the filled fields. Idempotent.
        """
        return dataclasses.replace(
            self, vocab_size=self.vocab_size or vocab_size, d_ff=resolve_d_ff(self),
            n_kv_heads=self.n_kv_heads or self.n_heads, head_dim=self.head_dim or self.d_model // self.n_heads)


@dataclass
class DataConfig:
    corpus: str = "tinystories"  # bundled corpus name (tinystories, zh, books; copy, repeat: synthetic, written on first use) or "" to use train_files
    train_files: list[str] = field(default_factory=list)  # text / .jsonl files (.gz/.xz ok) used when corpus = ""
    val_files: list[str] = field(default_factory=list)  # validation files; empty = hold out val_fraction of documents
    val_fraction: float = 0.05  # share of documents held out when there are no val_files
    tokenizer: str = ""  # directory (or tokenizer.json) of an existing tokenizer; "" = train one and cache it
    tokenizer_vocab_size: int = 4096  # vocab size when lmlab trains the tokenizer
    special_tokens: list[str] = field(default_factory=list)  # extra special tokens (one id each, longest match wins), e.g. ["<|im_start|>", "<|im_end|>"]; <|endoftext|> is always one
    shards: str = ""  # directory of prepared shards; "" = prepare them and cache them
    cache_dir: str = ""  # where built tokenizers and shards are cached; "" = $LMLAB_CACHE or ~/.cache/lmlab
    packing: Literal["concat", "document", "stream"] = "concat"  # concat: random windows over joined documents; document: one document per row, padded; stream: each row reads a document segment by segment across steps (docs/long-documents.md)
    segments_per_document: int = 32  # stream packing: at most this many context_length segments per document per epoch
    text_key: str = "text"  # field holding the text in .jsonl files
    workers: int = 0  # processes that tokenize when shards are prepared; 0 = every core (shards are the same either way)


@dataclass
class OptimConfig:
    lr: float = 1e-3  # peak learning rate, reached at the end of warmup
    min_lr: float = 1e-4  # learning rate at the last step
    warmup_steps: int = 100  # linear warmup from 0 to lr
    schedule: Literal["cosine", "constant", "wsd", "linear", "plateau"] = "cosine"  # after warmup: cosine | linear (to min_lr at the end) | wsd | constant | plateau (see docs/schedules.md)
    progress: Literal["auto", "steps", "tokens", "time"] = "auto"  # what the schedule runs on: steps, tokens, time (train.max_time); auto = the budget nearest its end
    wsd_decay_fraction: float = 0.2  # wsd: share of the run, at its end, over which lr decays to min_lr (stable before)
    wsd_decay_shape: Literal["1-sqrt", "linear", "cosine"] = "1-sqrt"  # wsd decay: 1-sqrt (Hagele et al. 2024), linear, cosine
    plateau_factor: float = 0.5  # plateau: multiply lr by this when validation loss stops improving (floor min_lr)
    plateau_patience: int = 2  # plateau: evaluations without improvement tolerated before a cut
    plateau_threshold: float = 1e-3  # plateau: relative improvement that counts (val < best * (1 - threshold))
    plateau_cooldown: int = 0  # plateau: evaluations to wait after a cut before counting again
    weight_decay: float = 0.1  # AdamW decoupled decay on matrices; never on norms or biases
    beta1: float = 0.9  # AdamW first-moment decay
    beta2: float = 0.95  # AdamW second-moment decay
    eps: float = 1e-8  # AdamW epsilon
    grad_clip: float = 1.0  # clip the global gradient norm to this; 0 = off
    fused: Literal["auto", "true", "false"] = "auto"  # fused AdamW kernel: auto (when the device supports it), true, false
    name: Literal["adamw", "adamw8bit", "muon"] = "adamw"  # adamw (torch), adamw8bit (bitsandbytes' 8-bit AdamW; pip install bitsandbytes), muon (Muon for the blocks' matrices, AdamW for the rest; docs/speed.md)
    embed_lr: float = 0.0  # muon: AdamW lr of the embeddings; 0 = optim.lr (scheduled with it)
    head_lr: float = 0.0  # muon: AdamW lr of the LM head (untied); 0 = optim.lr
    scalar_lr: float = 0.0  # muon: AdamW lr of norms' gains, biases and other vectors; 0 = optim.lr
    muon_momentum: float = 0.95  # muon: momentum of the orthogonalised update
    muon_nesterov: bool = True  # muon: Nesterov momentum
    muon_ns_steps: int = 5  # muon: Newton-Schulz iterations (quintic, Jordan's coefficients)
    muon_momentum_warmup_steps: int = 0  # muon: momentum rises from 0.85 to muon_momentum over these steps; 0 = off


@dataclass
class TrainConfig:
    batch_size: int = 32  # sequences per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    max_steps: int = 1000  # optimizer steps; the schedule ends here
    max_tokens: int = 0  # stop after this many training tokens instead (0 = use max_steps)
    eval_every: int = 100  # steps between validation evaluations (and one at the end); 0 = only at the end
    eval_batches: int = 20  # micro-batches in the fixed validation subset
    log_every: int = 10  # steps between train-loss records in metrics.jsonl
    precision: Literal["fp32", "bf16", "fp16", "auto"] = "fp32"  # fp32, bf16 (autocast), fp16 (autocast + grad scaler); "auto" = bf16 on GPUs that have it
    compile: bool = False  # torch.compile the model (and the loss, which runs inside its forward)
    attention: Literal["sdpa", "eager", "flash_attn", "xformers"] = "sdpa"  # sdpa (torch picks flash / memory-efficient kernels), eager (plain ops), flash_attn, xformers (if installed)
    activation_checkpointing: bool = False  # recompute each block's activations in backward: less memory, ~1/3 more compute
    loss_chunk: int = 4096  # LM head + fp32 loss over this many rows at a time, never the full logits; 0 = all at once
    fuse_projections: Literal["auto", "true", "false"] = "auto"  # one packed matrix for q/k/v (and SwiGLU's gate/up) while training; saved weights keep the separate names; auto = on where it helps (speed.md)
    device: str = "auto"  # auto, cpu, cuda, cuda:N, mps
    seed: int = 1337  # seeds init, data order and sampling
    run_name: str = ""  # run directory name; "" = <preset>-<date>-<time>
    runs_dir: str = "runs"  # parent of run directories
    sample_prompts: list[str] = field(default_factory=lambda: ["Once upon a time"])  # prompts sampled at the end
    sample_tokens: int = 200  # new tokens per end-of-run sample
    sample_temperature: float = 0.8  # temperature of end-of-run samples
    sample_top_k: int = 50  # top-k of end-of-run samples (0 = off)
    threads: int = 0  # torch CPU threads; 0 = torch's default
    max_time: Duration = 0.0  # stop after this much training time: seconds, or "90m", "1.5h", "1h30m"; 0 = no limit
    target_val_loss: float = 0.0  # stop at the first evaluation with validation loss <= this (status target_reached); 0 = off
    diverge_factor: float = 3.0  # status diverged when the loss stays above this x min(best, first) loss (NaN/inf: at once); 0 = off
    diverge_patience: int = 100  # steps the loss must stay above diverge_factor x best to count (spikes that recover do not)
    context_schedule: str = ""  # context curriculum "64:0.3,128:0.6,256:1" (context until progress); tokens per step stay fixed
    norms_every: int = 100  # steps between per-layer weight / gradient / activation norm records in metrics.jsonl; 0 = off
    print_every: int = 0  # steps between status lines when stderr is no terminal (CI, SLURM logs); 0 = 20 per run
    peak_tflops: float = 0.0  # device peak for MFU in TFLOP/s; 0 = the GPU table, or a measured matmul on CPU
    parallel: Literal["auto", "none", "ddp", "fsdp"] = "auto"  # under torchrun: ddp, fsdp (FSDP2 sharding), none; auto = ddp with 2+ processes
    collective_timeout: float = 600.0  # seconds a collective waits for the other ranks (a dead or hung one) before the run fails (status failed)
    tensorboard: bool = False  # also log to runs/NAME/tensorboard (pip install 'lmlab[tensorboard]')
    wandb: bool = False  # also log to Weights & Biases (pip install 'lmlab[wandb]'; WANDB_MODE=offline works)
    wandb_project: str = "lmlab"  # wandb project of the run
    evals: list[str] = field(default_factory=list)  # run at validation time, into metrics.jsonl: copy, reverse, history, mmlu, cmmlu
    evals_random_tokens: Literal["seen", "frequency", "vocab"] = "seen"  # random copy/reverse tokens: seen in the training shards, by training frequency, or the whole vocabulary
    evals_separator: str = ""  # text between a copy/reverse probe sequence and its copy; "" = the end-of-text token
    evals_every: int = 0  # steps between train.evals (a multiple of train.eval_every); 0 = at every validation evaluation
    checkpoint_every: int = 0  # steps between checkpoints in runs/NAME/checkpoints; 0 = off (one is still written at the end and on SIGINT / SIGTERM)
    checkpoint_minutes: float = 30.0  # training minutes between checkpoints; 0 = off
    keep_checkpoints: int = 2  # newest checkpoints kept; 0 = write none (the run cannot be resumed)
    on_checkpoint_error: Literal["stop", "continue"] = "stop"  # a checkpoint the disk refuses: stop (status failed, the last good one kept) or warn and go on
    resume: str = ""  # a run directory to continue from its latest checkpoint, or "auto" = runs_dir/run_name if it exists
    on_nonfinite: Literal["stop", "skip"] = "stop"  # NaN/inf loss or gradients, caught before the update: stop (status diverged) or skip the batch


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    name: str = "run"  # preset name, used to derive run names (taken from the file name when absent)


SECTIONS = {f.name: f.type for f in dataclasses.fields(Config) if f.name != "name"}
CONFIGS_DIR = Path(__file__).parent / "configs"
DEFAULT_PRESET = "cpu-quickstart"


def all_keys():
    """Every valid dotted key, e.g. 'optim.lr'."""
    return ["name"] + [
        f"{section}.{f.name}" for section, cls in SECTIONS.items() for f in dataclasses.fields(cls)
    ]


# Names users bring from nanoGPT, litgpt and HF configs, mapped to ours.
ALIASES = {
    "learning_rate": "lr", "lr_min": "min_lr", "warmup": "warmup_steps", "wd": "weight_decay",
    "n_layer": "n_layers", "num_hidden_layers": "n_layers", "n_head": "n_heads",
    "num_attention_heads": "n_heads", "num_key_value_heads": "n_kv_heads", "n_embd": "d_model",
    "hidden_size": "d_model", "dim": "d_model", "intermediate_size": "d_ff", "block_size": "context_length",
    "seq_len": "context_length", "max_seq_len": "context_length", "steps": "max_steps", "max_iters": "max_steps",
    "gradient_accumulation_steps": "grad_accum", "dtype": "precision", "clip": "grad_clip",
}


def did_you_mean(key, candidates):
    """' (did you mean 'x'?)' for the candidate closest to a mistyped key or value, or ''."""
    section, _, name = key.rpartition(".")
    if name in ALIASES:
        for candidate in candidates:
            if candidate.rpartition(".")[2] == ALIASES[name] and candidate.startswith(section):
                return f" (did you mean '{candidate}'?)"
    same_section = [c for c in candidates if section and c.startswith(section + ".")]
    match = difflib.get_close_matches(key, same_section, n=1, cutoff=0.6) or difflib.get_close_matches(
        key, candidates, n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""


def field_type(section_cls, name):
    """The annotated type of a section's field (int, str, Literal[...], Duration, list[str])."""
    hints = typing.get_type_hints(section_cls)
    return hints[name]


def choice_fields(config):
    """(key, value, allowed) of every switch: the fields typed Literal[...], whose allowed values are written there."""
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            typ = field_type(cls, f.name)
            if typing.get_origin(typ) is Literal:
                yield f"{section}.{f.name}", getattr(getattr(config, section), f.name), typing.get_args(typ)


def _coerce(value, typ, key):
    """Check (and for strings from the command line, convert) a value to a field's type."""
    if typ is Duration:
        return parse_duration(value, key)
    origin = typing.get_origin(typ)
    if origin is list:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v != ""]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise LmlabError(f"config key '{key}' wants a list of strings, got {value!r}")
        return list(value)
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise LmlabError(f"config key '{key}' wants true or false, got {value!r}")
    if typ is int:
        if isinstance(value, bool):
            raise LmlabError(f"config key '{key}' wants an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                number = float(value.replace("_", ""))
            except ValueError:
                number = None
            if number is not None and number.is_integer():
                return int(number)
        raise LmlabError(f"config key '{key}' wants an integer, got {value!r}")
    if typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise LmlabError(f"config key '{key}' wants a number, got {value!r}")
    if typ is str or typing.get_origin(typ) is Literal:
        if isinstance(value, str):
            return value
        raise LmlabError(f"config key '{key}' wants a string, got {value!r}")
    raise TypeError(f"unsupported config field type {typ} for {key}")


RENAMED = {"train.dist_timeout": "train.collective_timeout"}  # old names still read (configs, checkpoints of older runs)


def set_key(config, key, value):
    """Set a dotted key ('optim.lr') on `config`, checking the key and the type."""
    key = RENAMED.get(key, key)
    if key == "name":
        config.name = _coerce(value, str, key)
        return
    section, _, name = key.partition(".")
    if section not in SECTIONS or not name:
        raise LmlabError(f"unknown config key '{key}'{did_you_mean(key, all_keys())}")
    section_cls = SECTIONS[section]
    names = [f.name for f in dataclasses.fields(section_cls)]
    if name not in names:
        raise LmlabError(f"unknown config key '{key}'{did_you_mean(key, all_keys())}")
    setattr(getattr(config, section), name, _coerce(value, field_type(section_cls, name), key))


def from_dict(raw, source="config"):
    """Build a Config from nested dicts (as read from TOML), rejecting unknown keys."""
    config = Config()
    for section, values in raw.items():
        if section == "name":
            set_key(config, "name", values)
            continue
        if section not in SECTIONS:
            raise LmlabError(f"{source}: unknown config section '{section}'{did_you_mean(section, list(SECTIONS))}")
        if not isinstance(values, dict):
            raise LmlabError(f"{source}: '{section}' must be a table like [{section}]")
        for name, value in values.items():
            try:
                set_key(config, f"{section}.{name}", value)
            except LmlabError as e:
                raise LmlabError(f"{source}: {e}") from None
    return config


def preset_path(name):
    """Path of a bundled preset given its name ('cpu-quickstart') or a file path."""
    path = Path(name)
    if path.suffix == ".toml" or path.exists():
        return path
    bundled = CONFIGS_DIR / f"{name}.toml"
    if bundled.exists():
        return bundled
    names = sorted(p.stem for p in CONFIGS_DIR.glob("*.toml"))
    raise LmlabError(f"no config file or preset named '{name}'{did_you_mean(name, names)}; presets: {', '.join(names)}")


def load_config(path=None, overrides=()):
    """Load a TOML preset (default: the CPU quick start) and apply KEY=VALUE overrides."""
    path = preset_path(path or DEFAULT_PRESET)
    if path.is_dir():
        raise LmlabError(f"config {path} is a directory; give a .toml file")
    if not path.exists():
        raise LmlabError(f"config file {path} does not exist")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise LmlabError(f"config file {path} is not valid TOML: {e}") from None
    except UnicodeDecodeError:
        raise LmlabError(f"config file {path} is not UTF-8 text") from None
    raw.setdefault("name", path.stem if path.name != "config.toml" else path.parent.name)
    config = from_dict(raw, source=str(path))
    apply_overrides(config, overrides)
    _new_name_for_a_repeat(config, path, overrides)
    validate(config)
    return config


def _new_name_for_a_repeat(config, path, overrides):
    """A run's own config.toml, loaded to repeat the run, gives the repeat a new (generated) name.

    Its train.run_name is the run's own, which a new run may not take (a name
    that exists is refused). Kept when the command names the run itself: an
    explicit train.run_name, or train.resume=auto (continue it if it exists).
    """
    t = config.train
    named = any(item.partition("=")[0].strip() == "train.run_name" for item in overrides)
    if path.name == "config.toml" and t.run_name == path.parent.name and not named and t.resume != "auto":
        t.run_name = ""


def apply_overrides(config, overrides):
    for item in overrides:
        key, eq, value = item.partition("=")
        if not eq:
            raise LmlabError(f"override '{item}' is not KEY=VALUE (for example optim.lr=3e-3)")
        set_key(config, key.strip(), value.strip())
    return config


def to_dict(config):
    return dataclasses.asdict(config)


def flat_keys(config):
    """{dotted key: value} of a Config ('optim.lr': 0.001, 'name': ...), for comparing configs."""
    out = {}
    for section, values in to_dict(config).items():
        if isinstance(values, dict):
            out.update({f"{section}.{key}": value for key, value in values.items()})
        else:
            out[section] = values
    return out


def to_toml(config):
    return tomli_w.dumps(to_dict(config))


def validate(config):
    """Reject values that cannot work, with a sentence a user can act on."""
    for key, value, allowed in choice_fields(config):
        if value not in allowed:
            raise LmlabError(f"config key '{key}' is '{value}'; choose one of {', '.join(allowed)}{did_you_mean(value, allowed)}")
    _check_numbers(config)
    _check_model(config.model)
    _check_budget_and_data(config)
    _check_stream(config)


def _check_numbers(config):
    """Sizes that must be positive, counts and periods that must not be negative, learning rates."""
    m, o, t = config.model, config.optim, config.train
    positive = {
        "model.context_length": m.context_length, "model.d_model": m.d_model,
        "model.n_layers": m.n_layers, "model.n_heads": m.n_heads,
        "train.batch_size": t.batch_size, "train.grad_accum": t.grad_accum,
        "train.eval_batches": t.eval_batches, "train.log_every": t.log_every,
    }
    for key, value in positive.items():
        if value <= 0:
            raise LmlabError(f"config key '{key}' must be positive, got {value}")
    if not t.collective_timeout > 0:
        raise LmlabError("config key 'train.collective_timeout' must be a positive number of seconds, "
                         f"got {t.collective_timeout}")
    for key, value in {"train.norms_every": t.norms_every, "train.print_every": t.print_every,
                       "train.peak_tflops": t.peak_tflops, "train.loss_chunk": t.loss_chunk}.items():
        if value < 0:
            raise LmlabError(f"config key '{key}' must be >= 0 (0 = off / automatic), got {value}")
    for key, value in {"train.checkpoint_every": t.checkpoint_every, "train.checkpoint_minutes": t.checkpoint_minutes,
                       "train.keep_checkpoints": t.keep_checkpoints}.items():
        if not value >= 0 or not math.isfinite(value):
            raise LmlabError(f"config key '{key}' must be >= 0 (0 = off), got {value}")
    for key, value in {"optim.lr": o.lr, "optim.min_lr": o.min_lr}.items():
        if not math.isfinite(value) or value < 0 or (key == "optim.lr" and value == 0):
            raise LmlabError(f"config key '{key}' must be a {'positive' if key == 'optim.lr' else 'non-negative'} "
                             f"number, got {value}")


def _check_model(m):
    """Shapes the transformer can be built with."""
    if m.head_dim < 0:
        raise LmlabError(f"model.head_dim must be >= 0 (0 = d_model / n_heads), got {m.head_dim}")
    if not m.head_dim and m.d_model % m.n_heads:
        raise LmlabError(f"model.d_model={m.d_model} must be divisible by model.n_heads={m.n_heads}")
    derived = m.resolved()
    head_dim, kv = derived.head_dim, derived.n_kv_heads
    if m.position == "rope" and head_dim % 2:
        raise LmlabError(f"head size {head_dim} must be even for RoPE (or set model.position=nope / learned)")
    if kv < 0 or m.n_heads % kv:
        raise LmlabError(f"model.n_heads={m.n_heads} must be divisible by model.n_kv_heads={kv}")
    if not 0 <= m.dropout < 1:
        raise LmlabError(f"model.dropout must lie in [0, 1), got {m.dropout}")
    if m.init_std <= 0 or m.norm_eps <= 0 or m.rope_theta <= 0:
        raise LmlabError("model.init_std, model.norm_eps and model.rope_theta must be positive")
    if m.key_norm_scale < 0:
        raise LmlabError(f"model.key_norm_scale must be >= 0 (0 = learned), got {m.key_norm_scale}")
    if not m.logit_softcap >= 0 or not math.isfinite(m.logit_softcap):
        raise LmlabError(f"model.logit_softcap must be >= 0 (0 = off), got {m.logit_softcap}")
    if m.d_ff < 0 or m.vocab_size < 0:
        raise LmlabError("model.d_ff and model.vocab_size must be >= 0 (0 = derive them)")
    if m.memory < 0:
        raise LmlabError(f"model.memory must be >= 0 tokens (0 = no memory across segments), got {m.memory}")
    if m.memory and m.position == "learned":
        raise LmlabError("model.memory needs relative positions (model.position = rope or nope): learned absolute "
                         "positions cannot continue across segments")


def _check_stream(config):
    """data.packing = stream and model.memory (docs/long-documents.md)."""
    d, m, t = config.data, config.model, config.train
    if d.segments_per_document < 1:
        raise LmlabError(f"data.segments_per_document must be >= 1, got {d.segments_per_document}")
    if m.memory and d.packing != "stream":
        raise LmlabError(f"model.memory={m.memory} needs data.packing = \"stream\" (with packing={d.packing} a row's "
                         "next segment is not the continuation of its last one, so there is nothing to remember)")
    if d.packing == "stream" and t.context_schedule.strip():
        raise LmlabError("train.context_schedule cannot be used with data.packing = stream: segments are "
                         "model.context_length tokens throughout")


def _check_budget_and_data(config):
    """A budget that ends, a schedule that fits it, data to read, evals that exist."""
    d, o, t = config.data, config.optim, config.train
    if t.max_steps <= 0 and t.max_tokens <= 0 and t.max_time <= 0:
        raise LmlabError("set train.max_steps, train.max_tokens or train.max_time to a positive number")
    validate_schedule(config)
    if not 0 <= o.min_lr <= o.lr:
        raise LmlabError(f"optim.min_lr={o.min_lr} must lie between 0 and optim.lr={o.lr}")
    if o.warmup_steps < 0:
        raise LmlabError(f"optim.warmup_steps must be >= 0, got {o.warmup_steps}")
    _check_muon(o)
    _check_fusion(config)
    if not d.corpus and not d.train_files and not d.shards:
        raise LmlabError("no training data: set data.corpus, data.train_files or data.shards")
    if not 0 < d.val_fraction < 1:
        raise LmlabError(f"data.val_fraction must lie strictly between 0 and 1, got {d.val_fraction}")
    if d.workers < 0:
        raise LmlabError(f"data.workers must be >= 1, or 0 for every core, got {d.workers}")
    evals = ("copy", "reverse", "history", "mmlu", "cmmlu")  # train.evals (lmlab/evals/training.py)
    for name in t.evals:
        if name not in evals:
            raise LmlabError(f"train.evals has '{name}'; choose from {', '.join(evals)}{did_you_mean(name, list(evals))}")
    if t.evals_every < 0 or (t.evals_every and t.eval_every and t.evals_every % t.eval_every):
        raise LmlabError(f"train.evals_every={t.evals_every} must be 0 or a multiple of train.eval_every={t.eval_every} "
                         "(the evals run at validation time)")


def _check_fusion(config):
    """train.fuse_projections=true only where packing changes nothing (lmlab/model/fused.py)."""
    o, t = config.optim, config.train
    if t.fuse_projections != "true":
        return
    if o.name != "adamw":
        raise LmlabError(f"train.fuse_projections=true needs optim.name=adamw, got {o.name} (Muon orthogonalises "
                         "each matrix and 8-bit AdamW quantises state in blocks: a packed q/k/v would change both); "
                         "use train.fuse_projections=auto or false")
    if t.parallel == "fsdp":
        raise LmlabError("train.fuse_projections=true does not work with train.parallel=fsdp (its checkpoints name "
                         "parameters as the model holds them); use train.fuse_projections=auto or false")


def _check_muon(o):
    """optim.name=muon's keys (lmlab/training/muon.py); the group learning rates also steer nothing else."""
    for key in ("embed_lr", "head_lr", "scalar_lr"):
        value = getattr(o, key)
        if not math.isfinite(value) or value < 0:
            raise LmlabError(f"config key 'optim.{key}' must be >= 0 (0 = optim.lr), got {value}")
        if value and o.name != "muon":
            raise LmlabError(f"optim.{key} applies to optim.name=muon only (got optim.name={o.name})")
    if not 0 <= o.muon_momentum < 1:
        raise LmlabError(f"optim.muon_momentum must lie in [0, 1), got {o.muon_momentum}")
    if o.muon_ns_steps < 1 or o.muon_momentum_warmup_steps < 0:
        raise LmlabError("optim.muon_ns_steps must be >= 1 and optim.muon_momentum_warmup_steps >= 0")


def validate_schedule(config):
    """The schedule, stop-rule and context-curriculum keys (lmlab/training/schedules.py, training/stops.py, data/curriculum.py)."""
    from lmlab.data.curriculum import parse_context_schedule

    o, t = config.optim, config.train
    if o.progress in ("steps", "tokens") and t.max_steps <= 0 and t.max_tokens <= 0:
        raise LmlabError(f"optim.progress={o.progress} needs train.max_steps or train.max_tokens "
                         "(or use optim.progress=time with train.max_time)")
    if o.progress == "time" and t.max_time <= 0:
        raise LmlabError("optim.progress=time needs train.max_time (e.g. train.max_time=90m)")
    if not 0 < o.wsd_decay_fraction <= 1:
        raise LmlabError(f"optim.wsd_decay_fraction must lie in (0, 1], got {o.wsd_decay_fraction}")
    if not 0 < o.plateau_factor < 1:
        raise LmlabError(f"optim.plateau_factor must lie strictly between 0 and 1, got {o.plateau_factor}")
    for key, value in {"optim.plateau_patience": o.plateau_patience, "optim.plateau_cooldown": o.plateau_cooldown,
                       "optim.plateau_threshold": o.plateau_threshold, "train.target_val_loss": t.target_val_loss,
                       "train.diverge_patience": t.diverge_patience}.items():
        if value < 0:
            raise LmlabError(f"config key '{key}' must be >= 0, got {value}")
    if t.diverge_factor != 0 and t.diverge_factor <= 1:
        raise LmlabError(f"train.diverge_factor must be > 1 (or 0 = only NaN/inf), got {t.diverge_factor}")
    parse_context_schedule(t.context_schedule, config.model.context_length, t.batch_size)


def absolute_inputs(config):
    """Make the paths a run reads (data files, tokenizer, shards, cache, init_from) absolute, in place; returns config.

    config.toml promises that `lmlab train --config RUN/config.toml` repeats the
    run; with `tokenizer = "tok"` it would only do so from the folder the run was
    started in. Relative paths mean the current folder when the run starts, so
    they are fixed there (os.path.abspath: symlinks kept as given). Outputs
    (train.runs_dir) stay relative: a repeat writes where it is started.
    """
    import os

    def absolute(path):
        return os.path.abspath(os.path.expanduser(path)) if path else path

    d, m = config.data, config.model
    d.train_files = [absolute(f) for f in d.train_files]
    d.val_files = [absolute(f) for f in d.val_files]
    d.tokenizer, d.shards, d.cache_dir = absolute(d.tokenizer), absolute(d.shards), absolute(d.cache_dir)
    m.init_from = absolute(m.init_from)
    return config


def total_steps(config):
    """Optimizer steps of the run: max_tokens (when set) converted to steps, else max_steps.

    None when only train.max_time bounds the run (it stops on the clock).
    """
    t, m = config.train, config.model
    if t.max_tokens <= 0 and t.max_steps <= 0:
        return None
    if t.max_tokens > 0:
        tokens_per_step = t.batch_size * t.grad_accum * m.context_length
        return max(1, -(-t.max_tokens // tokens_per_step))
    return t.max_steps


def resolve_d_ff(model):
    """Feed-forward width when d_ff = 0: roughly 8 d_model^2 parameters whatever the FFN.

    SwiGLU (three matrices): 8/3 d_model rounded up to a multiple of 64.
    SiLU / GELU (two matrices): 4 d_model, as in GPT-2 and CS336's SiLU ablation.
    """
    if model.d_ff > 0:
        return model.d_ff
    if model.ffn in ("silu", "gelu", "relu2"):
        return 4 * model.d_model
    return 64 * -(-int(8 * model.d_model / 3) // 64)


def describe_keys(config=None):
    """'section.key = value' and comment lines, the comments read from the dataclass definitions above.

    The values are `config`'s: `lmlab config --keys` passes the config `lmlab train`
    would use (the quick-start preset, or --config, with the overrides), since
    the bare dataclass defaults are what no run uses. No config: those defaults.
    Values are written as TOML (`false`, `"rmsnorm"`), as a config file takes them.
    """
    import inspect

    config = config or Config()
    lines = []
    for section, cls in SECTIONS.items():
        values = getattr(config, section)
        for source_line in inspect.getsource(cls).splitlines():
            name, sep, rest = source_line.strip().partition(":")
            if not sep or name not in values.__dataclass_fields__:
                continue
            comment = rest.partition("#")[2].strip()
            lines.append(f"  {section}.{name} = {toml_value(getattr(values, name))}\n      {comment}")
    return "\n".join(lines)


def toml_value(value):
    """A value as TOML writes it: false, "rmsnorm", 0.001, ["a.txt"]."""
    if isinstance(value, list):  # on one line (tomli_w puts each item on its own)
        return "[" + ", ".join(map(toml_value, value)) + "]"
    return tomli_w.dumps({"v": value}).partition("=")[2].strip()
