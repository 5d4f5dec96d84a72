"""What a run records: both clocks, MFU, memory, val_bpb, per-layer norms, env.json, sinks, cut files."""

import importlib.util
import json
import math
import os
import time

import numpy as np
import pytest
import torch

from evals_support import tiny_overrides
from lmlab import load_config, train
from lmlab.evals.bpb import bits_per_byte, count_targets, token_byte_lengths
from lmlab.config import ModelConfig
from lmlab.data.batches import Batches
from lmlab.errors import LmlabError
from lmlab.model.transformer import Transformer, lm_loss
from lmlab.training.perf import mfu, peak_flops, table_peak
from lmlab.lab.table import read_run
from lmlab.rundir.sinks import StatusLine, check_sinks, status_line
from lmlab.data.tokenizer import Tokenizer
from lmlab.training.loop import evaluate
from lmlab.rundir.metrics import MetricsLog, read_metrics, scan_metrics


def quiet(*_):
    pass


@pytest.fixture(scope="module")
def runs(small_corpus, data_cache, tmp_path_factory):
    """Two 30-step runs, the same but for the norm probe (every 10 steps) and TensorBoard (when installed)."""
    runs_dir = tmp_path_factory.mktemp("runs")
    base = tiny_overrides(small_corpus, data_cache, runs_dir)
    lines = []
    tensorboard = importlib.util.find_spec("tensorboard") is not None
    probed = train(load_config(None, base + ["train.run_name=probed", "train.norms_every=10", "train.print_every=10",
                                             f"train.tensorboard={tensorboard}"]), log=lines.append)
    plain = train(load_config(None, base + ["train.run_name=plain", "train.norms_every=0"]), log=quiet)
    return {"probed": probed, "plain": plain, "lines": lines, "base": base}


def test_every_train_event_has_both_clocks_throughput_mfu_and_memory(runs):
    events = read_metrics(runs["probed"] / "metrics.jsonl")
    train_events = [e for e in events if "loss" in e]
    assert [e["step"] for e in train_events] == list(range(1, 31))
    env = json.loads((runs["probed"] / "env.json").read_text())
    for e in train_events:
        assert {"step", "tokens", "elapsed_s", "wall_s", "lr", "loss", "grad_norm", "tokens_per_s", "mfu",
                "peak_mem_mb"} <= e.keys()
        assert e["wall_s"] >= e["elapsed_s"] > 0  # wall time includes setup, evaluation and saving
        assert 0 < e["mfu"] < 1 and e["peak_mem_mb"] > 0
        assert e["mfu"] == pytest.approx(e["tokens_per_s"] * env["flops_per_token"] / env["peak_flops"], rel=1e-3)
    walls = [e["wall_s"] for e in events]
    assert walls == sorted(walls)
    vals = [e for e in events if "val_loss" in e]
    assert [e["step"] for e in vals] == [10, 20, 30]
    for e in vals:
        assert e["val_ppl"] == pytest.approx(math.exp(e["val_loss"]))
        assert 0 < e["val_bpb"] < e["val_loss"] / math.log(2)  # a token holds more than one byte


def test_the_environment_record_says_what_ran_where(runs):
    env = json.loads((runs["probed"] / "env.json").read_text())
    assert env["torch"] == torch.__version__ and env["device"] == "cpu" and env["precision"] == "fp32"
    assert env["threads"] == torch.get_num_threads() and env["cpu_count"] == os.cpu_count()
    assert env["peak_flops"] > 0 and env["peak_flops_source"].startswith("measured: best fp32")
    assert env["python"] and env["lmlab"] and env["command"] and "git" in env
    model = Transformer(load_config(runs["probed"] / "config.toml").model)
    assert env["flops_per_token"] == model.flops_per_token()


def test_norm_events_cover_every_layer_and_do_not_change_training(runs):
    events = read_metrics(runs["probed"] / "metrics.jsonl")
    norms = [e for e in events if e.get("kind") == "norms"]
    assert [e["step"] for e in norms] == [10, 20, 30]
    groups = {"embed_tokens", "lm_head", "norm"} | {f"layers.{i}.{part}" for i in range(2)
                                                    for part in ("self_attn", "mlp", "input_layernorm",
                                                                 "post_attention_layernorm")}
    for e in norms:
        assert set(e["weight_l2"]) == groups and set(e["grad_l2"]) == groups
        assert {"embed_tokens", "layers.0", "layers.1", "layers.1.mlp", "norm"} <= set(e["act_rms"])
        assert all(v > 0 and math.isfinite(v) for kind in ("weight_l2", "grad_l2", "act_rms") for v in e[kind].values())
    # the probe is a side pass: with and without it the losses are the same to the bit
    assert [e["loss"] for e in events if "loss" in e] == \
        [e["loss"] for e in read_metrics(runs["plain"] / "metrics.jsonl") if "loss" in e]
    assert not any(e.get("kind") == "norms" for e in read_metrics(runs["plain"] / "metrics.jsonl"))


def test_plain_logs_get_a_compact_status_line_every_print_every_steps(runs):
    status = [line for line in runs["lines"] if line.startswith("step ") and "|" in line]
    assert [line.split()[1] for line in status] == ["10/30", "20/30", "30/30"]
    assert "loss " in status[0] and "tok/s" in status[0] and "mfu" in status[0] and "eta" in status[0]
    event = {"step": 200, "tokens": 10, "elapsed_s": 83.0, "wall_s": 100.0, "lr": 3e-3, "loss": 3.21,
             "tokens_per_s": 41200.0, "mfu": 0.031}
    assert status_line(event, 1200) == \
        "step 200/1200 (17%) | loss 3.2100 | lr 3.00e-03 | 41.2k tok/s | mfu 3.1% | 1m23s train, 1m40s wall | eta 6m55s"
    printed = []
    line = StatusLine(printed.append, total_steps=100)  # 0 = 20 lines per run: every 5 steps
    for step in range(1, 101, 3):
        line.write({"step": step, "loss": 1.0})
    assert len(printed) == 20
    assert status_line(event, None).startswith("step 200 | loss 3.2100 |")  # bounded by time only: no eta
    assert "eta" not in status_line(event, None)


# ---------------------------------------------------------------- bits per byte


@pytest.fixture(scope="module")
def shards(runs, data_cache):
    config = load_config(runs["probed"] / "config.toml")
    tokenizer = Tokenizer.load(runs["probed"])
    shards_dir = next(p.parent for p in data_cache.rglob("meta.json")
                      if json.loads(p.read_text())["tokenizer_fingerprint"] == tokenizer.fingerprint)
    return config, tokenizer, shards_dir


def test_token_byte_lengths_add_up_to_the_bytes_of_the_split(shards):
    _, tokenizer, shards_dir = shards
    lengths = token_byte_lengths(tokenizer)
    assert lengths[tokenizer.eot_id] == 0
    meta = json.loads((shards_dir / "meta.json").read_text())
    for split in ("train", "val"):
        ids = np.concatenate([np.load(shards_dir / name) for name in meta["splits"][split]["shards"]])
        assert int(lengths[ids].sum()) == meta["splits"][split]["bytes"]
    # byte-level tokens may hold part of a UTF-8 character; the table still counts its bytes exactly
    for text in ("héllo wörld", "你好", "🙂 ok"):
        assert int(lengths[tokenizer.encode(text)].sum()) == len(text.encode("utf-8"))


@pytest.mark.parametrize("packing", ["concat", "document"])
def test_val_bpb_does_not_depend_on_batching_and_matches_a_direct_count(shards, packing):
    config, tokenizer, shards_dir = shards
    torch.manual_seed(0)
    model = Transformer(config.model).eval()
    lengths = token_byte_lengths(tokenizer)
    context = config.model.context_length
    results = []
    for batch_size, n_batches in ((16, 1), (8, 2), (4, 4), (1, 16)):  # the same 16 windows, cut differently
        batches = Batches(shards_dir, "val", batch_size, context, packing=packing).fixed(n_batches)
        loss = evaluate(model, batches, "fp32", torch.device("cpu"))
        tokens, nbytes = count_targets(batches, lengths)
        results.append(bits_per_byte(loss, tokens, nbytes))
        direct_bytes = sum(len(tokenizer.decode([t for t in y[y != -100].tolist() if t != tokenizer.eot_id])
                               .encode("utf-8")) for _, yb in batches for y in yb)
        if packing == "document":  # whole documents from their start: decoding is exact
            assert direct_bytes == nbytes
        else:  # windows may cut a multi-byte character; decoding a cut one yields U+FFFD
            assert abs(direct_bytes - nbytes) <= 0.01 * nbytes
        assert results[-1] == pytest.approx(loss / math.log(2) * tokens / direct_bytes, rel=0.01)
    assert max(results) - min(results) < 1e-6


def test_bits_per_byte_is_the_loss_in_bits_spread_over_bytes():
    assert bits_per_byte(math.log(2), tokens=100, nbytes=400) == pytest.approx(0.25)
    assert bits_per_byte(2.0, tokens=10, nbytes=0) is None


# ---------------------------------------------------------------- FLOPs and MFU


def test_flops_per_token_matches_a_hand_count_and_torch_flop_counter():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    c = ModelConfig(vocab_size=512, context_length=64, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=192)
    model = Transformer(c)
    attention = 64 * 64 + 64 * 32 + 64 * 32 + 64 * 64  # q, k, v (2 kv heads of 16), o
    mlp = 3 * 64 * 192  # gate, up, down
    head = 64 * 512
    matmul_weights = 2 * (attention + mlp) + head  # 131,072; embeddings and norm gains are no matmuls
    hand = 6 * matmul_weights + 12 * 2 * 64 * 64  # + attention scores: 12 L d T
    assert hand == 884_736
    assert model.flops_per_token() == hand
    x = torch.randint(0, 512, (2, 64))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        lm_loss(model(x), x).backward()
    assert counter.get_total_flops() == hand * x.numel()  # forward and backward, every matmul counted


def test_mfu_is_achieved_flops_over_the_peak():
    assert mfu(tokens_per_s=1000.0, flops_per_token=884_736, peak=1e12) == pytest.approx(8.84736e-4, rel=1e-4)
    assert mfu(1000.0, 884_736, None) is None


def test_gpu_peaks_come_from_the_table_and_cpu_peaks_are_measured():
    assert table_peak("NVIDIA A100-SXM4-80GB", "bf16") == 312e12
    assert table_peak("NVIDIA A100-SXM4-80GB", "fp32") == 19.5e12
    assert table_peak("NVIDIA H100 80GB HBM3", "bf16") == 989.4e12
    assert table_peak("NVIDIA H100 PCIe", "bf16") == 756e12
    assert table_peak("NVIDIA H200", "bf16") == 989.4e12 and table_peak("NVIDIA H20", "bf16") == 148e12
    assert table_peak("NVIDIA L4", "bf16") == 121e12 and table_peak("NVIDIA L40S", "bf16") == 362.1e12
    assert table_peak("NVIDIA L40", "fp32") == 90.5e12 and table_peak("NVIDIA L20", "bf16") == 119.5e12
    assert table_peak("NVIDIA GeForce RTX 3090", "bf16") == 71e12
    assert table_peak("NVIDIA GeForce RTX 4090", "fp32") == 82.6e12
    assert table_peak("Tesla V100-SXM2-16GB", "fp16") == 125e12 and table_peak("Tesla T4", "fp16") == 65e12
    assert table_peak("Some Future GPU", "bf16") is None
    peak, source = peak_flops(torch.device("cpu"), "fp32")
    assert peak > 1e8 and source.startswith("measured")
    assert peak_flops(torch.device("cpu"), "fp32")[0] == peak  # measured once per process
    assert peak_flops(torch.device("cpu"), "fp32", override_tflops=2.5) == (2.5e12, "train.peak_tflops")


# ---------------------------------------------------------------- sinks


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="tensorboard is not installed")
def test_tensorboard_events_read_back_with_tensorboards_reader_match_metrics_jsonl(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(runs["probed"] / "tensorboard"), size_guidance={"scalars": 0})
    accumulator.Reload()
    events = read_metrics(runs["probed"] / "metrics.jsonl")
    tags = set(accumulator.Tags()["scalars"])
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "mfu", "val_loss", "val_bpb",
            "norms/grad_l2/layers.0.mlp", "norms/act_rms/layers.1"} <= tags
    for key in ("loss", "val_loss", "val_bpb", "lr"):
        expected = [(e["step"], e[key]) for e in events if key in e]
        got = [(s.step, s.value) for s in accumulator.Scalars(key)]
        assert [step for step, _ in got] == [step for step, _ in expected]
        assert [v for _, v in got] == pytest.approx([v for _, v in expected], rel=1e-6)  # stored as float32
    norm = [e["grad_l2"]["layers.0.mlp"] for e in events if e.get("kind") == "norms"]
    assert [s.value for s in accumulator.Scalars("norms/grad_l2/layers.0.mlp")] == pytest.approx(norm, rel=1e-6)


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is not installed")
def test_wandb_offline_mode_writes_the_run_inside_the_run_directory(runs, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = train(load_config(None, runs["base"] + ["train.run_name=wandb", "train.wandb=true",
                                                      "train.max_steps=3", "train.eval_every=0"]), log=quiet)
    offline = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and list(offline[0].glob("*.wandb"))
    assert (run_dir / "metrics.jsonl").is_file()  # the local record is written as always


def test_a_missing_sink_library_is_reported_before_anything_is_written(runs, monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    config = load_config(None, runs["base"] + ["train.tensorboard=true", f"train.runs_dir={tmp_path / 'r'}"])
    with pytest.raises(LmlabError, match=r"pip install 'lmlab\[tensorboard\]'"):
        check_sinks(config)
    with pytest.raises(LmlabError, match="tensorboard"):
        train(config, log=quiet)
    assert not (tmp_path / "r").exists()


def test_a_failing_sink_is_switched_off_and_the_local_file_still_written(tmp_path):
    class Broken:
        def write(self, event):
            raise RuntimeError("dashboard down")

        def close(self):
            pass

    log = MetricsLog(tmp_path / "metrics.jsonl", sinks=[Broken()])
    with pytest.warns(UserWarning, match="dashboard down"):
        log.write(step=1, tokens=8, elapsed_s=0.1, loss=2.0)
    log.write(step=2, tokens=16, elapsed_s=0.2, loss=float("nan"))
    log.close()
    events = read_metrics(tmp_path / "metrics.jsonl")
    assert [e["step"] for e in events] == [1, 2] and math.isnan(events[1]["loss"])
    assert list(events[0]) == ["step", "tokens", "elapsed_s", "wall_s", "loss"]


# ---------------------------------------------------------------- reading runs that are not finished


def test_a_run_still_being_written_or_cut_by_a_crash_reads_and_says_so(runs, tmp_path):
    import shutil

    run = tmp_path / "crashed"
    shutil.copytree(runs["plain"], run)
    (run / "summary.json").unlink()
    text = (run / "metrics.jsonl").read_text()
    (run / "metrics.jsonl").write_text(text + '{"step": 31, "tokens": 15872, "elapsed_s": 1.2, "lo')
    events, problem = scan_metrics(run / "metrics.jsonl")
    assert len(events) == len(text.splitlines()) and "cut" in problem
    record = read_run(run)
    assert record.status == "running" and record.problem  # written to just now
    assert record.stats()["steps"] == 30 and record.stats()["best_val_loss"] > 0
    old = time.time() - 3600
    os.utime(run / "metrics.jsonl", (old, old))
    assert read_run(run).status == "unfinished"
    (run / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(LmlabError, match=r"metrics.jsonl:2 is not valid JSON"):
        read_run(run)


def test_tracking_keys_are_checked_and_listed():
    from lmlab.config import describe_keys

    for key in ("train.norms_every=-1", "train.print_every=-5", "train.peak_tflops=-1"):
        with pytest.raises(LmlabError, match="must be >= 0"):
            load_config(None, [key])
    keys = describe_keys()
    for key in ("train.norms_every", "train.print_every", "train.peak_tflops", "train.tensorboard", "train.wandb",
                "train.wandb_project"):
        assert key in keys
