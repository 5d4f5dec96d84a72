"""Bad inputs around training, checkpoints and resume: each gives one clear line and leaves nothing half-written.

Every case here is a row of docs/errors.md (same id), which shows the full message.
"""

import contextlib
import json
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from ckpt_support import leftovers, quiet, read_only, snapshot
from lmlab import load_config, train
from lmlab.training import checkpoint
from lmlab.cli import main

DOCS = Path(__file__).resolve().parent.parent / "docs" / "errors.md"


@pytest.fixture(scope="module")
def base_run(small_corpus, data_cache, tmp_path_factory):
    """A finished 30-step run with checkpoints at 10, 20 and 30, and the overrides that made it."""
    train_file, valid = small_corpus
    runs = tmp_path_factory.mktemp("bad-input-runs")
    ov = ["data.corpus=", f"data.train_files={train_file}", f"data.val_files={valid}",
          "data.tokenizer_vocab_size=512", f"data.cache_dir={data_cache}", "model.context_length=64",
          "model.d_model=64", "model.n_layers=2", "model.n_heads=4", "train.batch_size=8", "train.max_steps=30",
          "train.eval_every=10", "train.eval_batches=2", "train.log_every=5", "train.sample_tokens=4",
          "optim.warmup_steps=5", "optim.lr=3e-3", "train.device=cpu", "train.threads=1",
          "train.checkpoint_minutes=0", "train.checkpoint_every=10", "train.keep_checkpoints=5"]
    return train(load_config(None, ov + [f"train.runs_dir={runs}", "train.run_name=base"]), log=quiet), ov


@dataclass
class Case:
    argv: list
    says: list  # fragments of the one line on stderr (or of the warning, for code 0)
    code: int = 2
    unchanged: Path | None = None  # a directory that must be byte for byte as before
    within: object = field(default_factory=contextlib.nullcontext)
    check: object = None  # a further check after the run


class Context:
    def __init__(self, base_run, tmp_path):
        self.tmp = tmp_path
        self.run = tmp_path / "runs" / "run"
        shutil.copytree(base_run[0], self.run)
        self.ov = base_run[1] + [f"train.runs_dir={tmp_path / 'new-runs'}"]
        self.ckpt = self.run / "checkpoints"

    def only_checkpoint(self, step=30):
        for s, path in checkpoint.list_checkpoints(self.run):
            if s != step:
                shutil.rmtree(path)
        return self.ckpt / f"step_{step:06d}"

    def resume(self, *overrides):
        return ["train", "--resume", str(self.run), *overrides]


def flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def fix_manifest(ckpt):
    state = json.loads((ckpt / "state.json").read_text())
    for name in state["files"]:
        state["files"][name] = {"bytes": (ckpt / name).stat().st_size, "sha256": checkpoint.file_sha256(ckpt / name)}
    (ckpt / "state.json").write_text(json.dumps(state))


# ---------------------------------------------------------------- the cases (ids match docs/errors.md)


def corrupt_checkpoint(c):
    flip_a_byte(c.only_checkpoint() / "model.safetensors")
    return Case(c.resume(), ["no usable checkpoint in", "model.safetensors does not match its sha256 (corrupt)"],
                unchanged=c.run)


def truncated_checkpoint(c):
    f = c.only_checkpoint() / "optimizer.safetensors"
    f.write_bytes(f.read_bytes()[:5000])
    return Case(c.resume(), ["optimizer.safetensors has 5000 bytes", "were written (truncated?)"], unchanged=c.run)


def corrupt_state_json(c):
    (c.only_checkpoint() / "state.json").write_text('{"format": 1, "step": 3')
    return Case(c.resume(), ["state.json is not valid JSON (corrupt or truncated)"], unchanged=c.run)


def incomplete_checkpoint(c):
    (c.only_checkpoint() / "state.json").unlink()
    return Case(c.resume(), ["step_000030 has no state.json (incomplete)"], unchanged=c.run)


def pickle_checkpoint(c):
    marker = c.tmp / "code-ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    ckpt = c.only_checkpoint()
    torch.save({"model": Payload()}, ckpt / "model.safetensors")
    fix_manifest(ckpt)  # the forger also fixed the sizes and hashes
    return Case(c.resume(), ["model.safetensors is a zip archive (torch.save format), not safetensors; "
                             "lmlab never unpickles a checkpoint"], unchanged=c.run,
                check=lambda: not marker.exists())


def newest_checkpoint_damaged(c):
    f = c.ckpt / "step_000030" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:1000])
    return Case(c.resume(), ["warning: checkpoint", "step_000030: model.safetensors has 1000 bytes",
                             "using the older step_000020"], code=0,
                check=lambda: json.loads((c.run / "summary.json").read_text())["steps"] == 30)


def tokenizer_changed(c):
    return Case(c.resume("data.tokenizer_vocab_size=600"),
                ["cannot resume", "data.tokenizer_vocab_size = 600 (the run has 512)", "start a new run"],
                unchanged=c.run)


def training_files_changed(c):
    changed = c.tmp / "train.txt"
    changed.write_text(Path(next(o for o in c.ov if o.startswith("data.train_files=")).partition("=")[2]).read_text()
                       + "Once upon a time there was one more story.\n<|endoftext|>\n")
    state = json.loads((c.ckpt / "step_000030" / "state.json").read_text())
    config_toml = (c.run / "config.toml").read_text().replace(state["config"]["data"]["train_files"][0], str(changed))
    (c.run / "config.toml").write_text(config_toml)
    for _, path in checkpoint.list_checkpoints(c.run):  # a run that was started on the edited file's old path
        s = json.loads((path / "state.json").read_text())
        s["config"]["data"]["train_files"] = [str(changed)]
        (path / "state.json").write_text(json.dumps(s))
    return Case(c.resume("train.max_steps=40"), ["cannot resume", "the data is not what it was trained on: tokenizer"],
                unchanged=c.run)


def model_shape_changed(c):
    return Case(c.resume("model.d_model=128", "model.n_layers=3"),
                ["these cannot change in the middle of a run: model.d_model = 128 (the run has 64); "
                 "model.n_layers = 3 (the run has 2)"], unchanged=c.run)


def context_longer_than_the_model(c):
    return Case(c.resume("model.context_length=128"), ["model.context_length = 128 (the run has 64)"],
                unchanged=c.run)


def batch_changed_on_resume(c):
    return Case(c.resume("train.batch_size=16", "train.grad_accum=2"),
                ["train.batch_size = 16 (the run has 8)", "train.grad_accum = 2 (the run has 1)"], unchanged=c.run)


def negative_lr(c):
    return Case(["train", *c.ov, "optim.lr=-1"], ["config key 'optim.lr' must be a positive number, got -1.0"])


def non_numeric_lr(c):
    return Case(["train", *c.ov, "optim.lr=fast"], ["config key 'optim.lr' wants a number, got 'fast'"])


def nan_lr(c):
    return Case(["train", *c.ov, "optim.lr=nan"], ["config key 'optim.lr' must be a positive number, got nan"])


def no_accumulation(c):
    return Case(["train", *c.ov, "train.grad_accum=0"], ["config key 'train.grad_accum' must be positive, got 0"])


def parallel_without_torchrun(c):
    return Case(["train", *c.ov, "train.parallel=ddp"],
                ["train.parallel=ddp needs a launch by torchrun, e.g. `torchrun --nproc_per_node=2 -m lmlab train"])


@contextlib.contextmanager
def launched_as_rank_0_of(world_size):
    """torchrun's environment for rank 0 (no process group is started: the config is refused first)."""
    keys = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": str(world_size)}
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update(keys)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def accumulation_not_divisible(c):
    return Case(["train", *c.ov, "train.grad_accum=3"],
                ["train.grad_accum=3 cannot be split over 2 processes: the global batch must stay the same; "
                 "use a multiple of 2"], within=launched_as_rank_0_of(2))


def empty_validation_split(c):
    (c.tmp / "empty-valid.txt").write_text("\n   \n")
    return Case(["train", *c.ov, f"data.val_files={c.tmp / 'empty-valid.txt'}"],
                ["no validation documents from", "empty-valid.txt"])


def truncated_shard(c):
    train_file = next(o for o in c.ov if o.startswith("data.train_files=")).partition("=")[2]
    assert main(["prepare", train_file, "--val-fraction", "0.1", "--tokenizer", str(c.run),
                 "--out", str(c.tmp / "shards")]) == 0
    shard = c.tmp / "shards" / "train_000000.npy"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    return Case(["train", *c.ov, f"data.shards={c.tmp / 'shards'}", f"data.tokenizer={c.run}"],
                ["train_000000.npy is truncated or damaged (mmap length is greater than file size)",
                 "re-run lmlab prepare"])


def read_only_run_directory(c):
    return Case(c.resume("train.max_steps=40"), ["cannot resume", "is not writable", "copy the run somewhere"],
                unchanged=c.run, within=read_only(c.run))


def read_only_runs_directory(c):
    (c.tmp / "new-runs").mkdir()
    return Case(["train", *c.ov], [f"cannot create a run in train.runs_dir: {c.tmp / 'new-runs'} is not writable"],
                within=read_only(c.tmp / "new-runs"),
                check=lambda: not any((c.tmp / "new-runs").iterdir()))


def run_name_taken(c):
    return Case(["train", *c.ov, f"train.runs_dir={c.run.parent}", "train.run_name=run"],
                [f"run directory {c.run} already exists; continue it with `lmlab train --resume {c.run}`"],
                unchanged=c.run.parent)


def resume_missing_run(c):
    return Case(["train", "--resume", str(c.tmp / "nope")], [f"run directory {c.tmp / 'nope'} does not exist"])


def resume_not_a_run(c):
    (c.tmp / "notes").mkdir()
    return Case(["train", "--resume", str(c.tmp / "notes")], ["is not a run directory (no config.toml)"])


def resume_auto_without_a_name(c):
    return Case(["train", *c.ov, "train.resume=auto"], ["train.resume=auto needs train.run_name"])


def resume_a_finished_run(c):
    return Case(c.resume(), ["is already at step 30 of 30; raise train.max_steps"], unchanged=c.run)


def resume_without_checkpoints(c):
    shutil.rmtree(c.ckpt)  # as after train.keep_checkpoints=0, or lmlab import
    return Case(c.resume("train.max_steps=40"), ["has weights but no checkpoint", "nothing to resume"],
                unchanged=c.run)


def unknown_nonfinite_policy(c):
    return Case(["train", *c.ov, "train.on_nonfinite=ignore"],
                ["config key 'train.on_nonfinite' is 'ignore'; choose one of stop, skip"])


def negative_checkpoint_every(c):
    return Case(["train", *c.ov, "train.checkpoint_every=-5"],
                ["config key 'train.checkpoint_every' must be >= 0 (0 = off), got -5"])


def full_disk(c):
    """A real small filesystem (tmpfs; needs root) without room for the run's checkpoints: refused before step 1."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root; test_reliability.py and test_checkpoint.py cover full disks")
    disk = c.tmp / "small-disk"
    disk.mkdir()

    @contextlib.contextmanager
    def mounted():
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(disk)], capture_output=True).returncode:
            pytest.skip("cannot mount a tmpfs here")
        try:
            yield
            assert list(disk.iterdir()) == []  # nothing written
        finally:
            subprocess.run(["umount", "--lazy", str(disk)], check=True)

    ov = [o for o in c.ov if not o.startswith("train.runs_dir=")]
    return Case(["train", *ov, f"train.runs_dir={disk}", "train.run_name=r", "train.sample_tokens=1"],
                [f"not enough space in {disk}: this run needs", "bytes are free; free some space, lower "
                 "train.keep_checkpoints, or choose another train.runs_dir"], within=mounted())


CASES = [corrupt_checkpoint, truncated_checkpoint, corrupt_state_json, incomplete_checkpoint, pickle_checkpoint,
         newest_checkpoint_damaged, tokenizer_changed, training_files_changed, model_shape_changed,
         context_longer_than_the_model, batch_changed_on_resume, negative_lr, non_numeric_lr, nan_lr,
         no_accumulation, parallel_without_torchrun, accumulation_not_divisible, empty_validation_split, truncated_shard, read_only_run_directory, read_only_runs_directory,
         run_name_taken, resume_missing_run, resume_not_a_run, resume_auto_without_a_name, resume_a_finished_run,
         resume_without_checkpoints, unknown_nonfinite_policy, negative_checkpoint_every, full_disk]


def case_id(case):
    return case.__name__.replace("_", "-")


@pytest.mark.parametrize("make", CASES, ids=case_id)
def test_bad_input_gives_one_line_and_leaves_nothing_half_written(make, base_run, tmp_path, capsys):
    c = Context(base_run, tmp_path)
    case = make(c)
    before = snapshot(case.unchanged) if case.unchanged else None
    capsys.readouterr()
    with case.within:
        code = main(case.argv)
    out, err = capsys.readouterr()
    assert code == case.code, err
    assert "Traceback" not in out + err
    if case.code:
        err = err.strip()
        assert "\n" not in err and err.startswith("lmlab: error: "), err
        for fragment in case.says:
            assert fragment in err, err
        assert not (tmp_path / "new-runs").exists() or not any((tmp_path / "new-runs").iterdir())
    else:
        warning = next((line for line in out.splitlines() if line.startswith("warning: ")), "")
        for fragment in case.says:
            assert fragment in warning, out
    if before is not None:
        assert snapshot(case.unchanged) == before  # refused before anything was written
    assert leftovers(tmp_path) == []
    assert case.check is None or case.check()


def test_every_case_is_in_the_table_and_the_table_has_fifteen_rows():
    table = DOCS.read_text(encoding="utf-8")
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    ids = {line.split("`")[1] for line in rows}
    assert ids == {case_id(case) for case in CASES}
    assert len(rows) >= 15
