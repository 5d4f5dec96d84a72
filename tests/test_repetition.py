"""lmlab eval --repetition: the share of repeated n-grams in generated text, greedy and sampled."""

import json
from types import SimpleNamespace

import pytest
import torch

from evals_support import train_tiny
from lmlab import load_run
from lmlab.cli import main
from lmlab.data.corpora import ensure_data
from lmlab.evals import probes
from lmlab.evals.repetition import repeated_ngrams, repeated_share, repetition_eval


@pytest.mark.parametrize("ids, n, expected", [
    ([1, 2, 3, 1, 2, 3, 1, 2, 3], 1, (6, 9)),
    ([1, 2, 3, 1, 2, 3, 1, 2, 3], 3, (4, 7)),   # 123 231 312 | 123 231 312 123
    ([1, 2, 3, 1, 2, 3, 1, 2, 3], 4, (3, 6)),
    (list(range(10)), 2, (0, 9)),
    ([5, 5, 5, 5], 2, (2, 3)),
    ([7], 2, (0, 0)),
])
def test_repeated_ngrams_counts_ngrams_seen_earlier(ids, n, expected):
    assert repeated_ngrams(ids, n) == expected


def test_repeated_share_pools_counts_over_sequences():
    assert repeated_share([[1, 1, 1, 1], [1, 2]], 1) == pytest.approx(3 / 6)
    assert repeated_share([[1], [2]], 2) is None


class LoopModel(torch.nn.Module):
    """Greedy decoding cycles 100 -> 101 -> 102 -> 100; at t=1 sampling is near uniform over the vocabulary."""

    def __init__(self, vocab_size, context_length):
        super().__init__()
        self.config = SimpleNamespace(vocab_size=vocab_size, context_length=context_length)
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # generate_ids reads the device from a parameter

    def forward(self, x):
        in_loop = (x >= 100) & (x <= 102)
        following = torch.where(in_loop, 100 + (x - 99) % 3, torch.full_like(x, 100))
        logits = torch.zeros(*x.shape, self.config.vocab_size)
        return logits.scatter(-1, following.unsqueeze(-1), 1e-3) + self.anchor

    def new_kv_cache(self, batch, length):
        return None  # no cache: generate_ids recomputes the window each step


def test_greedy_loop_repeats_and_near_uniform_sampling_does_not(run_dir):
    run, stream = _val(run_dir)
    model = LoopModel(run.config.model.vocab_size, 64)
    result = repetition_eval(model, run.tokenizer, stream, samples=3, new_tokens=60, seed=0)
    rows = {r["decoding"]: r for r in result["decodings"]}
    greedy, uniform = rows["greedy"]["repeated_share"], rows["t=1.0"]["repeated_share"]
    assert rows["greedy"]["mean_tokens"] == 60
    # greedy: a loop of period 3, so every n-gram after the first period repeats: (60 - n + 1 - 3) / (60 - n + 1)
    assert greedy["1"] == pytest.approx(57 / 60) and greedy["4"] == pytest.approx(54 / 57)
    # near uniform over the vocabulary (hundreds of tokens): almost no 2-gram comes back
    assert uniform["2"] < 0.05
    assert rows["real text"]["mean_tokens"] == 60


def _val(run_dir):
    run = load_run(run_dir)
    config = run.config
    config.data.tokenizer = str(run_dir)
    _, shards = ensure_data(config.data, log=lambda *_: None)
    return run, probes.shard_stream(shards, "val")


def test_repetition_command_writes_table_json_plot_and_report(run_dir, capsys):
    assert main(["eval", str(run_dir), "--repetition", "--samples", "3", "--new-tokens", "20", "--seed", "5"]) == 0
    out = capsys.readouterr().out
    assert "repeated 4-grams" in out and "real text" in out
    result = json.loads((run_dir / "evals" / "repetition.json").read_text())
    assert [r["decoding"] for r in result["decodings"]] == ["greedy", "t=0.8, top-k 50", "t=1.0", "real text"]
    assert (run_dir / "evals" / "repetition.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the same seed gives the same figures, sampled rows included (each sample is seeded)
    run, stream = _val(run_dir)
    again = repetition_eval(run.model, run.tokenizer, stream, samples=3, new_tokens=20, seed=5)
    for row, saved in zip(again["decodings"], result["decodings"]):
        assert row["repeated_share"] == pytest.approx(saved["repeated_share"], abs=1e-6)
    assert main(["report", str(run_dir.parent)]) == 0
    assert "#### Evaluation: repetition" in (run_dir.parent / "report.md").read_text()


def test_new_tokens_must_be_positive(run_dir, capsys):
    assert main(["eval", str(run_dir), "--repetition", "--new-tokens", "0"]) != 0
    assert "--new-tokens must be positive" in capsys.readouterr().err


@pytest.fixture(scope="module")
def run_dir(small_corpus, data_cache, tmp_path_factory):
    return train_tiny(small_corpus, data_cache, tmp_path_factory.mktemp("runs"))


def test_prompt_tokens_come_from_the_validation_text(run_dir):
    run, stream = _val(run_dir)
    result = repetition_eval(run.model, run.tokenizer, stream, samples=2, new_tokens=8, seed=1)
    assert result["prompt_example"] in run.tokenizer.decode(stream.tolist())
