"""lmlab eval on long documents: segment-by-segment loss with and without memory, and the distance copy probe."""

import json

import numpy as np
import pytest
import torch

from lmlab.config import ModelConfig
from lmlab.errors import LmlabError
from lmlab.evals import segments
from lmlab.evals.options import EvalOptions
from lmlab.model.transformer import Transformer


class _Tok:
    """Enough of a tokenizer: ids are bytes + 2, 0 is end-of-text, 1 padding."""

    vocab_size, eot_id, pad_id = 258, 0, 1

    def encode_batch(self, texts):
        return [[b + 2 for b in t.encode("utf-8")] for t in texts]


def model(memory, context=16):
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=258, context_length=context, d_model=32, n_layers=2, n_heads=4,
                                   memory=memory)).eval()


def test_segments_cover_every_token_once_and_memory_changes_only_later_segments():
    documents = [("f", "abcdefghij" * 7), ("f", "the same text again " * 3)]
    on = segments.segment_perplexity(model(16), _Tok(), documents, memory=True)
    off = segments.segment_perplexity(model(16), _Tok(), documents, memory=False)
    tokens = sum(len(t.encode()) for _, t in documents)  # every token after the first and the closing eot
    assert on["overall"]["tokens"] == off["overall"]["tokens"] == tokens
    assert sum(r["tokens"] for r in on["by_segment"]) == sum(r["tokens"] for r in on["by_position"]) == tokens
    assert on["memory"] and not off["memory"]
    assert on["by_segment"][0]["loss"] == pytest.approx(off["by_segment"][0]["loss"], abs=1e-4)  # nothing to recall yet
    assert on["by_segment"][1]["loss"] != pytest.approx(off["by_segment"][1]["loss"], abs=1e-4)
    assert "position in segment" in segments.segments_table(on)


class _Recorder(torch.nn.Module):
    """Records the segments it is given (and whether with a memory); predicts uniformly."""

    def __init__(self, memory, context):
        super().__init__()
        self.config = ModelConfig(vocab_size=258, context_length=context, memory=memory)
        self.inputs = []

    def new_memory(self, batch_size, device=None):
        return object()

    def forward(self, x, memory=None):
        self.inputs.append((x.clone(), memory is not None))
        return torch.zeros(*x.shape, 258)


def test_segments_are_read_as_stream_training_reads_a_document():
    """'document <eot>' in consecutive segments with the memory carried: no end-of-text token as an input.

    Stream training never feeds one (it is only a document's last target), so a leading one would
    start each document with an input the model has not trained on.
    """
    text = "abcdefghij" * 5  # 50 tokens, + eot: targets 2..51 in segments of 16
    recorder = _Recorder(memory=16, context=16)
    result = segments.segment_perplexity(recorder, _Tok(), [("f", text)], memory=True)
    ids = [b + 2 for b in text.encode()]
    fed = torch.cat([x[0] for x, _ in recorder.inputs]).tolist()
    assert fed == ids and all(with_memory for _, with_memory in recorder.inputs)
    assert [r["tokens"] for r in result["by_segment"]] == [16, 16, 16, 2] and result["overall"]["tokens"] == 50


class _Copier(torch.nn.Module):
    """Predicts, at each position, the token that followed the latest earlier occurrence of the current one,
    among the tokens it can see: its segment, plus the memory's last M tokens when given one."""

    def __init__(self, memory, context):
        super().__init__()
        self.config = ModelConfig(vocab_size=258, context_length=context, memory=memory)

    def new_memory(self, batch_size, device=None):
        return {"tokens": torch.zeros(batch_size, 0, dtype=torch.long)}

    def forward(self, x, memory=None):
        seen = x if memory is None else torch.cat([memory["tokens"], x], 1)
        offset = seen.shape[1] - x.shape[1]
        logits = torch.zeros(*x.shape, 258)
        for b in range(x.shape[0]):
            for t in range(x.shape[1]):
                now = offset + t
                earlier = (seen[b, :now] == seen[b, now]).nonzero().flatten()
                if len(earlier):
                    logits[b, t, seen[b, earlier[-1] + 1]] = 1
        if memory is not None:
            memory["tokens"] = seen[:, -self.config.memory:]
        return logits


def test_distance_probe_finds_the_source_in_memory_and_only_there():
    copier = _Copier(memory=24, context=32)
    on = segments.distance_copy_probe(copier, _Tok(), [8, 16, 24, 40], length=8, samples=4, memory=True)
    off = segments.distance_copy_probe(copier, _Tok(), [8, 16, 24, 40], length=8, samples=4, memory=False)
    got = {r["distance"]: r["random"] for r in on["distances"]}
    # (a random filler token may repeat and mislead the copier now and then, hence not exactly 1)
    assert min(got[8], got[16], got[24]) > 0.85 and got[40] < 0.2  # 40 > M = 24: the source is out of reach
    assert all(r["random"] < 0.2 for r in off["distances"])
    assert [r["within_memory"] for r in on["distances"]] == [True, True, True, False]


def test_distance_probe_draws_random_tokens_from_the_pool_it_is_given():
    """--random-tokens seen|frequency|vocab: the pool of lmlab.evals.probes.random_pool, as the copy probe uses."""
    recorder = _Recorder(memory=16, context=16)
    pool = np.array([40, 41, 42, 43]), None
    result = segments.distance_copy_probe(recorder, _Tok(), [8, 24], length=4, samples=3, pool=pool,
                                          random_tokens="seen")
    fed = torch.cat([x.flatten() for x, _ in recorder.inputs])
    assert set(fed.tolist()) <= {40, 41, 42, 43}
    assert (result["random_tokens"], result["random_pool"], result["chance"]) == ("seen", 4, 0.25)
    weighted = segments.distance_copy_probe(recorder, _Tok(), [8], length=4, samples=2,
                                            pool=(np.array([50, 51]), np.array([0.75, 0.25])), random_tokens="frequency")
    assert weighted["chance"] == 0.75 and "frequency (2 ids)" in segments.distance_table(weighted)


def test_distance_needs_the_copy_probe():
    with pytest.raises(LmlabError, match="--distance needs --probe copy"):
        EvalOptions(text=("x",), distance=(8,)).check()


def test_lmlab_eval_on_a_memory_run(tiny_overrides, tmp_path, small_corpus):
    from lmlab import load_config, train
    from lmlab.lab.evaluate import run_evals

    ov = tiny_overrides + ["data.packing=stream", "model.memory=32", "model.context_length=32", "train.max_steps=4",
                           "train.eval_every=0"]
    run = train(load_config(None, ov), log=lambda *_: None)
    with_memory = run_evals(run, text=[str(small_corpus[1])], limit=3, log=lambda *_: None)
    without = run_evals(run, text=[str(small_corpus[1])], limit=3, no_memory=True, log=lambda *_: None)
    (name, a), = with_memory.items()
    (other, b), = without.items()
    assert name == "segments-valid" and other == "segments-valid-no-memory"
    assert a["overall"]["tokens"] == b["overall"]["tokens"] and a["overall"]["loss"] != b["overall"]["loss"]
    assert json.loads((run / "evals" / "segments-valid.json").read_text())["by_segment"]
    assert (run / "evals" / "segments-valid.png").is_file() and (run / "evals" / "segments-valid-no-memory.png").is_file()
    own = run_evals(run, val_text=True, limit=3, log=lambda *_: None)  # the run's own validation text, found for us
    assert own["segments-valid"]["overall"] == a["overall"]
    val = run_evals(run, val=True, log=lambda *_: None)["val"]["overall"]["loss"]
    final = json.loads((run / "summary.json").read_text())
    from ckpt_support import series
    assert val == pytest.approx(series(run, "val_loss")[-1][1], abs=1e-5)  # memory carried, as training measured
    assert final["status"] == "completed"
    probe = run_evals(run, probe=("copy",), distance=(8, 40), samples=2, log=lambda *_: None)["copy-distance"]
    assert [r["distance"] for r in probe["distances"]] == [8, 40] and np.isfinite(probe["distances"][0]["meaningful"])
    assert probe["random_tokens"] == "seen" and probe["random_pool"] < 512 - 1  # tokens the run trained on
    assert (run / "evals" / "copy-distance.png").is_file()


def test_a_memory_run_exports_with_a_note_and_the_same_weights(tiny_overrides, tmp_path):
    """The memory holds no weights: export keeps them all and says the exported model reads one window at a time."""
    from safetensors.torch import load_file

    from lmlab import load_config, train
    from lmlab.rundir.hf import export_hf

    ov = tiny_overrides + ["data.packing=stream", "model.memory=16", "model.context_length=32", "train.max_steps=2",
                           "train.eval_every=0"]
    run = train(load_config(None, ov), log=lambda *_: None)
    lines = []
    out = export_hf(run, tmp_path / "hf", log=lines.append)
    assert any("model.memory=16" in line and "no memory across segments" in line for line in lines)
    exported, saved = load_file(str(out / "model.safetensors")), load_file(str(run / "model.safetensors"))
    assert all(torch.equal(exported["model." + k] if "model." + k in exported else exported[k], v)
               for k, v in saved.items())


def test_meaningful_distance_copy_uses_real_text_and_reports_the_no_copy_accuracy():
    copier = _Copier(memory=24, context=32)
    stream = np.tile(np.arange(2, 200), 20)  # a "text" whose tokens recur only every 198 positions
    on = segments.distance_copy_probe(copier, _Tok(), [16], length=8, samples=3, memory=True, stream=stream)
    row = on["distances"][0]
    # the copy is found in memory; where the span first occurs there is nothing earlier to copy from
    assert row["meaningful"] == 1.0 and row["first_accuracy"] == 0.0
