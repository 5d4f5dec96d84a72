"""Generation speed: lmlab with and without its KV cache, next to transformers' generate on the same weights.

Design choices:
- Greedy decoding (temperature 0 is argmax in `sample_next`) and no stop
  token, so every candidate writes exactly `new_tokens` tokens and the token
  lists can be compared one for one.
- Random-init weights from a fixed seed: the cost of a forward pass does not
  depend on what the weights learned, and the benchmark needs no run.
- The default shape is the quick-start model with a 1024-token window, so the
  prompt and every new token fit: past the window lmlab slides it without the
  cache, which would measure something else (so that is refused).
- Correctness comes before speed: lmlab's cached tokens must equal its
  uncached ones or the benchmark raises. transformers' tokens may part from
  ours only at a float-level tie (the two best logits closer than
  TIE_TOLERANCE), which is said in the notes; anything else raises. These
  checks are also the candidates' warm-up calls.
- The reference is `LlamaForCausalLM` (or Qwen3 for qk_norm) built from
  lmlab's own exporter (`hf_config`, `hf_state_dict`), with no eos token, so
  `min_new_tokens` has nothing to suppress and argmax is plain argmax.
- Times include the prefill of the prompt: that is what a user waits for.
"""

import importlib.util

import torch

from lmlab.bench import common
from lmlab.bench.common import Section, time_side_by_side, transformers_model
from lmlab.device import autocast, resolve_device, resolve_precision
from lmlab.errors import LmlabError
from lmlab.model.transformer import Transformer
from lmlab.model.sampling import generate_ids

# The quick-start model (configs/cpu-quickstart.toml) with room for 64 + 512 tokens.
DEFAULT_SHAPE = dict(vocab_size=2048, context_length=1024, d_model=128, n_layers=4, n_heads=4, rope_theta=10000.0)
SEED = 0
# Largest gap between the two best logits at which lmlab and transformers may pick different tokens.
TIE_TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 5e-2}

CACHED, UNCACHED = "lmlab, KV cache", "lmlab, no cache"
HF_CACHED, HF_UNCACHED = "transformers, KV cache", "transformers, no cache"
COLUMNS = [("candidate", "candidate"), ("tokens_per_s", "new tokens/s"), ("ms_per_token", "ms / token"),
           ("speedup", "x lmlab no cache")]


def generation(shape=None, device="cpu", precision="fp32", prompt_tokens=64, new_tokens=512, repeats=3,
               reference=True, log=print):
    """Greedy generation speed of lmlab with and without the KV cache (and transformers' generate) as a Section.

    shape: a ModelConfig, or a dict of ModelConfig fields over DEFAULT_SHAPE.
    reference=False leaves transformers out (its uncached generate is the slowest candidate).
    """
    device = resolve_device(device)
    precision = resolve_precision(precision, device)
    if precision not in TIE_TOLERANCE:
        raise LmlabError(f"precision must be fp32, bf16, fp16 or auto, got {precision!r}")
    model_config = common.model_config(shape, DEFAULT_SHAPE)
    _check_lengths(model_config, prompt_tokens, new_tokens, repeats)
    torch.manual_seed(SEED)
    model = Transformer(model_config).to(device).eval()
    prompt = torch.randint(0, model_config.vocab_size, (prompt_tokens,),
                           generator=torch.Generator().manual_seed(SEED)).tolist()
    log(f"generation: {model.num_params():,} parameters, prompt {prompt_tokens} + {new_tokens} new tokens, "
        f"{device} {precision}")

    candidates = {
        CACHED: lambda: _lmlab_tokens(model, prompt, new_tokens, True, precision, device),
        UNCACHED: lambda: _lmlab_tokens(model, prompt, new_tokens, False, precision, device),
    }
    hf = _reference_model(model, device) if reference else None
    if hf is not None:
        candidates[HF_CACHED] = lambda: _hf_tokens(hf, prompt, new_tokens, True, precision, device)
        candidates[HF_UNCACHED] = lambda: _hf_tokens(hf, prompt, new_tokens, False, precision, device)

    log("generation: checking greedy tokens (cached vs uncached, and against transformers)")
    tokens = {name: fn() for name, fn in candidates.items()}  # also the warm-up call of each candidate
    check_cache_agrees(tokens[CACHED], tokens[UNCACHED])
    notes = [f"prompt {prompt_tokens} tokens (random ids, seed {SEED}), {new_tokens} new tokens, greedy; "
             f"times include the prompt's prefill",
             f"model: d_model {model_config.d_model}, {model_config.n_layers} layers, {model_config.n_heads} heads, "
             f"vocab {model_config.vocab_size}, context {model_config.context_length}, "
             f"{model.num_params():,} parameters, random init; {device} {precision}"]
    if hf is not None:
        for name in (HF_CACHED, HF_UNCACHED):
            notes.append(f"{name}: " + compare_with_reference(model, prompt, tokens[CACHED], tokens[name], precision,
                                                              device))
    elif reference:
        notes.append("transformers is not installed: no reference (pip install transformers)")

    log(f"generation: timing {len(candidates)} candidates in turns, {repeats} repeats")
    seconds = time_side_by_side(candidates, repeats=repeats, warmup=0, device=device)
    rows = [dict(candidate=name, tokens_per_s=new_tokens / s, ms_per_token=1000 * s / new_tokens,
                 speedup=seconds[UNCACHED] / s) for name, s in seconds.items()]
    kv_speedup = seconds[UNCACHED] / seconds[CACHED]
    notes.insert(0, f"KV-cache speed-up (lmlab): {kv_speedup:.2f}x at {new_tokens} new tokens")
    if hf is not None:
        import transformers

        notes.append(f"reference: transformers {transformers.__version__} {type(hf).__name__}.generate("
                     f"do_sample=False, use_cache=True/False, min_new_tokens=max_new_tokens={new_tokens}) "
                     "on the same weights")
    return Section("Generation: lmlab with and without KV cache, next to transformers", rows, COLUMNS, notes)


def _check_lengths(model_config, prompt_tokens, new_tokens, repeats):
    if prompt_tokens < 1 or new_tokens < 1 or repeats < 1:
        raise LmlabError(f"need prompt_tokens, new_tokens and repeats >= 1, "
                         f"got {prompt_tokens}, {new_tokens}, {repeats}")
    if prompt_tokens + new_tokens > model_config.context_length:
        raise LmlabError(f"prompt_tokens + new_tokens = {prompt_tokens + new_tokens} exceeds context_length "
                         f"{model_config.context_length}: past the window lmlab slides it without the cache; "
                         "generate fewer tokens or give a shape with a longer context_length")


def _lmlab_tokens(model, prompt, new_tokens, use_cache, precision, device):
    with autocast(precision, device):
        return generate_ids(model, prompt, new_tokens, temperature=0, use_cache=use_cache)


def _reference_model(model, device):
    """transformers' model with lmlab's weights, or None without transformers."""
    if importlib.util.find_spec("transformers") is None:
        return None
    from lmlab.model.hf import hf_state_dict

    return transformers_model(model.config, hf_state_dict(model), device).eval()


def _hf_tokens(hf, prompt, new_tokens, use_cache, precision, device):
    ids = torch.tensor([prompt], device=device)
    with torch.no_grad(), autocast(precision, device):
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, use_cache=use_cache,
                          max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    return out[0, len(prompt):].tolist()


def check_cache_agrees(cached, uncached):
    """Raise unless the cached path wrote exactly the uncached path's tokens: a fast wrong cache is no speed-up."""
    if cached == uncached:
        return
    at = _first_difference(cached, uncached)
    with_cache, without = (tokens[at] if at < len(tokens) else "end" for tokens in (cached, uncached))
    raise LmlabError(f"lmlab's greedy tokens with the KV cache differ from those without it at new token {at} "
                     f"({with_cache} vs {without}): the cache path is wrong, so its speed means nothing")


def compare_with_reference(model, prompt, ours, theirs, precision, device):
    """A note on how transformers' greedy tokens compare with ours; an LmlabError unless they differ only at a tie."""
    if ours == theirs:
        return f"greedy tokens identical to lmlab's ({len(ours)} tokens)"
    at = _first_difference(ours, theirs)
    if at >= min(len(ours), len(theirs)):
        raise LmlabError(f"transformers wrote {len(theirs)} tokens, lmlab {len(ours)}; both should write exactly "
                         "new_tokens")
    gap = _logit_gap(model, prompt + ours[:at], ours[at], theirs[at], precision, device)
    tolerance = TIE_TOLERANCE[precision]
    if gap > tolerance:
        raise LmlabError(f"transformers' greedy token {at} is {theirs[at]}, lmlab's {ours[at]}, and their logits "
                         f"differ by {gap:.3g} (> {tolerance:g}, not a float-level tie): the export or the model "
                         "disagrees")
    return (f"greedy tokens equal lmlab's for the first {at}; at token {at} the two best logits differ by {gap:.2g} "
            f"(a float-level tie, <= {tolerance:g}) and the continuations part there")


def _first_difference(a, b):
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


@torch.no_grad()
def _logit_gap(model, ids, ours, theirs, precision, device):
    """lmlab's logit of its own pick minus that of transformers' pick, after `ids` (the shared prefix)."""
    window = torch.tensor([ids[-model.config.context_length:]], device=device)
    with autocast(precision, device):
        logits = model(window)[0, -1].float()
    return float(logits[ours] - logits[theirs])
