"""The `lmlab` command: verbs -> functions. Argument parsing only, no logic.

Each verb is one section below: a function that adds its flags, a function
that runs it (parsed arguments in, one call out), and a `Verb` naming both
with its help texts; `VERBS` lists them in the order `lmlab --help` shows.
A run function imports what it calls when it runs, so that `lmlab --help`
never imports torch. `lmlab eval`'s options are the fields of
`lmlab.evals.options.EvalOptions`, which makes its flags.

Expected mistakes (`LmlabError`, and a disk that refuses a write: full,
read-only, no permission) print one line and exit with status 2. A training
run stopped by SIGINT / SIGTERM, after saving its checkpoint, exits with 130 / 143.
"""

import argparse
import errno
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass

from lmlab.errors import LmlabError
from lmlab.evals.options import EvalOptions

DISK_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM}
EPILOG_OVERRIDES = "Any config key can follow as KEY=VALUE, e.g. optim.lr=3e-3 train.max_steps=5000."
RUN_HELP = "run directory, e.g. runs/cpu-quickstart-20260101-120000"


@dataclass(frozen=True)
class Verb:
    """One `lmlab` verb: its parser's texts, the function adding its flags, the function running it."""

    name: str
    help: str
    flags: Callable[[argparse.ArgumentParser], None] | None = None
    run: Callable[[argparse.Namespace], int | None] | None = None  # returns the exit status (None: 0)
    description: str | None = None
    epilog: str | None = None
    verbs: tuple = ()  # sub-verbs, in place of flags and run (lmlab tokenizer train)


def config_flags(p):
    """--config and KEY=VALUE overrides, for the verbs that read a config."""
    p.add_argument("--config", metavar="FILE",
                   help="TOML config file or preset name (default: the CPU quick start, cpu-quickstart)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. optim.lr=3e-3")


def print_now(*parts):
    print(*parts, flush=True)


# ---------------------------------------------------------------- lmlab train

def train_flags(p):
    config_flags(p)
    p.add_argument("--resume", metavar="RUN",
                   help="continue run directory RUN from its latest checkpoint (its config.toml, then any "
                        "KEY=VALUE; model, data and batch keys cannot change)")


def run_train(args):
    from lmlab.config import load_config
    from lmlab.training.resume import resume_config

    # config mistakes surface before torch is imported
    config = resume_config(args.resume, args.config, args.overrides) if args.resume else load_config(
        args.config, args.overrides)
    from lmlab.training.loop import train
    from lmlab.training.signals import exit_code

    return exit_code(train(config))  # 0, or 130 / 143 when SIGINT / SIGTERM stopped the run


TRAIN = Verb(
    "train", "train a model (default: the CPU quick start on bundled TinyStories)", train_flags, run_train,
    description="Train a model. With no arguments, runs the CPU quick-start preset on the bundled TinyStories "
                "corpus, building its tokenizer and shards first if needed.",
    epilog=EPILOG_OVERRIDES + " `lmlab config --keys` lists every key. Architecture switches for ablations: "
           "model.norm (rmsnorm, layernorm, none), model.norm_position (pre, post), model.position (rope, nope, "
           "learned), model.ffn (swiglu, silu, gelu, relu2), model.zero_init_proj, model.qk_norm, model.key_norm, "
           "model.key_norm_scale, model.logit_softcap, "
           "model.bias, model.tie_embeddings, model.n_kv_heads. Several GPUs or processes: "
           "`torchrun --nproc_per_node=N -m lmlab train ...` (train.parallel=ddp or fsdp; train.grad_accum is "
           "split over the N ranks; give torchrun --shutdown-timeout SECONDS above the time a checkpoint takes: "
           "on SIGTERM it gives lmlab that long, 30 s by default, to save one).")


# ---------------------------------------------------------------- lmlab bench

def bench_flags(p):
    config_flags(p)
    p.add_argument("--only", default="all", metavar="LIST",
                   help="comma-separated: train, generate, loader, prepare, tokenizer (default: all)")
    p.add_argument("--find-batch", action="store_true",
                   help="instead: the largest micro-batch of the config's model whose training step fits "
                        "(GPU: its memory; CPU: --budget-mib)")
    p.add_argument("--budget-mib", type=float, metavar="MIB",
                   help="memory budget for --find-batch on CPU (default: 90%% of the memory available now)")
    p.add_argument("--no-reference", action="store_true", help="measure lmlab only, without transformers")
    p.add_argument("--quick", action="store_true",
                   help="small sizes and one or two repeats: every benchmark in about a minute (noisier)")
    p.add_argument("--out", metavar="FILE", help="also write the Markdown report here (and its rows to FILE.json)")
    speed = p.add_argument_group("lmlab bench speedrun (time to a validation loss; docs/speed.md)")
    speed.add_argument("--recipes", metavar="LIST", help="comma-separated: cpu-quickstart, nanogpt, cpu-speedrun "
                                                         "(default: all three)")
    speed.add_argument("--seeds", type=int, default=2, help="seeds per recipe, run in interleaved turns (default 2)")
    speed.add_argument("--target", type=float, default=2.44, help="validation loss to reach (default 2.44, the "
                                                                   "quick start's final)")
    speed.add_argument("--eval-every", type=int, default=50, help="steps between evaluations, for all recipes")
    speed.add_argument("--max-time-factor", type=float, default=0.0, metavar="F",
                       help="stop every other recipe after F x the quick start's training time in the first turn, "
                            "schedule unchanged; cpu-quickstart must be the first recipe (default 0: no cap)")
    speed.add_argument("--dir", default="speedrun", help="where the runs, the report and the plot go "
                                                         "(default ./speedrun)")
    speed.add_argument("--append", metavar="FILE", help="append the report to this Markdown file "
                                                        "(e.g. benchmarks/RESULTS.md)")


def run_bench(args):
    if args.overrides[:1] == ["speedrun"]:
        return run_speedrun(args)
    if args.overrides[:1] == ["reference"]:
        return run_reference(args)
    from lmlab.bench.suite import parse_only
    from lmlab.config import load_config

    only = parse_only(args.only)  # a typo is reported before torch is imported
    config = load_config(args.config, args.overrides)
    from lmlab import atomic
    from lmlab.bench.suite import run, write_json

    report, rows = run(config, only=only, reference=not args.no_reference, find_batch=args.find_batch,
                       budget_mib=args.budget_mib, quick=args.quick)
    if args.out:
        atomic.write_text(args.out, report)
        write_json(f"{args.out}.json", rows)
        print(f"report -> {args.out} (rows: {args.out}.json)")


def run_speedrun(args):
    """`lmlab bench speedrun [KEY=VALUE...]`: the recipes raced to --target; overrides apply to every recipe."""
    import json
    import shlex
    from pathlib import Path

    from lmlab import atomic
    from lmlab.bench.common import machine, machine_lines
    from lmlab.bench.speedrun import parse_recipes, speedrun

    if args.config:
        raise LmlabError("lmlab bench speedrun takes its recipes from --recipes, not --config")
    recipes = parse_recipes(args.recipes)
    out_dir = Path(args.dir)
    section, figure, runs = speedrun(out_dir, recipes, seeds=args.seeds, target=args.target,
                                     eval_every=args.eval_every, overrides=args.overrides[1:], log=print_now,
                                     max_time_factor=args.max_time_factor)
    command = shlex.join(["lmlab", "bench", *sys.argv[2:]])
    report = "\n".join([f"Command: `{command}`", "", "Machine:", "", machine_lines(machine()), "",
                        section.markdown(), f"![validation loss against time]({figure})", ""])
    atomic.write_text(out_dir / "speedrun.md", report)
    atomic.write_text(out_dir / "speedrun.json", json.dumps(runs, indent=1) + "\n")
    print_now(section.markdown())
    print_now(f"report -> {out_dir / 'speedrun.md'}, plot -> {figure}")
    if args.append:
        path = Path(args.append)
        old = path.read_text(encoding="utf-8") if path.exists() else ""
        atomic.write_text(path, old.rstrip("\n") + "\n\n" + report)
        print_now(f"appended to {path}")


def run_reference(args):
    """`lmlab bench reference [--config FILE] [KEY=VALUE...]`: the run again, by transformers in a plain loop."""
    from lmlab.config import load_config

    config = load_config(args.config, args.overrides[1:])
    from lmlab.bench.reference import train_reference

    train_reference(config, log=print_now)


BENCH = Verb(
    "bench", "measure speed and memory, side by side with transformers' Llama and GPT-2", bench_flags, run_bench,
    description="Benchmarks on this machine, each next to a reference in the same process: training step "
                "(tokens/s, MFU, peak memory) against transformers' LlamaForCausalLM with the same shape and "
                "weights, for the config's model and a ladder of sizes (GPT2LMHeadModel for the ladder's shapes "
                "with lmlab's GPT-2 switches); generation with and without the KV "
                "cache; the data loader against the training step; prepare and tokenizer training against the "
                "number of cores. Device, precision and compile come from the config. "
                "`lmlab bench reference [--config FILE] [KEY=VALUE ...]` instead trains the model that `lmlab train` "
                "would train, with the same config, data order, initial weights and learning rates, again with "
                "transformers' LlamaForCausalLM in a plain PyTorch loop (torch AdamW), into the run directory "
                "RUN_NAME-reference, which lmlab compare / runs / report / eval read (train.evals run on it too): "
                "an independent check of a finding. Switches transformers' Llama cannot express are refused.",
    epilog=EPILOG_OVERRIDES + " Results of this project's machines: benchmarks/RESULTS.md. "
                              "lmlab bench reference: docs/evals.md.")


# ---------------------------------------------------------------- lmlab config

def config_verb_flags(p):
    config_flags(p)
    p.add_argument("--keys", action="store_true",
                   help="list every config key with its meaning and the value lmlab train would use with the same "
                        "--config and overrides (default: the quick-start preset)")


def run_config(args):
    from lmlab.config import describe_keys, load_config, to_toml

    config = load_config(args.config, args.overrides)
    if args.keys:
        print(f"# {config.name}: every key, the value lmlab train would use, and what it means")
    print(describe_keys(config) if args.keys else to_toml(config), end="\n")


CONFIG = Verb("config", "print the resolved config, or every key with its meaning (--keys)", config_verb_flags,
              run_config, epilog=EPILOG_OVERRIDES)


# ---------------------------------------------------------------- lmlab tokenizer train

def tokenizer_train_flags(p):
    p.add_argument("files", nargs="+", metavar="FILE", help="text or .jsonl files (.gz / .xz accepted)")
    p.add_argument("--vocab-size", type=int, required=True, help="vocabulary size, special tokens included")
    p.add_argument("--out", required=True, metavar="DIR", help="directory to write tokenizer.json to")
    p.add_argument("--special-tokens", default="", metavar="A,B",
                   help="extra special tokens, comma-separated (one id each; <|endoftext|> is always one)")
    p.add_argument("--special-token", action="append", default=[], metavar="TOKEN",
                   help="one extra special token (repeatable; for a token with a comma in it)")
    p.add_argument("--text-key", default="text", help="JSON field holding the text in .jsonl files")


def run_tokenizer_train(args):
    from lmlab.data.tokenizer import EOT, split_tokens, train_tokenizer

    specials = [EOT, *split_tokens(args.special_tokens), *args.special_token]
    tokenizer = train_tokenizer(args.files, args.vocab_size, special_tokens=specials, text_key=args.text_key)
    tokenizer.save(args.out)
    print(f"tokenizer with {tokenizer.vocab_size} tokens ({tokenizer.fingerprint}) -> {args.out}")


TOKENIZER = Verb("tokenizer", "train a byte-level BPE tokenizer", verbs=(
    Verb("train", "train a byte-level BPE tokenizer on text / JSONL files", tokenizer_train_flags,
         run_tokenizer_train,
         description="Train a byte-level BPE tokenizer (HF tokenizers) and save tokenizer.json."),))


# ---------------------------------------------------------------- lmlab prepare

def prepare_flags(p):
    p.add_argument("files", nargs="+", metavar="FILE", help="training text or .jsonl files (.gz / .xz accepted)")
    p.add_argument("--tokenizer", required=True, metavar="DIR",
                   help="directory with tokenizer.json (or vocab.json + merges.txt), or a tokenizer.json file")
    p.add_argument("--special-tokens", default="", metavar="A,B",
                   help="extra special tokens to add to the tokenizer, comma-separated (saved with the shards)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory for the shards")
    p.add_argument("--val", nargs="+", metavar="FILE", help="validation files (default: hold out --val-fraction)")
    p.add_argument("--val-fraction", type=float, default=0.05, help="share of documents held out for validation")
    p.add_argument("--text-key", default="text", help="JSON field holding the text in .jsonl files")
    p.add_argument("--workers", type=int, default=0, metavar="N",
                   help="processes that tokenize, one core each (default 0: every core); the shards are the same")


def run_prepare(args):
    from lmlab.data.shards import prepare
    from lmlab.data.tokenizer import Tokenizer, split_tokens

    tokenizer = Tokenizer.load(args.tokenizer, special_tokens=split_tokens(args.special_tokens))
    meta = prepare(args.files, tokenizer, args.out, val_files=args.val or (),
                   val_fraction=args.val_fraction, text_key=args.text_key, workers=args.workers)
    counts = ", ".join(f"{split}: {info['tokens']:,} tokens in {info['documents']:,} documents"
                       for split, info in meta["splits"].items())
    print(f"{counts} -> {args.out}")


PREPARE = Verb(
    "prepare", "tokenize text into train / validation shards", prepare_flags, run_prepare,
    description="Tokenize text or JSONL files into memory-mapped .npy token shards (train and val) plus meta.json.")


# ---------------------------------------------------------------- lmlab generate

def generate_flags(p):
    p.add_argument("run", metavar="RUN", help=RUN_HELP)
    p.add_argument("--prompt", default="Once upon a time", help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate at most")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature; 0 = greedy")
    p.add_argument("--top-k", type=int, default=50, help="sample from the k most likely tokens; 0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass; 1 = off")
    p.add_argument("--greedy", action="store_true", help="always take the most likely token")
    p.add_argument("--seed", type=int, default=None, help="random seed for reproducible samples")
    p.add_argument("--device", default="cpu", help="device to run on (cpu, cuda, mps, auto)")


def run_generate(args):
    from lmlab.device import resolve_device
    from lmlab.model.sampling import check_sampling, generate
    from lmlab.rundir.run import load_run

    temperature = 0.0 if args.greedy else args.temperature
    check_sampling(args.max_new_tokens, temperature, args.top_k, args.top_p)  # before the prompt is printed
    run = load_run(args.run, device=resolve_device(args.device))
    print(args.prompt, end="", flush=True)
    generate(run.model, run.tokenizer, args.prompt, max_new_tokens=args.max_new_tokens,
             temperature=temperature, top_k=args.top_k, top_p=args.top_p,
             seed=args.seed, stream=lambda piece: print(piece, end="", flush=True))
    print()


GENERATE = Verb(
    "generate", "sample text from a trained run", generate_flags, run_generate,
    description="Sample a continuation of a prompt from a run's model, streamed to the terminal.")


# ---------------------------------------------------------------- lmlab export / import

def export_flags(p):
    p.add_argument("run", metavar="RUN", help=RUN_HELP)
    p.add_argument("out", metavar="OUT_DIR", help="new (or empty) directory to write the Hugging Face folder to")


def run_export(args):
    from lmlab.rundir.hf import export_hf

    export_hf(args.run, args.out, log=print)


EXPORT = Verb(
    "export", "write a run as a Hugging Face folder (Llama, or Qwen3 with QK-norm)", export_flags, run_export,
    description="Write a run's model and tokenizer as a Hugging Face folder (config.json, model.safetensors, "
                "tokenizer.json, tokenizer_config.json, generation_config.json) that "
                "transformers.AutoModelForCausalLM loads: LlamaForCausalLM, or Qwen3ForCausalLM when "
                "model.qk_norm is on. Models with other switches (no norm, post-norm, NoPE, SiLU FFN, ...) "
                "are refused.")


def import_flags(p):
    p.add_argument("hf_dir", metavar="HF_DIR", help="local Hugging Face model folder")
    p.add_argument("run_dir", metavar="RUN_DIR", help="new run directory to create")


def run_import(args):
    from lmlab.rundir.hf import import_hf

    import_hf(args.hf_dir, args.run_dir, log=print)


IMPORT = Verb(
    "import", "turn a local Hugging Face Llama / Qwen3 folder into a run directory", import_flags, run_import,
    description="Read a local Hugging Face LlamaForCausalLM / Qwen3ForCausalLM folder (config.json, safetensors "
                "weights, tokenizer.json) into a run directory that lmlab generate, eval and export use.")


# ---------------------------------------------------------------- lmlab runs / compare / report / note

def runs_flags(p):
    p.add_argument("dirs", nargs="*", metavar="DIR", help="run directories or directories of runs (default: runs)")
    p.add_argument("--format", choices=("text", "markdown", "tsv"), default="text", help="table format")


def run_runs(args):
    from lmlab.lab.table import format_table, read_runs, runs_table

    print(format_table(*runs_table(read_runs(args.dirs)), style=args.format))


RUNS = Verb(
    "runs", "table of runs: status, steps, time, losses and the config keys that differ", runs_flags, run_runs,
    description="One row per run: name, status, steps, tokens, training time, best and final validation loss, "
                "tokens/s, then every config key in which the runs differ.")


def compare_flags(p):
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directories (or directories of runs)")
    p.add_argument("--x", choices=("step", "time", "tokens", "wall"), default="step",
                   help="x axis: step, time (training time), tokens, wall (wall-clock time, everything included)")
    p.add_argument("--metric", default="val_loss",
                   help="metric from metrics.jsonl: val_loss, loss, val_bpb, val_ppl, lr, grad_norm, tokens_per_s, mfu")
    p.add_argument("--out", metavar="FILE",
                   help="output file (.png; the .svg goes beside it); default compare-METRIC-X.png")
    p.add_argument("--logx", action="store_true", help="log-scale x axis")
    p.add_argument("--logy", action="store_true", help="log-scale y axis")
    p.add_argument("--smooth", type=int, default=None, metavar="N",
                   help="moving average over N points, said in the legend (default: about 1/25 of the curve "
                        "for train loss, none else); validation curves (val_*) are never smoothed")


def run_compare(args):
    from lmlab.lab.compare import compare

    paths = compare(args.runs, out=args.out, x=args.x, metric=args.metric, logx=args.logx, logy=args.logy,
                    smooth=args.smooth)
    print(" ".join(str(p) for p in paths))


COMPARE = Verb(
    "compare", "curves of several runs in one figure (PNG and SVG)", compare_flags, run_compare,
    description="Draw a metric of several runs against steps, training time, tokens or wall-clock time in one "
                "figure, written as PNG and SVG. A diverged run ends in an X, a run that hit its target in a star.")


def report_flags(p):
    p.add_argument("dir", metavar="DIR", help="directory of runs (or one run directory)")
    p.add_argument("--out", metavar="FILE", help="HTML file to write (default DIR/report.html); report.md goes beside it")


def run_report(args):
    from lmlab.lab.report import write_report

    html_path, md_path = write_report(args.dir, out=args.out)
    print(f"{html_path} (open it in a browser) and {md_path}")


REPORT = Verb(
    "report", "self-contained HTML experiment log (and a Markdown twin) of a runs directory", report_flags,
    run_report,
    description="Write DIR/report.html (opens from disk, no server, no network) and DIR/report.md: the runs table, "
                "interactive curves (hover values, hide runs, log scales, zoom; x axis step, tokens, training or "
                "wall-clock time), and per run its differing config keys, notes and samples.")


def note_flags(p):
    p.add_argument("run", metavar="RUN", help="run directory")
    p.add_argument("text", metavar="TEXT", help="the note, e.g. \"diverged at step 300: lr too high\"")


def run_note(args):
    from lmlab.lab.table import add_note

    print(f"noted in {add_note(args.run, args.text)}")


NOTE = Verb("note", "add a dated note to a run (shown by lmlab report)", note_flags, run_note,
            description="Append a dated line to RUN/notes.md; lmlab report shows a run's notes.")


# ---------------------------------------------------------------- lmlab schedule

def schedule_flags(p):
    config_flags(p)
    p.add_argument("--out", metavar="FILE", help="PNG to write (default NAME-schedule.png)")
    p.add_argument("--steps", type=int, default=None, metavar="N",
                   help="steps to draw; for a run bounded by train.max_time, the steps you expect to fit in it "
                        "(default train.max_steps, or 1000)")


def run_schedule(args):
    from lmlab.config import load_config
    from lmlab.training.schedules import plot_schedule

    config = load_config(args.config, args.overrides)
    out = args.out or f"{config.name}-schedule.png"
    for line in plot_schedule(config, out, n_steps=args.steps):
        print(line)
    print(f"-> {out}")


SCHEDULE = Verb(
    "schedule", "plot a config's learning-rate schedule (no training)", schedule_flags, run_schedule,
    description="Plot the learning rate of a config over its run (and its context curriculum) to a PNG, and print "
                "the values at the end of warmup, the end of the stable phase (wsd) and the last step.",
    epilog=EPILOG_OVERRIDES)


# ---------------------------------------------------------------- lmlab sweep

def sweep_flags(p):
    config_flags(p)
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                   help="values of a key to try (repeatable: the trials are the product), e.g. optim.lr=1e-3,3e-3")
    p.add_argument("--random", action="append", default=[], metavar="KEY=DIST:LOW:HIGH",
                   help="sample a numeric key: loguniform:LOW:HIGH or uniform:LOW:HIGH (repeatable; with --trials)")
    p.add_argument("--trials", type=int, default=0, metavar="N", help="random draws (per grid point)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random draws")
    p.add_argument("--out", required=True, metavar="DIR", help="sweep directory (created; reused to resume)")
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="trials at once, each in its own process (own GPU when there are several); default 1")
    p.add_argument("--metric", default="best_val_loss",
                   help="summary.json value to rank by, lower is better: best_val_loss (default), final_val_loss, "
                        "time_to_target, steps_to_target, tokens_to_target, or a dotted key")
    p.add_argument("--lr-scaling", choices=("linear", "sqrt"), default="",
                   help="batch-size sweeps: scale optim.lr (and min_lr) by the trial's batch / the base batch, "
                        "or its square root")


def run_sweep(args):
    from lmlab.lab import sweep

    trials = sweep.run_sweep(args.config, args.overrides, grid=args.grid, random_items=args.random,
                             n_trials=args.trials, seed=args.seed, out=args.out, workers=args.workers,
                             metric=args.metric, lr_scaling=args.lr_scaling, log=print_now)
    failed = sweep.failed_line(args.out, trials)
    if failed:
        raise LmlabError(failed)


SWEEP = Verb(
    "sweep", "train over a grid or random samples of config values; table, best config, plots", sweep_flags,
    run_sweep,
    description="Run one training per trial into OUT/runs/, one after another (or in --workers processes), then "
                "write OUT/sweep.md (table sorted by --metric), OUT/best.toml and OUT/plots/. Rerunning the same "
                "command skips finished trials. Stop rules (train.target_val_loss, train.max_time, "
                "train.diverge_factor) apply to every trial. A trial that fails (an error, not a divergence) is "
                "recorded and the sweep goes on; the sweep then exits with status 2 and one line naming it.",
    epilog=EPILOG_OVERRIDES + " They apply to every trial.")


# ---------------------------------------------------------------- lmlab eval

def eval_flags(p):
    p.add_argument("run", metavar="RUN", help="run directory, runs/NAME/checkpoints/step_N, or Hugging Face folder")
    EvalOptions.add_flags(p)


def run_eval(args):
    from lmlab.lab.evaluate import run_evals

    run_evals(args.run, EvalOptions.from_args(args), log=print_now)


EVAL = Verb(
    "eval", "perplexity / bits per byte, copy / reverse / history probes, multiple choice", eval_flags, run_eval,
    description="Evaluate a run directory, one of its checkpoints, or a Hugging Face folder. Each evaluation "
                "prints a table and writes RUN/evals/<name>.json (names: text-<file>, shards-<split>, val, copy, "
                "reverse, history, choice-<set>); probes also write RUN/evals/<name>.png. For a Hugging Face "
                "folder they go beside it, to HF_DIR-evals/, never into it. See docs/evals.md.")


# ---------------------------------------------------------------- the command

VERBS = (TRAIN, BENCH, CONFIG, TOKENIZER, PREPARE, GENERATE, EXPORT, IMPORT, RUNS, COMPARE, REPORT, NOTE,
         SCHEDULE, SWEEP, EVAL)


def build_parser():
    from lmlab.version import __version__

    parser = argparse.ArgumentParser(prog="lmlab", description="Pretrain small language models and run experiments on them.")
    parser.add_argument("--version", action="version", version=f"lmlab {__version__}")
    _add_verbs(parser, VERBS, dest="verb")
    return parser


def _add_verbs(parser, verbs, dest):
    subparsers = parser.add_subparsers(dest=dest, required=True, metavar="VERB")
    for verb in verbs:
        p = subparsers.add_parser(verb.name, help=verb.help, description=verb.description, epilog=verb.epilog)
        if verb.verbs:
            _add_verbs(p, verb.verbs, dest=f"{verb.name}_verb")
        else:
            verb.flags(p)
            p.set_defaults(func=verb.run)


def main(argv=None):
    args = build_parser().parse_args(argv)  # argparse itself ignores a closed pipe for --help
    try:
        code = _run(args)
        sys.stdout.flush()  # a reader that left is met here, not in Python's flush at exit
    except BrokenPipeError:
        code = _reader_left()
    except Exception:
        from lmlab.training import distributed

        if not distributed.worker_started():
            raise
        traceback.print_exc()  # a failing rank: torchrun sees exit code 1 and ends the job
        code = 1
    from lmlab.training.distributed import end_worker

    return end_worker(code)  # a torchrun worker exits here, skipping interpreter finalization (see there)


def _reader_left():
    """`lmlab runs | head -1`: the reader closed the pipe. Exit quietly, as a shell tool killed by SIGPIPE would.

    stdout is pointed at /dev/null so that Python's flush at exit does not
    raise again (the Python docs' recipe, "Note on SIGPIPE"); the status is
    128 + SIGPIPE = 141, what the shell reports for `yes | head -1`'s `yes`.
    """
    import os

    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is not a file (redirected inside Python): nothing is flushed at exit
        pass
    return 141


def _run(args):
    try:
        code = args.func(args)
    except LmlabError as e:
        print(f"lmlab: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lmlab: interrupted", file=sys.stderr)
        return 130
    except OSError as e:
        if e.errno not in DISK_ERRORS:
            raise
        # the disk said no (full, read-only, no permission): one line; writes are atomic, nothing half-written
        print(f"lmlab: error: {e.strerror}: {e.filename or 'while writing'}", file=sys.stderr)
        return 2
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
