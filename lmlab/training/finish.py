"""The end of a run: final evaluation, status, weights, summary.json, the loss plot, samples.

Design choices:
- Every run that got anywhere ends with an evaluation of its final weights
  (unless the last step was just evaluated, or the run diverged), so
  summary.json's final_val_loss always describes model.safetensors.
- The status is the loop's own (completed, diverged, interrupted, ...)
  unless a stop rule fired at that final evaluation (a target reached at the
  very end is "target_reached").
- Under torchrun gathering the weights is collective (FSDP), so every rank
  takes part; then rank 0 alone writes the run directory and samples, from an
  unsharded copy under FSDP.
- Samples are written only for runs that ended as planned: a diverged or
  interrupted model's text says nothing.
"""

import math

from lmlab import atomic
from lmlab.errors import LmlabError
from lmlab.model.sampling import generate
from lmlab.model.transformer import Transformer
from lmlab.rundir import run as rundir
from lmlab.rundir.metrics import write_summary
from lmlab.rundir.plots import plot_loss
from lmlab.rundir.status import DIVERGED, GOOD
from lmlab.training.checkpoint import list_checkpoints
from lmlab.training.duties import evaluate_and_record


def finish(run, state, signals):
    """Close the run at `state`; returns the run directory (on every rank)."""
    if state.status != DIVERGED and state.step > 0 and run.stops.last_eval_step != state.step:
        evaluate_and_record(run, state)
    state.status = run.stops.final_status(state.status)  # e.g. the target reached at the final evaluation
    run.metrics.close()
    weights = run.parallel.full_weights(run.model)  # collective under FSDP; rank 0 holds the whole model
    if not run.parallel.is_main:
        return run.run_dir
    model = run.model
    if run.parallel.mode == "fsdp":  # rank 0 writes and samples from an unsharded copy
        model = Transformer(run.config.model).to(run.device)
        model.load_state_dict(weights)
    _save_final_weights(run, state, model, weights)
    write_summary(run.run_dir, summary(run, state, model, signals))
    plot_loss(run.run_dir)
    if state.status in GOOD:
        model.eval()
        for part in write_samples(run.run_dir, model, run.tokenizer, run.config)[2:]:
            run.log(part.rstrip())
    run.log(f"{state.status}: {state.step} steps, val_loss {state.val_loss:.4f}, {state.elapsed_s:.0f}s training "
            f"-> {run.run_dir}")
    return run.run_dir


class FinalWeightsError(LmlabError):
    """The final weights could not be written; `next_step` says where the same weights are."""

    def __init__(self, message, next_step):
        super().__init__(message)
        self.next_step = next_step


def _save_final_weights(run, state, model, weights):
    """model.safetensors; a refused write names the folder and where the same weights are (the last checkpoint)."""
    try:
        rundir.save_weights(model, run.run_dir, state=weights)
    except OSError as e:
        target = run.run_dir / rundir.WEIGHTS
        checkpoints = list_checkpoints(run.run_dir)
        if checkpoints and checkpoints[-1][0] == state.step:
            saved = checkpoints[-1][1] / rundir.WEIGHTS
            next_step = f"the same weights are in {saved}: free some space and copy that file to {target}"
        else:
            next_step = ("no checkpoint holds these weights"
                         + (f"; its newest checkpoint is {checkpoints[-1][1].name}: continue with "
                            f"`lmlab train --resume {run.run_dir}`" if checkpoints else ""))
        raise FinalWeightsError(f"the final weights could not be written to {target} ({e.strerror})",
                                next_step) from None


def summary(run, state, model, signals):
    """summary.json: how the run ended, its best and final losses, what was trained, on what."""
    return {
        "status": state.status, "steps": state.step, "tokens": state.tokens, "elapsed_s": round(state.elapsed_s, 3),
        "final_val_loss": state.val_loss, "best_val_loss": state.best_val if math.isfinite(state.best_val) else None,
        "final_train_loss": state.loss, "unigram_val_loss": run.baseline, "params": model.num_params(),
        "non_embedding_params": model.num_params(non_embedding=True),
        "architecture": model.summary(), "device": str(run.device), "precision": run.precision,
        "tokenizer": run.tokenizer.fingerprint, "parallel": run.parallel.mode, "world_size": run.parallel.world_size,
        **run.stops.summary(),  # max_time_s, target (time to target), diverged_at
        **run.guard.summary(), "signal": signals.received,  # skipped_steps, nonfinite_at; SIGINT / SIGTERM
    }


def write_samples(run_dir, model, tokenizer, config):
    """samples.md: a continuation of each train.sample_prompts, seeded, so runs can be read side by side."""
    t = config.train
    parts = [f"# Samples from {run_dir.name}\n",
             f"temperature {t.sample_temperature}, top-k {t.sample_top_k}, seed {t.seed}\n"]
    for prompt in t.sample_prompts:
        text = generate(model, tokenizer, prompt, max_new_tokens=t.sample_tokens,
                        temperature=t.sample_temperature, top_k=t.sample_top_k, seed=t.seed)
        parts.append(f"\n## {prompt!r}\n\n{prompt}{text}\n")
    atomic.write_text(run_dir / "samples.md", "".join(parts))
    return parts
