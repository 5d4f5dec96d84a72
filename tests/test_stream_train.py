"""Training with data.packing = stream and model.memory: exact resume after SIGKILL, DDP = accumulation, bad inputs."""

import json
import subprocess

import pytest
from ckpt_support import events, quiet, same_weights, series
from test_distributed import finish, max_weight_difference, torchrun
from test_resume_kill import CLI, TIMEOUT, kill_at

from lmlab import load_config, train
from lmlab.errors import LmlabError

STREAM = ["data.packing=stream", "model.memory=24", "model.context_length=32", "data.segments_per_document=6",
          "train.grad_accum=2", "train.threads=1", "train.checkpoint_minutes=0", "train.sample_tokens=4"]


def test_killed_and_resumed_with_stream_and_memory_gives_the_same_run(tiny_overrides):
    """Memory in the checkpoint, data order from the step: a run killed twice ends bit for bit like the one never killed."""
    ov = tiny_overrides + STREAM + ["train.max_steps=40", "train.eval_every=10", "train.checkpoint_every=3"]
    reference = train(load_config(None, ov + ["train.run_name=uninterrupted"]), log=quiet)
    run_dir = reference.parent / "killed"
    process = subprocess.Popen(CLI + ov + ["train.run_name=killed"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    kills = []
    for target in (8, 23):
        kills.append(kill_at(process, run_dir, target, "stream + memory"))
        process = subprocess.Popen(CLI + ["--resume", str(run_dir)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert process.wait(TIMEOUT) == 0, process.stderr.read().decode()[-2000:]
    assert [s for s, _ in series(run_dir)] == list(range(1, 41))
    assert series(run_dir) == series(reference), f"killed at {kills}"
    assert series(run_dir, "val_loss") == series(reference, "val_loss")
    assert same_weights(run_dir, reference)
    assert len(events(run_dir, "resume")) == 2


def test_the_checkpoint_holds_each_micro_batchs_memory(tiny_overrides):
    """What makes the resume above exact: the memories themselves, filled, in state.json (restored by Memories)."""
    from lmlab.model.memory import Memory
    from lmlab.training import checkpoint

    ov = tiny_overrides + STREAM + ["train.max_steps=4", "train.eval_every=0"]
    run_dir = train(load_config(None, ov + ["train.run_name=held"]), log=quiet)
    _, state = checkpoint.latest(run_dir)
    saved = state["stateful"]["memory"]["ranks"]
    assert len(saved) == 1 and len(saved[0]) == 2  # one process, grad_accum 2
    for record in saved[0]:
        memory = Memory(24, 2, 8, 4, 16)
        memory.load_state_dict(record)
        assert memory.k.abs().sum() > 0 and memory.filled.max() > 0


def test_two_processes_with_stream_and_memory_train_what_one_with_accumulation_2_trains(tiny_overrides):
    ov = tiny_overrides + STREAM + ["train.max_steps=12", "train.eval_every=6", "train.eval_batches=3"]
    single = train(load_config(None, ov + ["train.run_name=single"]), log=quiet)
    finish(torchrun(["-m", "lmlab", "train", *ov, "train.parallel=ddp", "train.run_name=ddp"]))
    ddp = single.parent / "ddp"
    got, want = series(ddp), series(single)
    assert [s for s, _ in got] == list(range(1, 13))
    assert max(abs(a - b) for (_, a), (_, b) in zip(got, want)) <= 1e-5
    got_val, want_val = series(ddp, "val_loss"), series(single, "val_loss")
    assert len(got_val) == 2 and max(abs(a - b) for (_, a), (_, b) in zip(got_val, want_val)) <= 1e-5
    assert max_weight_difference(ddp, single) <= 1e-5
    assert json.loads((ddp / "summary.json").read_text())["world_size"] == 2


@pytest.mark.parametrize("extra, message", [
    (["model.memory=16"], "needs data.packing = \"stream\""),
    (["data.packing=stream", "model.memory=-1"], "model.memory must be >= 0"),
    (["data.packing=stream", "data.segments_per_document=0"], "data.segments_per_document must be >= 1"),
    (["data.packing=stream", "model.memory=8", "model.position=learned"], "learned absolute positions"),
    (["data.packing=stream", "train.context_schedule=32:0.5,64:1"], "context_schedule cannot be used"),
])
def test_bad_stream_and_memory_settings_are_one_line(tiny_overrides, extra, message):
    with pytest.raises(LmlabError, match=message) as e:
        load_config(None, tiny_overrides + extra)
    assert "\n" not in str(e.value)


def test_a_corpus_of_short_documents_warns_that_streaming_adds_nothing(tiny_overrides, small_corpus, tmp_path):
    """Every document fits one segment: the run works, and says streaming adds nothing."""
    text = small_corpus[0].read_text(encoding="utf-8")
    short = tmp_path / "short.txt"
    short.write_text("".join(f"{line.strip()[:60]}\n<|endoftext|>\n" for line in text.splitlines()
                             if line.strip() and "<|endoftext|>" not in line), encoding="utf-8")
    lines = []
    ov = tiny_overrides + ["data.packing=stream", f"data.train_files={short}", "model.context_length=64",
                           "train.max_steps=1", "train.eval_batches=1", "train.batch_size=2"]
    train(load_config(None, ov), log=lines.append)
    assert any(line.startswith("warning: no training document is longer than one segment") for line in lines)
