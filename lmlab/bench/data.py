"""Data speed: the batch loader against the training step, and prepare / tokenizer training against cores.

Design choices:
- The loader is measured next to what it feeds: one training step of the
  same shapes (forward + loss + backward + clipping + AdamW, through
  `prepare_model` and `build_optimizer` as the trainer does), timed in turns
  with it. Its share of the step is the figure that matters: if it is small,
  worker processes and prefetching would buy nothing.
- The step runs on a batch fetched beforehand, so its time holds no loading;
  a step of grad_accum micro-batches asks the loader grad_accum times.
- The bundled corpus ships xz-compressed; the default input of prepare and
  tokenizer training is its train file decompressed once into a temporary
  .txt, so the figures are of tokenizing, not of xz (which runs on one core in
  the reading process whatever the worker count). Files given are used as
  they are. MB/s counts the UTF-8 bytes of the documents (MB = 10^6 bytes).
- prepare's shards must be byte-identical for every worker count (the
  promise of lmlab.data.shards); a difference raises. The first run of each count is
  untimed: it warms the page cache and gives the shards to compare.
- HF tokenizers sizes its Rayon thread pool once per process, so each
  tokenizer training runs in a fresh interpreter with RAYON_NUM_THREADS set;
  the child times train_tokenizer itself (imports excluded) and prints JSON.
- Every measurement takes turns across the candidates and keeps each one's
  median (see lmlab.bench.common), so a busy spell of a shared machine falls on
  all of them alike.
"""

import copy
import filecmp
import json
import lzma
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from lmlab.bench.common import Section, time_side_by_side
from lmlab.errors import LmlabError

REPEATS = 3
RESULT_MARK = "lmlab-bench-result: "  # the line a tokenizer-training child prints its result on

# What a tokenizer-training child runs: imports first (untimed), then train_tokenizer alone is timed.
CHILD = """
import json, sys, time
import lmlab.data.tokenizer
files, vocab_size = json.loads(sys.argv[1])
start = time.perf_counter()
tokenizer = lmlab.data.tokenizer.train_tokenizer(files, vocab_size)
seconds = time.perf_counter() - start
print(%r + json.dumps({"seconds": seconds, "fingerprint": tokenizer.fingerprint}), flush=True)
""" % RESULT_MARK


# ---------------------------------------------------------------- loader vs training step


def data_loader(config=None, device="cpu", batches=200, steps=5, log=print, repeats=REPEATS):
    """Time Batches.get (concat and document packing) against one training step of the same shapes; a Section.

    config: a lmlab Config (default: the CPU quick start, `lmlab.config.load_config(None, [])`);
    its data is built or taken from the cache as `lmlab train` would.
    Each turn fetches `batches` micro-batches per packing and runs `steps` training steps.
    """
    from lmlab.config import load_config
    from lmlab.data.corpora import ensure_data
    from lmlab.data.batches import Batches
    from lmlab.device import resolve_device, resolve_precision

    if batches < 1 or steps < 1 or repeats < 1:
        raise LmlabError(f"need batches, steps and repeats >= 1, got {batches}, {steps}, {repeats}")
    config = copy.deepcopy(config) if config is not None else load_config(None, [])
    device = resolve_device(device)
    precision = resolve_precision(config.train.precision, device)
    t = config.train
    tokenizer, shards = ensure_data(config.data, log=log)
    context = config.model.context_length
    loaders = {packing: Batches(shards, "train", t.batch_size, context, packing=packing, seed=t.seed)
               for packing in ("concat", "document")}
    train_step, params = _training_step(config, tokenizer, device, precision, loaders["concat"].get(0))

    candidates = {packing: _fetch(loader, batches) for packing, loader in loaders.items()}
    candidates["step"] = lambda: [train_step() for _ in range(steps)]
    log(f"data loader: {batches} batches per packing vs {steps} training steps, in turns, {repeats} repeats")
    seconds = time_side_by_side(candidates, repeats=repeats, warmup=1, device=device)

    step_s = seconds["step"] / steps
    rows = []
    for packing in loaders:
        batch_s = seconds[packing] / batches
        rows.append(dict(what=f"Batches.get, packing={packing}", us_per_batch=1e6 * batch_s,
                         batches_per_s=1 / batch_s, step_ms=1000 * step_s,
                         share_pct=100 * t.grad_accum * batch_s / step_s))
    rows.append(dict(what="training step (forward, loss, backward, clip, AdamW)", step_ms=1000 * step_s))
    worst = max(row["share_pct"] for row in rows[:2])
    notes = [f"loader share of the step: at most {worst:.3g}% ({'under' if worst < 1 else 'not under'} 1%)",
             f"shapes: batch {t.batch_size} x context {context}, grad_accum {t.grad_accum} "
             f"(the loader runs grad_accum times per step); model {params:,} parameters; "
             f"{device} {precision}, {torch.get_num_threads()} torch threads, {os.cpu_count()} cores",
             f"corpus: {config.data.corpus or ', '.join(config.data.train_files)}, train split "
             f"{loaders['concat'].tokens:,} tokens / {loaders['concat'].documents:,} documents (memory-mapped shards)",
             "the step runs on a batch fetched beforehand, so its time holds no loading"]
    return Section("Data loader vs the training step", rows, [
        ("what", "what"), ("us_per_batch", "µs / batch"), ("batches_per_s", "batches/s"),
        ("step_ms", "step ms"), ("share_pct", "share of step %")], notes)


def _fetch(loader, batches):
    """A callable fetching the next `batches` micro-batches, as training would (new steps on every call)."""
    state = {"step": 0}

    def fetch():
        for _ in range(batches):
            loader.get(state["step"], 0)
            state["step"] += 1
    return fetch


def _training_step(config, tokenizer, device, precision, batch):
    """(a callable running one optimizer step on `batch`, the parameter count), set up as the trainer does."""
    from lmlab.device import grad_scaler
    from lmlab.training.fastpaths import prepare_model
    from lmlab.training.optim import build_optimizer
    from lmlab.training.loop import build_model

    torch.manual_seed(config.train.seed)
    model = build_model(config, tokenizer).to(device)
    model.train()
    step_fn = prepare_model(model, config, device, precision)
    optimizer = build_optimizer(model, config.optim, device)
    scaler = grad_scaler(precision, device)
    accum, clip = config.train.grad_accum, config.optim.grad_clip or math.inf
    x, y = batch

    def train_step():
        for _ in range(accum):
            loss = step_fn(x.to(device), targets=y.to(device)) / accum
            scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
    return train_step, model.num_params()


# ---------------------------------------------------------------- prepare vs workers


def prepare_throughput(files=None, workers=(1, 2), log=print, tokenizer=None, repeats=REPEATS):
    """MB/s of `lmlab.data.shards.prepare` for each worker count, and speed-up over the first; a Section.

    files: text / .jsonl files (default: the bundled TinyStories train file, decompressed).
    tokenizer: a lmlab Tokenizer (default: a 2048-token BPE trained on the files, untimed).
    Raises when the shards of two worker counts are not byte-identical.
    """
    from lmlab.data.shards import prepare
    from lmlab.data.encode import all_cores
    from lmlab.data.tokenizer import train_tokenizer

    workers = _counts(workers, "workers", zero_ok=True)
    if repeats < 1:
        raise LmlabError(f"need repeats >= 1, got {repeats}")
    with tempfile.TemporaryDirectory(prefix="lmlab-bench-prepare-") as root:
        root = Path(root)
        files = _input_files(files, root)
        if tokenizer is None:
            log(f"prepare: training a 2048-token tokenizer on {', '.join(f.name for f in files)} (untimed)")
            tokenizer = train_tokenizer(files, 2048)
        runs = {n: 0 for n in workers}
        metas = {}

        def run(n):
            out = root / f"workers-{n}-{runs[n]}"
            runs[n] += 1
            metas[n] = prepare(files, tokenizer, out, workers=n)
            if runs[n] > 1:
                shutil.rmtree(out)  # keep only the first (checked) shards of each count

        log(f"prepare: one untimed run per worker count {', '.join(map(str, workers))} (page cache, shards to compare)")
        for n in workers:
            run(n)
        check_identical_shards({n: root / f"workers-{n}-0" for n in workers})
        log(f"prepare: timing workers {', '.join(map(str, workers))} in turns, {repeats} repeats")
        seconds = time_side_by_side({n: (lambda n=n: run(n)) for n in workers}, repeats=repeats, warmup=0)
    meta = metas[workers[0]]
    text_bytes = sum(split["bytes"] for split in meta["splits"].values())
    tokens = sum(split["tokens"] for split in meta["splits"].values())
    base = workers[0]
    rows = [dict(workers=n or f"0 (= {all_cores()})", seconds=s, mb_per_s=text_bytes / 1e6 / s,
                 speedup=seconds[base] / s) for n, s in seconds.items()]
    notes = [f"input: {', '.join(f.name for f in files)}: {text_bytes / 1e6:.2f} MB of document text, "
             f"{tokens:,} tokens (vocab {tokenizer.vocab_size})",
             f"shards byte-identical across worker counts {', '.join(map(str, workers))}",
             f"cores: {all_cores()} usable by this process ({os.cpu_count()} on the machine); "
             "the reading and writing process works alongside the encoding workers"]
    return Section("lmlab prepare vs worker processes", rows, [
        ("workers", "workers"), ("seconds", "seconds"), ("mb_per_s", "MB/s of text"),
        ("speedup", f"x {base} worker{'s' if base != 1 else ''}")], notes)


def check_identical_shards(dirs):
    """Raise unless every directory in {label: dir} holds the same files with the same bytes as the first."""
    (first_label, first), *others = dirs.items()
    names = sorted(p.name for p in first.iterdir())
    for label, other in others:
        theirs = sorted(p.name for p in other.iterdir())
        _, mismatch, errors = filecmp.cmpfiles(first, other, names, shallow=False)
        if theirs != names or mismatch or errors:
            what = mismatch + errors or sorted(set(names) ^ set(theirs))
            raise LmlabError(f"prepare with {label} workers wrote different shards than with {first_label} "
                             f"({', '.join(what)}): shards must not depend on the number of workers")


# ---------------------------------------------------------------- tokenizer training vs threads


def tokenizer_training(files=None, threads=(1, 2), vocab_size=2048, log=print, repeats=REPEATS):
    """MB/s of `lmlab.data.tokenizer.train_tokenizer` with RAYON_NUM_THREADS=N, each run in a fresh process; a Section.

    files: text / .jsonl files (default: the bundled TinyStories train file, decompressed).
    """
    from lmlab.data.documents import iter_documents
    from lmlab.data.encode import all_cores

    threads = _counts(threads, "threads")
    if repeats < 1:
        raise LmlabError(f"need repeats >= 1, got {repeats}")
    with tempfile.TemporaryDirectory(prefix="lmlab-bench-tokenizer-") as root:
        files = _input_files(files, Path(root))
        text_bytes = sum(len(text.encode("utf-8")) for f in files for text, _ in iter_documents(f))
        log(f"tokenizer training: one untimed run (page cache), then threads {', '.join(map(str, threads))} "
            f"in turns, {repeats} repeats, each in a fresh process")
        _train_in_child(files, vocab_size, threads[0])
        times, fingerprints = {n: [] for n in threads}, {}
        for _ in range(repeats):
            for n in threads:
                result = _train_in_child(files, vocab_size, n)
                times[n].append(result["seconds"])
                fingerprints[n] = result["fingerprint"]
    seconds = {n: statistics.median(values) for n, values in times.items()}
    base = threads[0]
    rows = [dict(threads=n, seconds=s, mb_per_s=text_bytes / 1e6 / s, speedup=seconds[base] / s)
            for n, s in seconds.items()]
    same = len(set(fingerprints.values())) == 1
    notes = [f"input: {', '.join(f.name for f in files)}: {text_bytes / 1e6:.2f} MB of document text; "
             f"byte-level BPE to {vocab_size} tokens",
             "the trained tokenizers are " + ("identical for every thread count" if same else
                                              "NOT identical across thread counts: " + json.dumps(fingerprints)),
             f"cores: {all_cores()} usable by this process ({os.cpu_count()} on the machine); the time is of "
             "train_tokenizer alone, in a fresh process per run (HF tokenizers fixes its thread pool at first use)"]
    return Section("Tokenizer training vs threads", rows, [
        ("threads", "RAYON_NUM_THREADS"), ("seconds", "seconds"), ("mb_per_s", "MB/s of text"),
        ("speedup", f"x {base} thread{'s' if base != 1 else ''}")], notes)


def _train_in_child(files, vocab_size, threads):
    """{"seconds", "fingerprint"} of one train_tokenizer run in a new interpreter with `threads` Rayon threads."""
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="true")
    package_root = str(Path(__file__).resolve().parents[2])  # lmlab importable in the child, installed or not
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    args = json.dumps([[str(f) for f in files], vocab_size])
    done = subprocess.run([sys.executable, "-c", CHILD, args], env=env, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_MARK)]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise LmlabError(f"tokenizer training with {threads} thread(s) failed in its process: {tail}")
    return json.loads(lines[-1][len(RESULT_MARK):])


# ---------------------------------------------------------------- shared


def _counts(values, what, zero_ok=False):
    """A tuple of distinct worker / thread counts, in the order given; bad ones are an LmlabError."""
    values = tuple(dict.fromkeys(int(v) for v in ([values] if isinstance(values, int) else values)))
    lowest = 0 if zero_ok else 1
    if not values or any(v < lowest for v in values):
        raise LmlabError(f"{what} must be a list of counts >= {lowest}, got {values}")
    return values


def _input_files(files, tmp):
    """The files to measure: those given (checked), or the bundled TinyStories train text decompressed into tmp."""
    from lmlab.data.corpora import bundled_corpus
    from lmlab.data.documents import check_file

    if files is not None:
        files = [check_file(f) for f in ([files] if isinstance(files, (str, Path)) else files)]
        if not files:
            raise LmlabError("no input files given")
        return files
    (packed,), _ = bundled_corpus("tinystories")
    plain = Path(tmp) / "tinystories-train.txt"
    with lzma.open(packed, "rb") as src, open(plain, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    return [plain]
