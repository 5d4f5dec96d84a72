"""tinystories-17m to validation loss 1.45 on one GPU, as fast as lmlab goes; records time, MFU and memory.

    python benchmarks/gpu_speedrun.py --data-dir data            # the real run (one CUDA GPU)
    python benchmarks/gpu_speedrun.py --dry-run                  # every step on the CPU at a tiny shape
    python benchmarks/gpu_speedrun.py --data-dir data optim.lr=4e-3   # KEY=VALUE overrides go last

The run is configs/tinystories-17m.toml (the CS336 assignment-1 model: 4 layers,
d_model 512, vocab 10,000, context 256, 17M non-embedding parameters) with the
fast settings: bf16 autocast, torch.compile, flash attention (flash_attn when
installed, else SDPA, which picks its flash kernel on Ampere and newer), Muon
for the blocks' matrices with AdamW for embeddings / head / norms, a
warm-up-stable-decay schedule, and train.target_val_loss=1.45, so the run
stops at the first evaluation at or below it. The token budget stays the
preset's 327,680,000 (the handout's 10,000 steps of 128 x 256): the schedule
decays over it, and a run that needs all of it reports "not reached".
Expected figures and the reasoning behind them: benchmarks/GPU_SPEEDRUN.md.

--dry-run runs the same code path on the CPU: the bundled TinyStories sample, a
64-wide 2-layer model, fp32, no compile, SDPA, 30 steps and a loose target, so
the config building, the run, the stop rule and the result file are all
exercised (tests/test_gpu_speedrun.py).

Writes RUNS_DIR/gpu-speedrun/result.json and prints one Markdown table row.
"""

import argparse
import importlib.util
import json
import sys
from pathlib import Path

TARGET = 1.45
REAL = [
    "optim.name=muon", "optim.lr=4e-3", "optim.min_lr=4e-4", "optim.warmup_steps=200", "optim.schedule=wsd",
    "optim.wsd_decay_fraction=0.3", "optim.muon_momentum_warmup_steps=300",
    "train.precision=bf16", "train.compile=true", "train.device=cuda", "train.eval_every=250",
    "train.checkpoint_minutes=0", "train.norms_every=0",
]
DRY = [
    "data.corpus=tinystories", "data.train_files=", "data.val_files=", "data.tokenizer_vocab_size=512",
    "model.vocab_size=0", "model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.d_ff=0",
    "model.context_length=64", "train.batch_size=8", "train.max_tokens=0", "train.max_steps=30",
    "train.eval_every=10", "train.eval_batches=2", "train.device=cpu", "train.precision=fp32",
    "train.compile=false", "train.attention=sdpa", "optim.warmup_steps=5", "train.sample_tokens=8",
]


def overrides_for(dry_run, data_dir, target, extra=()):
    """The KEY=VALUE list on top of the tinystories-17m preset."""
    attention = "flash_attn" if importlib.util.find_spec("flash_attn") else "sdpa"
    out = [*REAL, f"train.attention={attention}", f"train.target_val_loss={target}"]
    if dry_run:
        out += DRY
    elif data_dir:
        base = Path(data_dir)
        out += [f"data.train_files={base / 'TinyStoriesV2-GPT4-train.txt'}",
                f"data.val_files={base / 'TinyStoriesV2-GPT4-valid.txt'}"]
    return out + list(extra)


def check_machine(config, dry_run):
    """One clear line instead of a traceback when the real run cannot start here."""
    import torch

    from lmlab.errors import LmlabError

    if not dry_run and not torch.cuda.is_available():
        raise LmlabError("no CUDA GPU here: run with --dry-run to test the script on the CPU")
    for path in config.data.train_files + config.data.val_files:
        if not Path(path).exists():
            raise LmlabError(f"{path} does not exist: download TinyStoriesV2-GPT4-train.txt and -valid.txt "
                             "(https://huggingface.co/datasets/roneneldan/TinyStories) and pass --data-dir")


def result_of(run_dir):
    """Time to target, tokens, MFU and peak memory of a finished run, from its summary.json and metrics.jsonl."""
    run_dir = Path(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    train = [e for e in events if "loss" in e and "tokens_per_s" in e]
    steady = train[len(train) // 5:] or train  # the first fifth holds compilation and warm-up
    mfus = [e["mfu"] for e in steady if e.get("mfu") is not None]
    memory = [e["peak_mem_mb"] for e in train if e.get("peak_mem_mb") is not None]
    hit = summary.get("target") or {}
    wall = next((e.get("wall_s") for e in events if "val_loss" in e and e.get("step") == hit.get("step")), None)
    return {
        "reached": bool(hit.get("reached")), "target": hit.get("target_val_loss"),
        "train_seconds": hit.get("elapsed_s"), "wall_seconds": wall, "tokens": hit.get("tokens"),
        "step": hit.get("step"), "final_val_loss": summary.get("final_val_loss"),
        "tokens_per_s": sorted(e["tokens_per_s"] for e in steady)[len(steady) // 2] if steady else None,
        "mfu": sorted(mfus)[len(mfus) // 2] if mfus else None, "peak_mem_mb": max(memory) if memory else None,
        "status": summary.get("status"), "run_dir": str(run_dir),
    }


def markdown_row(result):
    def fmt(value, spec):
        return "-" if value is None else format(value, spec)

    return (f"| {'yes' if result['reached'] else 'no'} | {fmt(result['train_seconds'], '.0f')} | "
            f"{fmt(result['wall_seconds'], '.0f')} | {fmt(result['tokens'], ',')} | "
            f"{fmt(result['final_val_loss'], '.4f')} | {fmt(result['tokens_per_s'], ',.0f')} | "
            f"{fmt(result['mfu'], '.1%')} | {fmt(result['peak_mem_mb'], ',.0f')} |")


HEADER = ("| reached | train s | wall s | tokens | val loss | tokens/s | MFU | peak MiB |\n"
          "|---|---|---|---|---|---|---|---|")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", help="folder with TinyStoriesV2-GPT4-train.txt and -valid.txt")
    parser.add_argument("--dry-run", action="store_true", help="tiny shape on the CPU: tests every step")
    parser.add_argument("--target", type=float, default=TARGET, help=f"validation loss to reach (default {TARGET})")
    parser.add_argument("--runs-dir", default="runs", help="parent of the run directory (default ./runs)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = parser.parse_args(argv)

    from lmlab import load_config, train
    from lmlab.errors import LmlabError

    try:
        extra = [f"train.runs_dir={args.runs_dir}", "train.run_name=gpu-speedrun", *args.overrides]
        config = load_config("tinystories-17m", overrides_for(args.dry_run, args.data_dir, args.target, extra))
        check_machine(config, args.dry_run)
        run_dir = train(config)
    except LmlabError as e:
        print(f"gpu_speedrun: error: {e}", file=sys.stderr)
        return 2
    result = result_of(run_dir)
    (Path(run_dir) / "result.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(HEADER)
    print(markdown_row(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
