"""`lmlab bench speedrun`: recipes raced to a validation loss on the same data, side by side.

Design choices:
- A recipe is a preset plus overrides. Three by default: `cpu-quickstart`
  (what `lmlab train` runs), `nanogpt` (the quick start's shape, data and step
  budget with nanoGPT's GPT-2 switches and optimizer: LayerNorm, learned
  positions, GELU, tied head, AdamW lr 6e-4, betas (0.9, 0.95), weight decay
  0.1, warm-up then cosine to lr/10) and `cpu-speedrun`.
- Each run is a real `lmlab.train` with train.target_val_loss, so it stops
  at the first evaluation at or below the target. Every recipe evaluates every
  `eval_every` steps (the same for all), so time to target is resolved alike.
- Each finished run is added to runs-so-far.json at once, so a race cut
  short (a deadline, a kill) still leaves every finished run's curve.
- Turns are interleaved: seed 1 runs A, B, C, seed 2 runs B, C, A, ... so a
  slow spell of a shared machine does not fall on one recipe only.
- Time is the run's training time (`elapsed_s`: the steps only, evaluation
  excluded, as recorded in metrics.jsonl), read at the evaluation that reached
  the target. A run that never reaches it is reported as such, with its
  final loss and total time: its time to target is more than that.
- The ratio compares with the quick start's time to target, or with its whole
  training time when it ends above the target (the issue's "the quick start's
  training time").
- A cap keeps the race finishable: with max_time_factor F, every other recipe
  stops after F x the quick start's training time in the first turn
  (train.max_time). The cap stops a run but leaves its schedule alone
  (optim.progress=steps: the learning rate still follows the step budget), so
  a capped run is the same recipe cut short, reported "not reached" with its
  best validation loss and when it got there.
"""

import json
import statistics
from pathlib import Path

from lmlab.bench.common import Section
from lmlab.errors import LmlabError

DEFAULT_TARGET = 2.44  # the quick start's final validation loss (README: 2.4447)
NANOGPT = ["model.norm=layernorm", "model.position=learned", "model.ffn=gelu", "model.tie_embeddings=true",
           "model.bias=false", "optim.name=adamw", "optim.lr=6e-4", "optim.min_lr=6e-5", "optim.beta1=0.9",
           "optim.beta2=0.95", "optim.weight_decay=0.1", "optim.schedule=cosine", "optim.grad_clip=1.0"]
RECIPES = {"cpu-quickstart": ("cpu-quickstart", []), "nanogpt": ("cpu-quickstart", NANOGPT),
           "cpu-speedrun": ("cpu-speedrun", [])}


def parse_recipes(text):
    names = tuple(n.strip() for n in (text or ",".join(RECIPES)).split(",") if n.strip())
    for name in names:
        if name not in RECIPES:
            raise LmlabError(f"unknown speedrun recipe {name!r}; choose from {', '.join(RECIPES)}")
    if len(set(names)) != len(names) or not names:
        raise LmlabError(f"--recipes needs distinct names from {', '.join(RECIPES)}")
    return names


def speedrun(out_dir, recipes=tuple(RECIPES), seeds=2, target=DEFAULT_TARGET, eval_every=50, overrides=(),
             log=print, max_time_factor=0.0):
    """Race `recipes` to `target` over `seeds` seeds in interleaved turns; returns (Section, figure path, runs).

    max_time_factor > 0 caps every recipe but the quick start at that multiple of the quick start's
    training time in the first turn (the quick start must then be the first recipe).
    """
    from lmlab import atomic, load_config, train

    if seeds < 1:
        raise LmlabError(f"--seeds must be >= 1, got {seeds}")
    if not target > 0:
        raise LmlabError(f"--target must be a positive validation loss, got {target}")
    if max_time_factor < 0 or (max_time_factor and recipes[0] != "cpu-quickstart"):
        raise LmlabError(f"--max-time-factor must be >= 0 and needs cpu-quickstart as the first recipe "
                         f"(its training time is the unit), got {max_time_factor:g} with {','.join(recipes)}")
    out_dir = Path(out_dir)
    runs = []
    cap_s = None
    for turn in range(seeds):
        order = recipes[turn % len(recipes):] + recipes[:turn % len(recipes)]
        for name in order:
            preset, extra = RECIPES[name]
            seed = 1337 + turn
            run_name = f"{name}-seed{seed}"
            config = load_config(preset, [*extra, f"train.seed={seed}", f"train.target_val_loss={target}",
                                          f"train.eval_every={eval_every}", f"train.runs_dir={out_dir / 'runs'}",
                                          f"train.run_name={run_name}", "train.sample_tokens=0", *overrides,
                                          *_cap(name, cap_s)])
            log(f"speedrun: {run_name} (turn {turn + 1}/{seeds})" + (f", capped at {cap_s:.0f}s" if
                                                                      _cap(name, cap_s) else ""))
            run_dir = train(config, log=lambda *a, **k: None)
            runs.append(read_run(name, seed, run_dir))
            log(f"speedrun: {run_name}: " + _one_line(runs[-1]))
            atomic.write_text(out_dir / "runs-so-far.json", json.dumps(runs, indent=1) + "\n")  # a cut race keeps these
            if max_time_factor and cap_s is None:  # the first run is the quick start's: the unit of the cap
                cap_s = max_time_factor * runs[-1]["total_s"]
    figure = plot(runs, target, out_dir / "speedrun.png")
    return table(runs, recipes, target), figure, runs


def _cap(name, cap_s):
    """Overrides that stop a recipe after cap_s seconds of training without changing its schedule."""
    if cap_s is None or name == "cpu-quickstart":
        return []
    return [f"train.max_time={max(cap_s, 0.001):.3f}", "optim.progress=steps"]  # 0 would mean no limit


def read_run(recipe, seed, run_dir):
    """What one run tells the race: its curve and where it reached the target (or not)."""
    summary = json.loads((Path(run_dir) / "summary.json").read_text(encoding="utf-8"))
    curve = []
    for line in (Path(run_dir) / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
        event = json.loads(line)
        if "val_loss" in event:
            curve.append((event["elapsed_s"], event["tokens"], event["val_loss"]))
    hit = summary.get("target") or {}
    best = min(curve, key=lambda point: point[2]) if curve else (None, None, None)
    return {"recipe": recipe, "seed": seed, "run_dir": str(run_dir), "curve": curve, "status": summary.get("status"),
            "reached": bool(hit.get("reached")), "seconds": hit.get("elapsed_s"), "tokens": hit.get("tokens"),
            "final_val_loss": summary.get("final_val_loss"), "total_s": curve[-1][0] if curve else None,
            "total_tokens": curve[-1][1] if curve else None,
            "best_val_loss": best[2], "best_s": best[0], "best_tokens": best[1]}


def _one_line(run):
    if run["reached"]:
        return f"target reached after {run['seconds']:.0f}s of training, {run['tokens']:,} tokens"
    return f"target not reached ({run['status']}): " + _best(run) + f", run ended at {run['total_s']:.0f}s"


def _best(run):
    """'best 2.5012 at 640 s' for a run that missed the target: its time to target is more than its run."""
    if run.get("best_val_loss") is None:
        return "no evaluation"
    return f"best {run['best_val_loss']:.4f} at {run['best_s']:.0f} s"


def table(runs, recipes, target):
    """The Section: per recipe, time and tokens to target as min / median / max over seeds, and the ratio."""
    rows = []
    for name in recipes:
        mine = [r for r in runs if r["recipe"] == name]
        reached = [r for r in mine if r["reached"]]
        row = {"recipe": name, "reached": f"{len(reached)}/{len(mine)}",
               "final": statistics.median(r["final_val_loss"] for r in mine)}
        if reached:
            seconds = [r["seconds"] for r in reached]
            tokens = [r["tokens"] for r in reached]
            row.update(s_min=min(seconds), s_med=statistics.median(seconds), s_max=max(seconds),
                       tok_med=statistics.median(tokens), tok_min=min(tokens), tok_max=max(tokens))
        row["budget_s"] = statistics.median(r["total_s"] for r in mine)
        missed = [r for r in mine if not r["reached"]]
        row["missed"] = "; ".join(f"seed {r['seed']}: {_best(r)}" for r in missed) if missed else "-"
        rows.append(row)
    base = next((r for r in rows if r["recipe"] == "cpu-quickstart"), None)
    if base is not None:
        all_reached = all(r["reached"] for r in runs if r["recipe"] == "cpu-quickstart")
        reference = base["s_med"] if all_reached else base["budget_s"]
        for row in rows:
            if row.get("s_med"):
                row["ratio"] = row["s_med"] / reference
    notes = [(f"target: validation loss <= {target:g}; time = training time to the first evaluation at or below "
              "it (steps only, evaluations excluded), min / median / max over the seeds that reached it"),
             ("ratio: median time to target / the quick start's (its whole training time when it ends above the "
              "target); 'reached' counts seeds"),
             "turns interleaved (seed 1: A B C, seed 2: B C A, ...) so the machine's noise falls on all recipes",
             ("not reached: the seed's best validation loss and the training time it was measured at; its time to "
              "target is more than its run time")]
    columns = [("recipe", "recipe"), ("reached", "reached"), ("s_min", "s min"), ("s_med", "s median"),
               ("s_max", "s max"), ("tok_min", "tokens min"), ("tok_med", "tokens median"), ("tok_max", "tokens max"),
               ("final", "final val (median)"), ("budget_s", "run time s (median)"), ("ratio", "time / quick start"),
               ("missed", "not reached (best at s)")]
    return Section(f"Speedrun: time to validation loss {target:g}", rows, columns, notes)


def plot(runs, target, path):
    """Validation loss against training time, one colour per recipe, one line per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lmlab import atomic

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colours = {}
    for run in runs:
        colour = colours.setdefault(run["recipe"], f"C{len(colours)}")
        xs, _, ys = zip(*run["curve"]) if run["curve"] else ((), (), ())
        label = run["recipe"] if sum(r["recipe"] == run["recipe"] for r in runs[:runs.index(run) + 1]) == 1 else None
        ax.plot(xs, ys, color=colour, alpha=0.8, label=label)
    ax.axhline(target, color="grey", linestyle="--", linewidth=1, label=f"target {target:g}")
    ax.set_xlabel("training time (s)")
    ax.set_ylabel("validation loss")
    lows = [y for r in runs for _, _, y in r["curve"]]
    if lows:
        ax.set_ylim(min(lows + [target]) - 0.05, min(max(lows), target + 1.5))
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path
