"""The promise, tested the hard way: `lmlab train` processes killed with SIGKILL, resumed, and compared bit for bit.

- killed at random steps several times (cosine and WSD, gradient accumulation
  on) and resumed each time: the same per-step losses and final weights as the
  run that was never killed;
- killed inside a checkpoint write, at each stage of it: the run still resumes,
  and still ends where the uninterrupted one does.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from ckpt_support import events, leftovers, quiet, same_weights, schedules_available, series
from lmlab import load_config, train
from lmlab.training import checkpoint

CLI = [sys.executable, "-m", "lmlab.cli", "train"]
TIMEOUT = 180  # seconds a subprocess may take to reach its step; generous for a loaded 2-core machine


def overrides(tiny_overrides, *extra):
    return tiny_overrides + ["train.threads=1", "train.checkpoint_minutes=0", "train.grad_accum=2", *extra]


def last_step(run_dir):
    """The highest step with a train loss in metrics.jsonl right now (a cut last line is ignored)."""
    try:
        text = (run_dir / "metrics.jsonl").read_text(encoding="utf-8")
    except FileNotFoundError:
        return 0
    best = 0
    for line in text.splitlines():
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "loss" in event:
            best = max(best, event["step"])
    return best


def kill_at(process, run_dir, target, why):
    """SIGKILL `process` once metrics.jsonl shows step >= target; returns the step it had reached."""
    deadline = time.monotonic() + TIMEOUT
    while last_step(run_dir) < target:
        if process.poll() is not None:
            pytest.fail(f"{why}: the run ended (exit {process.returncode}) before step {target}: "
                        f"{process.stderr.read().decode()[-2000:]}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"{why}: step {target} not reached in {TIMEOUT}s")
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    return last_step(run_dir)


@pytest.mark.parametrize("schedule", [pytest.param(s, marks=[pytest.mark.slow] if s != "cosine" else [])
                                      for s in schedules_available() if s in ("cosine", "wsd")])
def test_killed_at_random_steps_and_resumed_gives_the_same_run(tiny_overrides, schedule):
    seed = int.from_bytes(os.urandom(4), "little")
    rng, why = random.Random(seed), f"schedule {schedule}, kill seed {seed}"
    ov = overrides(tiny_overrides, f"optim.schedule={schedule}", "train.max_steps=150", "train.eval_every=25",
                   "train.checkpoint_every=5", "train.sample_tokens=4")
    reference = train(load_config(None, ov + ["train.run_name=uninterrupted"]), log=quiet)
    run_dir = reference.parent / "killed"

    reached, kills = 0, []
    process = subprocess.Popen(CLI + ov + ["train.run_name=killed"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    for target in sorted(rng.sample(range(2, 111), 3)):  # 40 steps of margin: the kill lands before the end
        reached = kill_at(process, run_dir, max(target, reached + 1), why)
        kills.append(reached)
        process = subprocess.Popen(CLI + ["--resume", str(run_dir)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert process.wait(TIMEOUT) == 0, process.stderr.read().decode()[-2000:]

    assert [s for s, _ in series(run_dir)] == list(range(1, 151)), why  # no step missing, none twice
    assert series(run_dir) == series(reference), f"{why}, killed at {kills}"
    assert series(run_dir, "val_loss") == series(reference, "val_loss"), why
    assert same_weights(run_dir, reference), f"{why}, killed at {kills}"
    assert 1 <= len(events(run_dir, "resume")) <= 3
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 150
    assert leftovers(run_dir) == []


# Run `lmlab train` with one stage of the checkpoint write patched to SIGKILL the process the nth time
# it is reached: the process dies exactly there, with no chance to clean up.
CRASHER = r"""
import os, shutil, signal, sys
import safetensors.torch as st

stage, nth = sys.argv[1], int(sys.argv[2])
seen = [0]


def die_the_nth_time():
    seen[0] += 1
    if seen[0] == nth:
        os.kill(os.getpid(), signal.SIGKILL)


def patch(module, name, applies, before=None):
    real = getattr(module, name)

    def wrapper(*args, **kwargs):
        if applies(*args):
            (before or die_the_nth_time)(real, *args, **kwargs)
        return real(*args, **kwargs)

    setattr(module, name, wrapper)


def half_written(real, tensors, filename, *args, **kwargs):
    seen[0] += 1
    if seen[0] == nth:
        real(tensors, filename, *args, **kwargs)
        os.truncate(filename, os.path.getsize(filename) // 2)
        os.kill(os.getpid(), signal.SIGKILL)


if stage == "writing":  # optimizer.safetensors half on disk
    patch(st, "save_file", lambda tensors, filename, *rest: "/checkpoints/" in str(filename), before=half_written)
elif stage == "commit":  # every file complete in the temporary directory, not yet renamed into place
    patch(os, "rename", lambda src, *rest: "/checkpoints/.step_" in str(src) and ".tmp-" in str(src),
          before=lambda real, *a, **k: die_the_nth_time())
elif stage == "pointer":  # renamed into place, `latest` not yet replaced
    patch(os, "replace", lambda src, dst, *rest: str(dst).endswith("/checkpoints/latest"),
          before=lambda real, *a, **k: die_the_nth_time())
elif stage == "pruning":  # an old checkpoint renamed away, not yet deleted
    patch(shutil, "rmtree", lambda path, *rest: ".old-" in str(path), before=lambda real, *a, **k: die_the_nth_time())

from lmlab.cli import main

sys.exit(main(sys.argv[3:]))
"""


@pytest.fixture(scope="module")
def crash_reference(small_corpus, data_cache, tmp_path_factory):
    """One uninterrupted 20-step run (checkpoint every 5, keep 1) that the crashed runs must end up equal to."""
    train_file, valid = small_corpus
    runs = tmp_path_factory.mktemp("crash-runs")
    ov = ["data.corpus=", f"data.train_files={train_file}", f"data.val_files={valid}",
          "data.tokenizer_vocab_size=512", f"data.cache_dir={data_cache}", "model.context_length=64",
          "model.d_model=64", "model.n_layers=2", "model.n_heads=4", "train.batch_size=8", "train.max_steps=20",
          "train.eval_every=10", "train.eval_batches=2", "train.log_every=1", "train.sample_tokens=4",
          "optim.warmup_steps=5", "optim.lr=3e-3", f"train.runs_dir={runs}", "train.device=cpu",
          "train.threads=1", "train.checkpoint_minutes=0", "train.grad_accum=2", "train.checkpoint_every=5",
          "train.keep_checkpoints=1"]
    return train(load_config(None, ov + ["train.run_name=reference"]), log=quiet), ov


@pytest.mark.parametrize("stage, nth, resumes_from", [
    # the first checkpoint's optimizer.safetensors half written: no checkpoint, the run starts over in place
    pytest.param("writing", 2, None, marks=pytest.mark.slow),
    ("writing", 4, 5),  # the second checkpoint's optimizer.safetensors half written (save_file: model, optimizer)
    ("commit", 2, 5), ("pointer", 2, 10),
    pytest.param("pruning", 1, 10, marks=pytest.mark.slow),  # the first pruning comes with the second checkpoint
])
def test_a_kill_inside_a_checkpoint_write_leaves_the_run_resumable(crash_reference, stage, nth, resumes_from):
    reference, ov = crash_reference
    run_dir = reference.parent / f"crash-{stage}-{nth}"
    crashed = subprocess.run([sys.executable, "-c", CRASHER, stage, str(nth), "train", *ov,
                              f"train.run_name={run_dir.name}"], capture_output=True, timeout=TIMEOUT)
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr.decode()[-2000:]
    path, state = checkpoint.latest(run_dir, log=quiet)
    assert (state or {}).get("step") == resumes_from  # the newest complete checkpoint, whatever `latest` says

    train(load_config(None, ov + [f"train.resume={run_dir}"]), log=quiet)
    assert series(run_dir) == series(reference)
    assert same_weights(run_dir, reference)
    assert [e["step"] for e in events(run_dir, "resume")] == ([resumes_from] if resumes_from else [])
    assert leftovers(run_dir) == []  # what the crash left is cleaned up by the next save
    assert [s for s, _ in checkpoint.list_checkpoints(run_dir)] == [20]
