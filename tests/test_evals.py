"""lmlab eval: sliding-window scoring, perplexity / bits per byte, probes, the CLI and train.evals."""

import json
import math

import numpy as np
import pytest
import torch

from evals_support import BigramModel, InductionModel, tiny_overrides, train_tiny
from lmlab import load_config, load_run
from lmlab.evals.bpb import token_byte_lengths
from lmlab.cli import main
from lmlab.data.corpora import ensure_data
from lmlab.evals import perplexity, probes
from lmlab.evals.scoring import score, windows
from lmlab.model.transformer import lm_loss
from lmlab.rundir.metrics import read_metrics


@pytest.fixture(scope="module")
def run_dir(small_corpus, data_cache, tmp_path_factory):
    return train_tiny(small_corpus, data_cache, tmp_path_factory.mktemp("runs"))


@pytest.fixture(scope="module")
def run(run_dir):
    return load_run(run_dir)


@pytest.fixture(scope="module")
def val_stream(small_corpus, data_cache, tmp_path_factory):
    config = load_config(None, tiny_overrides(small_corpus, data_cache, tmp_path_factory.mktemp("unused")))
    tokenizer, shards = ensure_data(config.data, log=lambda *_: None)
    return tokenizer, probes.shard_stream(shards, "val")


# ---------------------------------------------------------------- windows and scoring


@pytest.mark.parametrize("n, first, context, stride", [(10, 1, 4, 4), (10, 1, 4, 1), (100, 1, 16, 5),
                                                       (100, 40, 16, 16), (17, 1, 16, 16), (5, 1, 16, 3)])
def test_windows_score_every_target_once_with_at_least_context_minus_stride_history(n, first, context, stride):
    scored = []
    for begin, score_from, end in windows(n, first, context, stride):
        assert 0 <= begin <= score_from < end and end - begin <= context
        for pair in range(score_from, end):
            assert pair - begin + 1 >= min(pair + 1, context - stride + 1)  # tokens of history it reads
        scored += range(score_from, end)
    assert scored == list(range(first - 1, n - 1))


def test_stride_equal_to_context_is_plain_chunked_loss(run, val_stream):
    _, stream = val_stream
    model, W = run.model, run.config.model.context_length
    ids = torch.from_numpy(stream[:8 * W + 1].astype(np.int64))
    with torch.no_grad():
        plain = lm_loss(model(ids[:-1].view(8, W)), ids[1:].view(8, W)).item()
    result = score(model, [(ids.numpy(), 1)], stride=W)[0]
    assert len(result.logprobs) == 8 * W
    assert -result.logprobs.mean() == pytest.approx(plain, rel=1e-5)
    # a smaller stride gives every target more history: each is still scored exactly once
    assert len(score(model, [(ids.numpy(), 1)], stride=W // 4)[0].logprobs) == 8 * W


def test_scoring_matches_one_forward_pass_per_target(run, val_stream):
    """Sliding windows, batching and padding change nothing: each target's log-prob equals a direct forward."""
    _, stream = val_stream
    model, W = run.model, run.config.model.context_length
    sequences = [(stream[:150], 1), (stream[500:530], 7), (stream[900:905], 4)]
    results = score(model, sequences, stride=16)
    with torch.no_grad():
        for (ids, first), result in zip(sequences, results):
            ids = torch.from_numpy(np.asarray(ids, dtype=np.int64))
            for k, t in enumerate(range(first, len(ids))):
                begin = max(0, t - W) if t <= W else None
                if begin is None:
                    continue  # beyond the first window the history depends on the stride; checked above
                logprobs = torch.log_softmax(model(ids[begin:t][None])[0, -1].float(), -1)
                assert result.logprobs[k] == pytest.approx(logprobs[ids[t]].item(), abs=1e-5)
                assert result.correct[k] == (logprobs.argmax().item() == ids[t].item())


# ---------------------------------------------------------------- perplexity and bits per byte


def test_eval_val_bits_per_byte_equals_the_training_loops_val_bpb(run_dir, capsys):
    assert main(["eval", str(run_dir), "--val"]) == 0
    result = json.loads((run_dir / "evals" / "val.json").read_text())
    last = [e for e in read_metrics(run_dir / "metrics.jsonl") if "val_bpb" in e][-1]
    assert result["overall"]["bits_per_byte"] == pytest.approx(last["val_bpb"], rel=1e-5)
    assert result["overall"]["loss"] == pytest.approx(last["val_loss"], rel=1e-5)
    assert "bits_per_byte" in capsys.readouterr().out


def test_text_perplexity_is_per_document_and_matches_a_direct_computation(run, small_corpus):
    _, valid = small_corpus
    model, tokenizer = run.model, run.tokenizer
    result = perplexity.text_perplexity(model, tokenizer, [valid], limit=3, stride=1)
    docs = perplexity.read_documents([valid], limit=3)
    assert [d["index"] for d in result["documents"]] == [0, 1, 2] and result["overall"]["documents"] == 3
    nats = nbytes = tokens = 0
    for (_, text), entry in zip(docs, result["documents"]):
        # "<|endoftext|> document <|endoftext|>": every token after the first is a target, and with
        # stride 1 each one is read with the longest history the 64-token model has
        ids = torch.tensor([tokenizer.eot_id] + tokenizer.encode(text) + [tokenizer.eot_id])
        assert len(ids) > 65
        with torch.no_grad():
            head = torch.log_softmax(model(ids[None, :64])[0], -1)  # targets 1..64
            tails = torch.log_softmax(model(ids[:-1].unfold(0, 64, 1)[1:])[:, -1], -1)  # targets 65..
        doc_nats = -(head[torch.arange(64), ids[1:65]].sum() + tails[torch.arange(len(ids) - 65), ids[65:]].sum()).item()
        assert entry["bytes"] == len(text.encode("utf-8")) == token_byte_lengths(tokenizer)[ids.numpy()].sum()
        assert entry["tokens"] == len(ids) - 1
        assert entry["loss"] == pytest.approx(doc_nats / (len(ids) - 1), rel=1e-5)
        nats, nbytes, tokens = nats + doc_nats, nbytes + entry["bytes"], tokens + entry["tokens"]
    assert result["overall"]["bits_per_byte"] == pytest.approx(nats / math.log(2) / nbytes, rel=1e-5)
    assert result["overall"]["perplexity"] == pytest.approx(math.exp(nats / tokens), rel=1e-5)


def test_text_and_shards_commands_write_their_json(run_dir, small_corpus, data_cache, tmp_path):
    _, valid = small_corpus
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"body": t}) + "\n" for _, t in perplexity.read_documents([valid], limit=4)))
    assert main(["eval", str(run_dir), "--text", str(valid), "--limit", "4"]) == 0
    assert main(["eval", str(run_dir), "--text", str(jsonl), "--text-key", "body"]) == 0
    from_text = json.loads((run_dir / "evals" / "text-valid.json").read_text())
    from_jsonl = json.loads((run_dir / "evals" / "text-docs.json").read_text())
    assert from_jsonl["overall"] == from_text["overall"]  # the same four documents, read two ways

    config = load_run(run_dir).config
    _, shards = ensure_data(config.data, log=lambda *_: None)
    assert main(["eval", str(run_dir), "--shards", str(shards), "--limit", str(4 * 64 + 1)]) == 0
    result = json.loads((run_dir / "evals" / "shards-val.json").read_text())
    assert result["overall"]["tokens"] == 4 * 64 and result["stride"] == 64


def test_a_hugging_face_folder_evaluates_like_its_run(run_dir, small_corpus, tmp_path):
    from lmlab.rundir.hf import export_hf

    _, valid = small_corpus
    hf_dir = export_hf(run_dir, tmp_path / "hf")
    assert main(["eval", str(hf_dir), "--text", str(valid), "--limit", "2"]) == 0
    assert main(["eval", str(run_dir), "--text", str(valid), "--limit", "2", "--out", str(tmp_path / "run-evals")]) == 0
    from_hf = json.loads((tmp_path / "hf-evals" / "text-valid.json").read_text())  # beside the folder
    assert not (hf_dir / "evals").exists()  # never inside it
    from_run = json.loads((tmp_path / "run-evals" / "text-valid.json").read_text())
    assert from_hf["overall"] == from_run["overall"]


def test_eval_errors_are_one_line(run_dir, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    cases = [
        ([str(run_dir)], "nothing to evaluate"),
        ([str(run_dir), "--text", str(empty)], f"no documents in {empty}"),
        ([str(run_dir), "--text", str(tmp_path / "missing.txt")], "does not exist"),
        ([str(tmp_path), "--val"], "is not a run directory"),
        ([str(run_dir), "--val", "--stride", "65"], "longer than the model's context"),
    ]
    for args, message in cases:
        assert main(["eval", *args]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and "Traceback" not in err


# ---------------------------------------------------------------- probes


def test_copy_probe_of_a_perfect_induction_head(val_stream):
    tokenizer, stream = val_stream
    model = InductionModel(tokenizer.vocab_size, 64)
    result = probes.copy_probe(model, tokenizer, stream, lengths=[8, 31, 96], samples=8, stride=4,
                               random_tokens="vocab")
    # real text repeats tokens (" the", "."), and then the latest occurrence can point the wrong way
    for kind, least in (("random", 0.9), ("meaningful", 0.6)):
        short, fits, beyond = result[kind]
        assert short["in_context"] and fits["in_context"] and not beyond["in_context"]
        # the separator (end-of-text) also opens the probe, so the head finds where the copy starts
        assert short["per_position"][0] > 0.9
        assert np.mean(short["per_position"][1:]) > least and np.mean(fits["per_position"][1:]) > least
        assert beyond["accuracy"] < 0.15  # the first half left the 64-token window
    assert result["random"][0]["first_accuracy"] < 0.1  # random tokens: nothing to predict from the first time
    reverse = probes.copy_probe(model, tokenizer, stream, task="reverse", lengths=[8, 31], samples=8,
                                random_tokens="vocab")
    assert all(row["accuracy"] < 0.2 for row in reverse["random"])  # copying is not reversing


def test_shots_put_demonstrations_before_the_probe(val_stream):
    tokenizer, stream = val_stream
    model = InductionModel(tokenizer.vocab_size, 64)
    result = probes.copy_probe(model, tokenizer, stream, lengths=[6], samples=8, shots=2, stride=4,
                               counts=np.bincount(stream))
    # with demonstrations, the separator itself has been seen before: the induction head now
    # predicts the first token of the previous demo's copy, still wrong for a new sequence
    assert result["shots"] == 2 and np.mean(result["random"][0]["per_position"][1:]) > 0.9


class _SeenOnlyInduction(InductionModel):
    """An induction head that copies only the tokens it has a trained embedding for (`seen`)."""

    def __init__(self, vocab_size, context_length, seen):
        super().__init__(vocab_size, context_length)
        self.seen = torch.zeros(vocab_size, dtype=torch.bool)
        self.seen[torch.as_tensor(seen)] = True

    def forward(self, x):
        return super().forward(x) * self.seen[x].unsqueeze(-1)  # unseen current token: flat logits, a guess


def test_random_probe_tokens_come_from_the_training_data_by_default(val_stream):
    tokenizer, stream = val_stream
    counts = np.bincount(stream[: len(stream) // 20])  # a small "training set" that leaves tokens unseen
    ordinary = token_byte_lengths(tokenizer) > 0
    seen = np.flatnonzero((np.pad(counts, (0, tokenizer.vocab_size - len(counts))) > 0) & ordinary)
    assert 10 < len(seen) < ordinary.sum() * 0.9
    ids, p = probes.random_pool(tokenizer, counts, "seen")
    assert list(ids) == list(seen) and p is None and tokenizer.eot_id not in ids
    ids, p = probes.random_pool(tokenizer, counts, "frequency")
    assert list(ids) == list(seen) and p.sum() == pytest.approx(1) and np.allclose(p, counts[ids] / counts[ids].sum())
    assert len(probes.random_pool(tokenizer, None, "vocab")[0]) == tokenizer.vocab_size - 1
    with pytest.raises(Exception, match="need the training shards"):
        probes.random_pool(tokenizer, None, "seen")
    # a model that copies every token it was trained on: the default measure says so, the vocabulary does not
    model = _SeenOnlyInduction(tokenizer.vocab_size, 64, seen)
    kinds = {mode: probes.copy_probe(model, tokenizer, stream, lengths=[16], samples=16, random_tokens=mode,
                                     counts=counts) for mode in probes.RANDOM_TOKENS}
    assert kinds["seen"]["random_pool"] == len(seen) and kinds["vocab"]["random_pool"] == tokenizer.vocab_size - 1
    assert np.mean(kinds["seen"]["random"][0]["per_position"][1:]) > 0.9
    assert np.mean(kinds["frequency"]["random"][0]["per_position"][1:]) > 0.5  # frequent tokens repeat within a span
    assert kinds["vocab"]["random"][0]["accuracy"] < 0.6


class _RecordingInduction(InductionModel):
    """An induction head that keeps every batch it reads."""

    def __init__(self, vocab_size, context_length):
        super().__init__(vocab_size, context_length)
        self.inputs = []

    def forward(self, x):
        self.inputs.extend(x.tolist())
        return super().forward(x)


def test_random_probe_sequences_never_hold_the_separator(val_stream):
    # the copy corpus's `|` is one of its 70 tokens: drawn into the first half, it marks a second
    # place where the copy would start, a sequence no training document shows
    tokenizer, stream = val_stream
    sep_id, = tokenizer.encode(".")
    pool = [sep_id] + [i for i in range(tokenizer.vocab_size) if token_byte_lengths(tokenizer)[i] > 0][:9]
    counts = np.zeros(tokenizer.vocab_size, dtype=np.int64)
    counts[pool] = 1
    for mode in ("seen", "frequency"):
        model = _RecordingInduction(tokenizer.vocab_size, 64)
        result = probes.copy_probe(model, tokenizer, stream, lengths=[8], samples=16, separator=".",
                                   random_tokens=mode, counts=counts)
        assert result["random_pool"] == len(set(pool)) - 1
        random_rows = model.inputs[:16]  # random sequences are scored first, one 18-token window each
        assert all(row[:18].count(sep_id) == 1 and row[9] == sep_id for row in random_rows)


def test_a_probe_starts_as_a_training_document_after_an_end_of_text(val_stream):
    # training puts an end-of-text before every document; a probe that opens the window cold
    # is a sequence the model never saw (a copy-corpus model: 0.41 at length 4 cold, 0.94 after it)
    tokenizer, stream = val_stream
    model = _RecordingInduction(tokenizer.vocab_size, 64)
    result = probes.copy_probe(model, tokenizer, stream, lengths=[8, 31], samples=4, separator="|", shots=1,
                               counts=np.bincount(stream))
    fitting = model.inputs[:4]  # length 8, one window each (longer probes are read in sliding windows)
    assert all(row[0] == tokenizer.eot_id and row.count(tokenizer.eot_id) == 1 for row in fitting)
    assert [row["in_context"] for row in result["random"]] == [True, False]  # 1 + 4 * 31 + 3 separators > 64
    assert probes.default_lengths(64)[-1] == 128 and 31 in probes.default_lengths(64)


def test_history_gain_is_zero_for_a_model_without_memory_and_positive_for_a_trained_one(run, val_stream):
    tokenizer, stream = val_stream
    flat = probes.history_probe(BigramModel(tokenizer.vocab_size, 64), stream, samples=16)
    assert [r["context"] for r in flat["contexts"]] == [0, 1, 2, 4, 8, 16, 32, 48]
    assert all(abs(r["loss_gain"]) < 1e-9 and r["accuracy_gain"] == 0 for r in flat["contexts"])
    trained = probes.history_probe(run.model, stream, samples=64)
    assert trained["contexts"][-1]["loss_gain"] > 0


def test_probe_command_writes_table_json_and_plot(run_dir, capsys):
    assert main(["eval", str(run_dir), "--probe", "copy", "reverse", "history", "--lengths", "4,16,40",
                 "--samples", "4"]) == 0
    out = capsys.readouterr().out
    assert "meaningful" in out and "loss gain" in out
    for name in ("copy", "reverse", "history"):
        result = json.loads((run_dir / "evals" / f"{name}.json").read_text())
        assert result["probe"] == name
        assert (run_dir / "evals" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    copy = json.loads((run_dir / "evals" / "copy.json").read_text())
    assert [r["length"] for r in copy["random"]] == [4, 16, 40] == [r["length"] for r in copy["meaningful"]]
    assert [len(r["per_position"]) for r in copy["meaningful"]] == [4, 16, 40]
    assert [r["in_context"] for r in copy["random"]] == [True, True, False]
    # lmlab report shows them with the run
    assert main(["report", str(run_dir.parent)]) == 0
    report = (run_dir.parent / "report.md").read_text()
    assert "#### Evaluation: copy" in report and "evals/copy.png" in report


def test_probe_command_draws_random_tokens_as_asked(run_dir, tmp_path, capsys):
    from lmlab.lab.evaluate import _run_data, load_target

    shards = _run_data(load_target(run_dir), log=lambda *_: None)
    counts = probes.token_counts(shards, "train")
    tokenizer = load_run(run_dir).tokenizer
    seen = int(((counts > 0) & (token_byte_lengths(tokenizer)[:len(counts)] > 0)).sum())
    for mode, pool in (("seen", seen), ("frequency", seen), ("vocab", tokenizer.vocab_size - 1)):
        flags = [] if mode == "seen" else ["--random-tokens", mode]  # seen is the default
        assert main(["eval", str(run_dir), "--probe", "copy", "--lengths", "4", "--samples", "2",
                     "--out", str(tmp_path / mode), *flags]) == 0
        result = json.loads((tmp_path / mode / "copy.json").read_text())
        assert result["random_tokens"] == mode and result["random_pool"] == pool
    assert seen < tokenizer.vocab_size - 1  # the small corpus leaves tokens of its vocabulary unseen
    capsys.readouterr()
    with pytest.raises(SystemExit) as bad:
        main(["eval", str(run_dir), "--probe", "copy", "--random-tokens", "all"])
    assert bad.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_default_lengths_reach_beyond_the_context():
    lengths = probes.default_lengths(128)
    assert lengths[0] == 4 and 63 in lengths and lengths[-1] == 256


# ---------------------------------------------------------------- during training


def test_train_evals_write_probe_numbers_into_metrics_and_checkpoints_evaluate(small_corpus, data_cache, tmp_path):
    run_dir = train_tiny(small_corpus, data_cache, tmp_path, extra=["train.evals=copy,history", "train.evals_every=20",
                                                                  "train.max_steps=20", "train.checkpoint_every=10"])
    events = read_metrics(run_dir / "metrics.jsonl")
    probe_events = [e for e in events if "copy_acc_random" in e]
    assert [e["step"] for e in probe_events] == [20]
    assert {"copy_acc_meaningful", "history_loss_gain", "history_accuracy_gain", "tokens", "elapsed_s"} <= probe_events[0].keys()
    # a checkpoint is a model too: its validation figure is the one training logged at that step
    assert main(["eval", str(run_dir / "checkpoints" / "step_000010"), "--val"]) == 0
    result = json.loads((run_dir / "evals" / "val-step_000010.json").read_text())
    logged = [e["val_loss"] for e in events if e.get("step") == 10 and "val_loss" in e]
    assert result["overall"]["loss"] == pytest.approx(logged[0], rel=1e-5)
    with pytest.raises(Exception, match="choose from"):
        load_config(None, ["train.evals=copi"])
    with pytest.raises(Exception, match="seen"):
        load_config(None, ["train.evals_random_tokens=all"])
    with pytest.raises(Exception, match="multiple of train.eval_every"):
        load_config(None, ["train.evals=copy", "train.eval_every=100", "train.evals_every=150"])
