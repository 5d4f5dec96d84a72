"""Faults a long run meets, injected on purpose: a damaged shard, a full disk, a rank that dies or hangs.

Each one must end with one lmlab line (no traceback), a non-zero exit, summary.json
status `failed` with the reason, nothing corrupt on disk; a run that had a checkpoint
resumes from it to the very weights of a run that was never interrupted (CPU, bitwise).
docs/reliability.md is the table of these faults; each row names its test here.

Faults are injected at a known step through the log callback: `train(config, log=...)`
calls it with the status line of every step (train.print_every=1), after that step's
checkpoint duty is due and before the next step's batch is built.
"""

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from ckpt_support import leftovers, same_weights

from lmlab import load_config, train
from lmlab.data.corpora import ensure_data
from lmlab.errors import LmlabError
from lmlab.training import checkpoint

STEPS = 8
CLI = [sys.executable, "-m", "lmlab.cli", "train"]


def overrides(tiny_overrides, *extra):
    """The tiny model, 8 steps, a checkpoint every 2 steps, a status line every step (the injection point)."""
    return tiny_overrides + [f"train.max_steps={STEPS}", "train.eval_every=4", "train.checkpoint_every=2",
                             "train.checkpoint_minutes=0", "train.keep_checkpoints=2", "train.print_every=1",
                             "train.threads=1", "train.sample_tokens=4", *extra]


def at_step(step, action, contains=""):
    """A log callback that runs `action()` once, at the first line of `step` (holding `contains`) printed."""
    done = []

    def log(*args, **kwargs):
        line = " ".join(str(a) for a in args)
        match = re.match(r"step (\d+)/", line)
        if match and int(match.group(1)) == step and contains in line and not done:
            done.append(step)
            action()
    return log


def summary(run_dir):
    return json.loads((Path(run_dir) / "summary.json").read_text(encoding="utf-8"))


def runs_status(run_dir):
    """The status column of `lmlab runs` for one run (tsv: run, status, ...)."""
    import io

    from lmlab.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["runs", str(run_dir), "--format", "tsv"]) == 0
    rows = [line.split("\t") for line in out.getvalue().splitlines()]
    return next(row[1] for row in rows if row[0] == run_dir.name)


def one_line(error):
    """The message the CLI prints as `lmlab: error: ...`: one line, no traceback."""
    text = str(error)
    print(f"lmlab: error: {text}")  # with -s: the lines docs/reliability.md quotes
    assert "\n" not in text and "Traceback" not in text, text
    return text


@pytest.fixture
def reference(tiny_overrides):
    """The uninterrupted run every resumed run must end equal to (bitwise)."""
    return train(load_config(None, overrides(tiny_overrides, "train.run_name=reference")), log=lambda *a, **k: None)


@pytest.fixture
def shards(tiny_overrides, tmp_path):
    """A private copy of the tiny run's prepared shards (train.data.shards points at it): free to damage."""
    config = load_config(None, tiny_overrides)
    _, built = ensure_data(config.data, log=lambda *a, **k: None)
    copy = tmp_path / "shards"
    shutil.copytree(built, copy)
    return copy


def train_shard(shards_dir):
    meta = json.loads((shards_dir / "meta.json").read_text(encoding="utf-8"))
    return shards_dir / meta["splits"]["train"]["shards"][0], meta


def overwrite(path, values, start=0.3):
    """Overwrite the tokens of a shard from `start` (a share of its length) to its end, in place (the mmap sees it)."""
    tokens = np.load(path, mmap_mode="r+")
    begin = int(len(tokens) * start)
    tokens[begin:] = values(np.asarray(tokens[begin:]))
    tokens.flush()
    del tokens
    return begin


# ---------------------------------------------------------------- damaged shards


def test_meta_records_a_sha256_per_shard_file(shards):
    from lmlab.data.integrity import file_sha256

    _, meta = train_shard(shards)
    names = [n for split in meta["splits"].values() for n in split["shards"]]
    assert set(meta["sha256"]) == {n for name in names for n in (name, name.replace(".npy", ".docs.npy"))}
    assert all(meta["sha256"][name] == file_sha256(shards / name) for name in meta["sha256"])


def test_shard_changed_inside_the_vocabulary_is_refused_by_its_checksum(tiny_overrides, shards, tmp_path):
    """Ids overwritten with other valid ids: nothing else could notice. Refused before the run directory exists."""
    path, meta = train_shard(shards)
    overwrite(path, lambda t: (t.astype(np.int64) + 1) % meta["vocab_size"])
    with pytest.raises(LmlabError, match=r"does not match the sha256 lmlab prepare recorded") as error:
        train(load_config(None, overrides(tiny_overrides, f"data.shards={shards}", "train.run_name=x")),
              log=lambda *a, **k: None)
    assert str(path) in one_line(error.value)
    assert not (tmp_path / "runs" / "x").exists()


def test_old_meta_without_checksums_still_trains(tiny_overrides, shards):
    meta_path = shards / "meta.json"
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    del meta["sha256"]
    meta_path.write_text(json.dumps(meta), encoding="utf-8")
    run = train(load_config(None, overrides(tiny_overrides, f"data.shards={shards}", "train.max_steps=2")),
                log=lambda *a, **k: None)
    assert summary(run)["status"] == "completed"


def test_ids_beyond_the_vocabulary_before_the_run_are_refused_before_the_first_step(tiny_overrides, shards, tmp_path):
    """Shards without checksums (an older lmlab prepared them): the baseline's token count sees the bad id."""
    path, meta = train_shard(shards)
    del meta["sha256"]
    (shards / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
    tokens = np.load(path, mmap_mode="r+")
    tokens[1234] = meta["vocab_size"]
    tokens.flush()
    del tokens
    with pytest.raises(LmlabError) as error:
        train(load_config(None, overrides(tiny_overrides, f"data.shards={shards}", "train.run_name=x")),
              log=lambda *a, **k: None)
    assert one_line(error.value) == (f"shard {path} holds token id {meta['vocab_size']} at token offset 1,234, outside "
                                     f"the vocabulary of {meta['vocab_size']}: the shard is damaged; re-run lmlab "
                                     "prepare (or delete that cache directory to have it rebuilt)")
    assert not (tmp_path / "runs" / "x").exists()


@pytest.mark.parametrize(("at", "newest"), [(3, "step_000002"), (1, None)])
def test_ids_beyond_the_vocabulary_fail_the_run_naming_shard_and_offset_then_resume_exactly(
        tiny_overrides, shards, reference, at, newest):
    """A shard damaged during the run (after its checksum was checked): caught where the batch is built.

    Damaged after step 3 the run keeps its step-2 checkpoint; after step 1 it has none, and --resume starts over.
    """
    path, meta = train_shard(shards)
    original = path.read_bytes()
    begin = []
    config = overrides(tiny_overrides, f"data.shards={shards}", "train.run_name=damaged")
    hook = at_step(at, lambda: begin.append(overwrite(path, lambda t: np.full_like(t, meta["vocab_size"] + 7))))
    with pytest.raises(LmlabError) as error:
        train(load_config(None, config), log=hook)
    message = one_line(error.value)
    run_dir = shards.parent / "runs" / "damaged"
    assert re.search(rf"shard {re.escape(str(path))} holds token id {meta['vocab_size'] + 7} at token offset [\d,]+, "
                     rf"outside the vocabulary of {meta['vocab_size']}", message), message
    offset = int(re.search(r"at token offset ([\d,]+)", message).group(1).replace(",", ""))
    assert offset >= begin[0]
    assert f"failed after step {at}" in message
    if newest:
        assert f"its newest checkpoint is {newest}: continue with `lmlab train --resume {run_dir}`" in message
    else:
        assert message.endswith(f"no checkpoint was written: `lmlab train --resume {run_dir}` starts it again from step 0")
    s = summary(run_dir)
    assert s["status"] == "failed" and s["steps"] == at and s["checkpoint"] == newest
    assert "outside the vocabulary" in s["reason"]
    assert not leftovers(run_dir)
    assert runs_status(run_dir) == "failed"  # `lmlab runs`, which said unfinished before
    path.write_bytes(original)  # the shard repaired (lmlab prepare again would give these bytes)
    resumed = train(load_config(None, [*config, f"train.resume={run_dir}"]), log=lambda *a, **k: None)
    assert summary(resumed)["status"] == "completed" and same_weights(resumed, reference)


# ---------------------------------------------------------------- a full disk


@contextlib.contextmanager
def small_disk(path, size):
    """A tmpfs of `size` mounted at `path` (root only; skipped where it cannot be mounted)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, check=False)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


def fill(folder, leave=64 << 10):
    """Fill the filesystem of `folder` with a ballast file, leaving about `leave` bytes free."""
    ballast = Path(folder) / "ballast"
    with open(ballast, "wb") as f:
        f.write(b"\0" * max(shutil.disk_usage(folder).free - leave, 0))
    return ballast


def test_size_estimate_matches_the_checkpoints_a_run_writes(reference):
    from lmlab.rundir.run import load_run
    from lmlab.training import diskspace

    model = load_run(reference).model
    path, _ = checkpoint.latest(reference)
    written = {f.name: f.stat().st_size for f in path.iterdir()}
    assert abs(diskspace.weights_bytes(model) - written["model.safetensors"]) < 8 << 10
    assert abs(diskspace.optimizer_bytes(model, "adamw") - written["optimizer.safetensors"]) < 16 << 10
    assert written["state.json"] < diskspace.STATE_JSON
    assert diskspace.weights_bytes(model) == pytest.approx((reference / "model.safetensors").stat().st_size, abs=8 << 10)


def test_runs_folder_too_small_is_refused_before_the_first_step(tiny_overrides, tmp_path):
    with small_disk(tmp_path / "small", "1m") as folder:
        out = subprocess.run([*CLI, *overrides(tiny_overrides, f"train.runs_dir={folder}", "train.run_name=x")],
                             capture_output=True, text=True, check=False, env={**os.environ, "OMP_NUM_THREADS": "1"})
        lines = out.stderr.strip().splitlines()
        assert out.returncode == 2 and len(lines) == 1, out.stderr
        assert re.fullmatch(rf"lmlab: error: not enough space in {re.escape(str(folder))}: this run needs "
                            r"[\d,]+ bytes \(3 checkpoint\(s\) of [\d,]+ bytes .*\) and [\d,]+ bytes are free; .*",
                            lines[0]), lines[0]
        assert list(folder.iterdir()) == []  # nothing written


def test_disk_full_at_a_checkpoint_fails_the_run_keeping_the_last_one_then_resumes_exactly(
        tiny_overrides, tmp_path, reference):
    with small_disk(tmp_path / "small", "16m") as folder:
        config = overrides(tiny_overrides, f"train.runs_dir={folder}", "train.run_name=full")
        ballast = []
        with pytest.raises(LmlabError) as error:
            train(load_config(None, config), log=at_step(3, lambda: ballast.append(fill(folder))))
        message, run_dir = one_line(error.value), folder / "full"
        assert f"checkpoint at step 4 not written to {run_dir / 'checkpoints'} (No space left on device" in message
        assert "failed after step 4" in message and "newest checkpoint is step_000002" in message
        assert ".tmp" not in message
        s = summary(run_dir)
        assert s["status"] == "failed" and s["steps"] == 4 and s["checkpoint"] == "step_000002"
        assert "No space left on device" in s["reason"]
        assert not leftovers(run_dir) and checkpoint.latest(run_dir)[0].name == "step_000002"
        ballast[0].unlink()
        resumed = train(load_config(None, [*config, f"train.resume={run_dir}"]), log=lambda *a, **k: None)
        assert summary(resumed)["status"] == "completed" and same_weights(resumed, reference)


def test_disk_full_with_on_checkpoint_error_continue_trains_on_and_the_lost_weights_are_reported(
        tiny_overrides, tmp_path):
    with small_disk(tmp_path / "small", "16m") as folder:
        config = overrides(tiny_overrides, f"train.runs_dir={folder}", "train.run_name=carry-on",
                           "train.on_checkpoint_error=continue")
        lines = []
        hook = at_step(3, lambda: fill(folder))
        with pytest.raises(LmlabError) as error:
            train(load_config(None, config), log=lambda *a, **k: (lines.append(" ".join(map(str, a))), hook(*a)))
        message, run_dir = one_line(error.value), folder / "carry-on"
        warnings = [line for line in lines if line.startswith("warning: checkpoint at step")]
        assert [w.split()[4] for w in warnings] == ["4", "6", "8"], warnings  # tried at each trigger, and at the end
        assert f"the final weights could not be written to {run_dir / 'model.safetensors'} (No space left" in message
        assert "no checkpoint holds these weights; its newest checkpoint is step_000002" in message
        s = summary(run_dir)
        assert s["status"] == "failed" and s["steps"] == STEPS and "final weights" in s["reason"]
        assert not leftovers(run_dir) and not (run_dir / "model.safetensors").exists()


def test_final_weights_refused_name_the_checkpoint_that_holds_them(tiny_overrides, tmp_path, reference):
    with small_disk(tmp_path / "small", "16m") as folder:
        config = overrides(tiny_overrides, f"train.runs_dir={folder}", "train.run_name=last")
        ballast = []
        hook = at_step(STEPS, lambda: ballast.append(fill(folder)), contains="val_loss")  # after the last checkpoint
        with pytest.raises(LmlabError) as error:
            train(load_config(None, config), log=hook)
        message, run_dir = one_line(error.value), folder / "last"
        saved = run_dir / "checkpoints" / "step_000008" / "model.safetensors"
        assert f"the same weights are in {saved}: free some space and copy that file to" in message
        assert summary(run_dir)["status"] == "failed"
        ballast[0].unlink()
        shutil.copy(saved, run_dir / "model.safetensors")
        assert same_weights(run_dir, reference)


# ---------------------------------------------------------------- a rank dies or hangs under torchrun

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
TORCHRUN_TIMEOUT = 240  # seconds a 2-process CPU job may take on a loaded 2-core machine
FAULTY_RANK = """
# Rank 1 sends itself FAULT_SIGNAL at the training forward of step FAULT_AT (one micro-batch per rank and step).
import os, signal, sys
from lmlab.cli import main
from lmlab.model.transformer import Transformer

real, calls = Transformer.forward, [0]


def forward(self, input_ids, kv_cache=None, targets=None):
    if targets is not None and self.training:
        calls[0] += 1
        if os.environ["RANK"] == "1" and calls[0] == int(os.environ["FAULT_AT"]):
            os.kill(os.getpid(), signal.Signals[os.environ["FAULT_SIGNAL"]])
    return real(self, input_ids, kv_cache=kv_cache, targets=targets)


Transformer.forward = forward
sys.exit(main(sys.argv[1:]))
"""


def torchrun(args, timeout=TORCHRUN_TIMEOUT, **env):
    """(exit code, output, seconds) of a 2-process CPU job; the whole process group is killed if it overruns."""
    started = time.monotonic()
    process = subprocess.Popen([*TORCHRUN, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               env={**os.environ, "OMP_NUM_THREADS": "1", **env}, start_new_session=True)
    try:
        out, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, 9)
        pytest.fail(f"the torchrun job did not end in {timeout}s")
    return process.returncode, out.decode(), time.monotonic() - started


def ddp_overrides(tiny_overrides, *extra):
    return overrides(tiny_overrides, "train.grad_accum=2", "train.parallel=ddp", *extra)


@pytest.fixture(scope="module")
def ddp_reference(small_corpus, data_cache, tmp_path_factory):
    """A 2-process DDP job never interrupted: what a failed and resumed job must end equal to (bitwise)."""
    from evals_support import tiny_overrides

    runs_dir = tmp_path_factory.mktemp("ddp") / "runs"
    args = ddp_overrides(tiny_overrides(small_corpus, data_cache, runs_dir), "train.run_name=reference")
    code, out, _ = torchrun(["-m", "lmlab", "train", *args])
    assert code == 0, out[-3000:]
    return runs_dir / "reference", runs_dir


def lmlab_lines(out):
    return [line for line in out.splitlines() if line.startswith("lmlab: error:")]


def no_lmlab_traceback(out):
    """torchrun prints its own report; no traceback may come from lmlab's code in the workers."""
    return not re.search(r'File ".*/lmlab/', out)


@pytest.mark.slow
def test_a_rank_killed_ends_the_job_as_failed_and_resumes_exactly_under_the_same_command(
        ddp_reference, tmp_path, tiny_overrides):
    reference, runs_dir = ddp_reference
    entry = tmp_path / "entry.py"
    entry.write_text(FAULTY_RANK)
    args = ddp_overrides(tiny_overrides, f"train.runs_dir={runs_dir}", "train.run_name=killed")
    code, out, took = torchrun([str(entry), "train", *args], FAULT_SIGNAL="SIGKILL", FAULT_AT="5")
    run_dir = runs_dir / "killed"
    print(f"killed rank: job ended after {took:.1f}s, exit {code}\n{out[-2500:]}")
    assert code != 0
    lines = lmlab_lines(out)
    assert len(lines) == 1 and no_lmlab_traceback(out), out[-3000:]
    assert re.match(rf"lmlab: error: rank 0: run {re.escape(str(run_dir))} failed after step 4: another process of "
                    r"the job stopped \(.+\); its newest checkpoint is step_000004: continue with `lmlab train "
                    r"--resume .*` under the same torchrun command$", lines[0]), lines[0]
    s = summary(run_dir)
    assert s["status"] == "failed" and s["steps"] == 4 and s["checkpoint"] == "step_000004"
    assert "another process of the job stopped" in s["reason"]
    checkpoint.latest(run_dir)  # verifies
    assert not leftovers(run_dir)
    code, out, _ = torchrun(["-m", "lmlab", "train", "--resume", str(run_dir)])
    assert code == 0, out[-3000:]
    assert summary(run_dir)["status"] == "completed" and same_weights(run_dir, reference)


@pytest.mark.slow
def test_a_rank_stopped_fails_the_job_within_the_collective_timeout_and_resumes_on_one_process(
        ddp_reference, tmp_path, tiny_overrides):
    reference, runs_dir = ddp_reference
    entry = tmp_path / "entry.py"
    entry.write_text(FAULTY_RANK)
    args = ddp_overrides(tiny_overrides, f"train.runs_dir={runs_dir}", "train.run_name=stopped",
                         "train.collective_timeout=5")
    code, out, took = torchrun([str(entry), "train", *args], FAULT_SIGNAL="SIGSTOP", FAULT_AT="5")
    ended = time.time()
    run_dir = runs_dir / "stopped"
    hung_at = (run_dir / "metrics.jsonl").stat().st_mtime  # step 4's last line; rank 1 stops in step 5's forward
    failed_at, ended_at = (run_dir / "summary.json").stat().st_mtime - hung_at, ended - hung_at
    print(f"stopped rank: summary.json {failed_at:.1f}s after the last metrics line, torchrun returned after "
          f"{ended_at:.1f}s; job ended after {took:.1f}s, exit {code}\n{out[-2500:]}")
    assert code != 0
    lines = lmlab_lines(out)
    assert len(lines) == 1 and no_lmlab_traceback(out), out[-3000:]
    assert re.search(r"failed after step 4: another process of the job did not answer within "
                     r"train.collective_timeout=5s \(hung or stopped\); ended process \d+ on this machine; its "
                     r"newest checkpoint is step_000004", lines[0]), lines[0]
    assert re.search(r"rank\s+: 1 .*\n\s+exitcode\s+: -9", out), out[-2500:]  # torchrun's report: rank 1 SIGKILLed
    # The whole job, torchrun included, ends within the timeout and a few seconds, not 30 s later (torchrun's
    # fixed grace before SIGKILL, which lmlab no longer waits for: lmlab/training/hung.py). Measured: 6.7-7.7 s
    # (36-37 s before, with or without `torchrun --shutdown-timeout 2`, which torch 2.13 ignores on this path).
    # A bound on a timeout-driven shutdown, not on computation; 15 s of slack for a loaded 2-core machine.
    assert ended_at < 5 + 15, f"torchrun returned {ended_at:.1f}s after rank 1 stopped"
    s = summary(run_dir)
    assert s["status"] == "failed" and s["steps"] == 4 and "collective_timeout" in s["reason"]
    assert not leftovers(run_dir)
    notes = []  # another number of processes: allowed, with a note (data order kept; dropout RNG from rank 0)
    resumed = train(load_config(None, [*args[:-1], f"train.resume={run_dir}", "train.parallel=auto"]),
                    log=lambda *a, **k: notes.append(" ".join(map(str, a))))
    assert any("written by 2 process(es), this run has 1" in n for n in notes), notes
    assert summary(resumed)["status"] == "completed"
    from safetensors.torch import load_file

    got, want = load_file(str(resumed / "model.safetensors")), load_file(str(reference / "model.safetensors"))
    assert max((got[k] - want[k]).abs().max().item() for k in want) < 1e-5


ENDER = """
import json, os, sys
from lmlab.training.hung import end_local_peers
print(json.dumps(end_local_peers(json.loads(sys.argv[1]))))
"""


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc (Linux)")
def test_a_rank_that_timed_out_ends_only_its_sibling_processes(tmp_path):
    """The pids end_local_peers gets: a hung sibling (stopped), itself, its parent, and a process of another parent.

    Only the sibling is SIGKILLed: the others are not children of the same parent (the torchrun agent in a job).
    """
    import signal

    sibling = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    parent_of_another = ("import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', "
                         "'import time; time.sleep(120)']); print(p.pid, flush=True); time.sleep(120)")
    stranger = subprocess.Popen([sys.executable, "-c", parent_of_another], stdout=subprocess.PIPE, text=True)
    grandchild = int(stranger.stdout.readline())
    try:
        os.kill(sibling.pid, signal.SIGSTOP)  # a stopped rank: SIGTERM would not end it, SIGKILL does
        pids = [os.getpid(), sibling.pid, grandchild, 1]
        out = subprocess.run([sys.executable, "-c", ENDER, json.dumps(pids)], capture_output=True, text=True,
                             check=True)
        ender_ended = json.loads(out.stdout)
        assert ender_ended == [sibling.pid]
        assert sibling.wait(timeout=30) == -signal.SIGKILL
        assert stranger.poll() is None and os.path.exists(f"/proc/{grandchild}")  # untouched
    finally:
        for process in (sibling, stranger):
            process.kill()
            process.wait()
        with contextlib.suppress(OSError):
            os.kill(grandchild, signal.SIGKILL)


def test_torchruns_shutdown_grace_is_read_as_torchrun_resolves_it():
    """The flag on torchrun's command line (the workers' parent), then PET_SHUTDOWN_TIMEOUT, then
    TORCH_ELASTIC_SHUTDOWN_TIMEOUT, then 30 s (torch/distributed/run.py and launcher/api.py)."""
    from lmlab.training.launcher import shutdown_timeout

    torchrun_args = ["python", "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    both = {"PET_SHUTDOWN_TIMEOUT": "50", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "60"}
    assert shutdown_timeout(both, [*torchrun_args, "--shutdown-timeout", "90", "-m", "lmlab", "train"]) == (
        90, "--shutdown-timeout 90")
    assert shutdown_timeout(both, [*torchrun_args, "--shutdown_timeout=80", "-m", "lmlab", "train"])[0] == 80
    assert shutdown_timeout(both, [*torchrun_args, "-m", "lmlab", "train"]) == (50, "PET_SHUTDOWN_TIMEOUT=50")
    assert shutdown_timeout({"TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "60"}, torchrun_args)[0] == 60
    assert shutdown_timeout({}, []) == (30, "torchrun's default --shutdown-timeout")


@pytest.mark.parametrize(("environ", "warned"), [
    ({"TORCHELASTIC_RUN_ID": "t", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "0"}, True),  # no grace: any checkpoint is slower
    ({"TORCHELASTIC_RUN_ID": "t", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "100000"}, False),
    ({"TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "0"}, False),  # not under torchrun: no SIGTERM grace to fit in
])
def test_a_checkpoint_slower_than_half_torchruns_grace_is_warned_once(tiny_overrides, monkeypatch, environ, warned):
    for name in ("TORCHELASTIC_RUN_ID", "PET_SHUTDOWN_TIMEOUT", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    lines = []
    train(load_config(None, overrides(tiny_overrides, f"train.run_name=grace-{warned}")),
          log=lambda *a, **k: lines.append(" ".join(map(str, a))))
    warnings = [line for line in lines if "torchrun leaves lmlab" in line]
    assert len(warnings) == warned, warnings  # four checkpoints written, one warning at most
    if warned:
        assert re.fullmatch(r"warning: writing checkpoint step_000002 took [\d.]+ s; on SIGTERM \(a preemption\) "
                            r"torchrun leaves lmlab 0 s \(TORCH_ELASTIC_SHUTDOWN_TIMEOUT=0\) to finish the step and "
                            r"write one before it kills the processes: start torchrun with --shutdown-timeout \d+ or "
                            r"more", warnings[0]), warnings[0]


# ---------------------------------------------------------------- any other error


def test_a_refused_write_is_named_by_its_file_not_the_temporary_one():
    import errno

    from lmlab.training.failure import describe

    error = OSError(errno.ENOSPC, "No space left on device", "/runs/r/.samples.md.k3j_2x.tmp")
    assert describe(error, None) == (True, False, "No space left on device (/runs/r/samples.md)")


def test_an_unexpected_error_keeps_its_traceback_and_the_summary_says_failed(tiny_overrides, tmp_path, monkeypatch):
    from lmlab.training import loop

    real = loop.train_step

    def train_step(run, state, step):
        if step == 3:  # the fourth step, counted from 0
            raise ZeroDivisionError("a bug")
        return real(run, state, step)

    monkeypatch.setattr(loop, "train_step", train_step)
    with pytest.raises(ZeroDivisionError, match="a bug"):
        train(load_config(None, overrides(tiny_overrides, "train.run_name=bug")), log=lambda *a, **k: None)
    s = summary(tmp_path / "runs" / "bug")
    assert s["status"] == "failed" and s["reason"] == "ZeroDivisionError: a bug"
    assert s["steps"] == 3 and s["checkpoint"] == "step_000002"


def test_collective_timeout_is_read_under_its_old_name_too():
    assert load_config(None, ["train.dist_timeout=30"]).train.collective_timeout == 30  # configs of older runs
    assert load_config(None, []).train.collective_timeout == 600
