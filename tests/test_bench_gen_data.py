"""Benchmarks of generation and data: they give rows, and their correctness checks bite (never seconds)."""

import numpy as np
import pytest
import torch

from lmlab.bench.data import check_identical_shards, data_loader, prepare_throughput, tokenizer_training
from lmlab.bench.generate import CACHED, HF_CACHED, HF_UNCACHED, UNCACHED, compare_with_reference, generation
from lmlab.config import ModelConfig, load_config, resolve_d_ff
from lmlab.errors import LmlabError
from lmlab.model.transformer import KVCache, Transformer
from lmlab.model.sampling import generate_ids

TINY = dict(vocab_size=256, context_length=64, d_model=32, n_layers=2, n_heads=4)
QUIET = dict(log=lambda *_: None)


def rows_by(section, key):
    return {row[key]: row for row in section.rows}


# ---------------------------------------------------------------- generation


def test_generation_times_lmlab_with_and_without_the_cache():
    section = generation(TINY, prompt_tokens=8, new_tokens=24, repeats=1, reference=False, **QUIET)
    rows = rows_by(section, "candidate")
    assert set(rows) == {CACHED, UNCACHED}
    for row in rows.values():
        assert row["tokens_per_s"] > 0 and row["ms_per_token"] > 0
    assert rows[UNCACHED]["speedup"] == 1.0
    assert any(note.startswith("KV-cache speed-up") for note in section.notes)
    assert "| lmlab, KV cache |" in section.markdown()


def test_cached_greedy_tokens_equal_uncached_on_the_benchmark_shape():
    config = ModelConfig(**TINY)
    config.d_ff = resolve_d_ff(config)
    torch.manual_seed(0)
    model = Transformer(config)
    prompt = list(range(3, 11))
    cached = generate_ids(model, prompt, 40, temperature=0, use_cache=True)
    assert cached == generate_ids(model, prompt, 40, temperature=0, use_cache=False) and len(cached) == 40


def test_a_corrupted_cache_path_makes_the_benchmark_raise(monkeypatch):
    update = KVCache.update

    def corrupted(self, layer, k, v):  # the values the cached path attends to are blown up
        keys, values = update(self, layer, k, v)
        return keys, values * 1000

    monkeypatch.setattr(KVCache, "update", corrupted)
    with pytest.raises(LmlabError, match="with the KV cache differ from those without it"):
        generation(TINY, prompt_tokens=8, new_tokens=24, repeats=1, reference=False, **QUIET)


def test_generation_next_to_transformers_gives_the_same_tokens():
    pytest.importorskip("transformers")
    section = generation(TINY, prompt_tokens=8, new_tokens=24, repeats=1, **QUIET)
    assert set(rows_by(section, "candidate")) == {CACHED, UNCACHED, HF_CACHED, HF_UNCACHED}
    notes = "\n".join(section.notes)
    assert f"{HF_CACHED}: greedy tokens identical" in notes or "float-level tie" in notes
    assert "reference: transformers" in notes


def test_a_difference_from_the_reference_is_a_tie_only_when_the_logits_are_equal():
    config = ModelConfig(**TINY)
    config.d_ff = resolve_d_ff(config)
    torch.manual_seed(0)
    model = Transformer(config).eval()
    prompt, cpu = [5, 6, 7, 8], torch.device("cpu")
    with torch.no_grad():
        logits = model(torch.tensor([prompt]))[0, -1]
        best, worst = int(logits.argmax()), int(logits.argmin())
        twin = (best + 1) % config.vocab_size
        model.lm_head.weight[twin] = model.lm_head.weight[best]  # two tokens with exactly equal logits
    ours = generate_ids(model, prompt, 6, temperature=0)
    other = twin if ours[0] == best else best
    assert "float-level tie" in compare_with_reference(model, prompt, ours, [other] + ours[1:], "fp32", cpu)
    with pytest.raises(LmlabError, match="not a float-level tie"):
        compare_with_reference(model, prompt, ours, [worst] + ours[1:], "fp32", cpu)


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompt_tokens=60, new_tokens=10), "exceeds context_length 64"),
    (dict(new_tokens=0), "new_tokens and repeats >= 1"),
    (dict(shape=dict(TINY, d_modell=32)), "unknown model field"),
])
def test_bad_generation_settings_are_one_clear_error(kwargs, message):
    kwargs = {"shape": TINY, "reference": False, **kwargs}
    with pytest.raises(LmlabError, match=message):
        generation(**kwargs, **QUIET)


# ---------------------------------------------------------------- data


def test_data_loader_share_of_the_step(tiny_overrides):
    config = load_config(None, tiny_overrides)
    section = data_loader(config, batches=10, steps=1, repeats=1, **QUIET)
    rows = [row for row in section.rows if "share_pct" in row]
    assert [row["what"] for row in rows] == ["Batches.get, packing=concat", "Batches.get, packing=document"]
    for row in rows:
        assert row["share_pct"] > 0 and row["us_per_batch"] > 0 and row["batches_per_s"] > 0 and row["step_ms"] > 0
    assert any(note.startswith("loader share of the step") for note in section.notes)


def test_prepare_throughput_on_two_workers_gives_identical_shards(small_corpus):
    section = prepare_throughput([small_corpus[0]], workers=(1, 2), repeats=1, **QUIET)
    rows = rows_by(section, "workers")
    assert set(rows) == {1, 2} and rows[1]["speedup"] == 1.0
    assert all(row["mb_per_s"] > 0 for row in rows.values())
    assert any("byte-identical" in note for note in section.notes)
    assert any("cores" in note for note in section.notes)


def test_different_shards_are_refused(tmp_path):
    for name, values in (("one", [1, 2, 3]), ("two", [1, 2, 4])):
        (tmp_path / name).mkdir()
        np.save(tmp_path / name / "train_000000.npy", np.array(values, dtype=np.uint16))
    with pytest.raises(LmlabError, match="prepare with two workers wrote different shards .*train_000000.npy"):
        check_identical_shards({"one": tmp_path / "one", "two": tmp_path / "two"})


def test_tokenizer_training_on_one_and_two_threads(small_corpus):
    section = tokenizer_training([small_corpus[0]], threads=(1, 2), vocab_size=300, repeats=1, **QUIET)
    rows = rows_by(section, "threads")
    assert set(rows) == {1, 2}
    assert all(row["mb_per_s"] > 0 and row["seconds"] > 0 for row in rows.values())


@pytest.mark.parametrize("call, message", [
    (lambda: prepare_throughput(workers=(1, -1), **QUIET), "workers must be a list of counts >= 0"),
    (lambda: tokenizer_training(threads=(), **QUIET), "threads must be a list of counts >= 1"),
    (lambda: prepare_throughput(files=["/nonexistent/x.txt"], **QUIET), "does not exist"),
    (lambda: data_loader(batches=0, **QUIET), "batches, steps and repeats >= 1"),
])
def test_bad_data_benchmark_settings_are_one_clear_error(call, message):
    with pytest.raises(LmlabError, match=message):
        call()
