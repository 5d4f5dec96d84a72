"""`lmlab.bench.train` and `lmlab.bench.find_batch` on tiny shapes: what they report, and what they refuse.

Timings on a shared machine are noise, so nothing here asserts on speed beyond
"positive and finite"; memory is checked only where the difference is large.
"""

import math

import pytest
import torch

from lmlab.bench import train as bench_train
from lmlab.bench.find_batch import find_batch, step_peak_mib
from lmlab.config import Config, ModelConfig, TrainConfig
from lmlab.errors import LmlabError
from lmlab.model.hf import hf_state_dict

CPU = torch.device("cpu")
TINY = dict(d_model=64, n_layers=2, n_heads=4, context_length=64, vocab_size=512)
TINY_TIED_GQA = ModelConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, context_length=32, vocab_size=512,
                            tie_embeddings=True)
QUICK = dict(batch_size=2, steps=2, warmup=1)


def quiet(*_):
    pass


def tiny_config(**model):
    return Config(model=ModelConfig(**{**TINY, **model}), train=TrainConfig(batch_size=24))


# --- training_step --------------------------------------------------------------------


def test_training_step_reports_one_row_per_shape_against_transformers():
    pytest.importorskip("transformers")
    lines = []
    section = bench_train.training_step(shapes=[TINY, TINY_TIED_GQA], log=lines.append, **QUICK)
    assert [row["shape"] for row in section.rows] == ["d64 2L h4 ctx64 v512", "d32 2L h4 ctx32 v512"]
    assert len(lines) == 2
    for row, tokens in zip(section.rows, (2 * 64, 2 * 32)):
        assert row["tokens"] == tokens and row["params"] > 0
        assert row["lmlab_tok_s"] > 0 and row["hf_tok_s"] > 0
        assert math.isfinite(row["speed_ratio"]) and row["speed_ratio"] > 0
        assert row["speed_ratio"] == pytest.approx(row["lmlab_tok_s"] / row["hf_tok_s"])
        assert row["lmlab_mfu"] > 0 and row["hf_mfu"] > 0
        assert row["loss_rel_diff"] <= 1e-4
        assert row["reference"] == "LlamaForCausalLM"
    table = section.markdown()
    assert "transformers tok/s" in table and "speed ratio" in table and "memory ratio" in table
    assert "shift_labels" in table and "TFLOP/s" in table and "resident set" in table


def test_training_step_refuses_to_time_models_whose_first_losses_differ(monkeypatch):
    pytest.importorskip("transformers")

    def perturbed(model):  # the exporter, with one matrix of the transformers copy changed
        state = hf_state_dict(model)
        state["lm_head.weight"] = state["lm_head.weight"] * 10
        return state

    monkeypatch.setattr(bench_train, "hf_state_dict", perturbed)
    with pytest.raises(LmlabError, match="disagree on the first step's loss"):
        bench_train.training_step(shapes=[TINY], log=quiet, **QUICK)


def test_gpt2_shapes_are_timed_against_gpt2lmheadmodel_holding_the_same_weights():
    transformers = pytest.importorskip("transformers")
    from lmlab.bench.gpt2 import gpt2_model, gpt2_shape, gpt2_state_dict, is_gpt2
    from lmlab.bench.common import model_config
    from lmlab.model.transformer import Transformer

    assert [bench_train.shape_name(model_config(s)) for s in bench_train.LADDER if is_gpt2(model_config(s))] == [
        "d128 4L h4 ctx128 v2048 gpt2", "d256 4L h4 ctx256 v2048 gpt2"]  # the quick start's shape and d_model 256
    config = model_config(gpt2_shape(TINY))
    torch.manual_seed(0)
    ours = Transformer(config).eval()
    with torch.no_grad():  # norm gains and biases off their init, so that a swapped or dropped one would show
        for p in ours.parameters():
            if p.dim() == 1:
                p.add_(0.2 * torch.randn_like(p))
    theirs = gpt2_model(config, gpt2_state_dict(ours.state_dict(), config.n_layers), CPU).eval()
    assert isinstance(theirs, transformers.GPT2LMHeadModel) and theirs.num_parameters() == ours.num_params()
    ids = torch.randint(0, config.vocab_size, (2, config.context_length), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=ids).logits, ours(ids), rtol=1e-5, atol=1e-5)

    (row,) = bench_train.training_step(shapes=[gpt2_shape(TINY)], log=quiet, **QUICK).rows
    assert row["reference"] == "GPT2LMHeadModel" and row["shape"] == "d64 2L h4 ctx64 v512 gpt2"
    assert row["loss_rel_diff"] <= 1e-4 and row["speed_ratio"] > 0
    with pytest.raises(LmlabError, match="GPT-2 switches"):
        gpt2_model(model_config(dict(TINY, norm="layernorm")), {}, CPU)


def test_the_loss_check_allows_fp32_rounding_only():
    assert bench_train.check_same_loss({"lmlab": 6.2400001, "transformers": 6.24}, "fp32") < 1e-6
    for theirs in (6.25, float("nan")):
        with pytest.raises(LmlabError, match="not computing the same step"):
            bench_train.check_same_loss({"lmlab": 6.24, "transformers": theirs}, "fp32")


@pytest.mark.parametrize("why", ["reference=False", "not installed"])
def test_without_the_reference_rows_are_lmlab_only_and_a_note_says_why(why, monkeypatch):
    if why == "not installed":
        monkeypatch.setattr(bench_train, "_transformers", lambda: None)
    section = bench_train.training_step(shapes=[TINY], reference=why != "reference=False", log=quiet, **QUICK)
    (row,) = section.rows
    assert row["lmlab_tok_s"] > 0 and row["lmlab_mfu"] > 0
    assert not any(key.startswith("hf_") or key == "speed_ratio" for key in row)
    assert "transformers" not in " ".join(heading for _, heading in section.columns)
    expected = "reference=False" if why == "reference=False" else "pip install transformers"
    assert any(note.startswith("lmlab only") and expected in note for note in section.notes)


def test_bad_requests_are_one_line_errors():
    with pytest.raises(LmlabError, match="ModelConfig field"):
        bench_train.training_step(shapes=[dict(TINY, width=3)], log=quiet)
    with pytest.raises(LmlabError, match="at least one shape"):
        bench_train.training_step(shapes=[], log=quiet)
    if not torch.cuda.is_available():
        with pytest.raises(LmlabError, match="CUDA is not available"):
            bench_train.training_step(shapes=[TINY], device="cuda", log=quiet)


# --- find_batch -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def searches():
    """{budget MiB: Section} for the tiny model at a small and a larger budget (about 1 MiB a row here)."""
    return {budget: find_batch(tiny_config(), budget_mib=budget, max_batch=32, log=quiet) for budget in (6, 16)}


def best(section):
    return max(trial["batch"] for trial in section.rows if trial["fits"])


def test_a_smaller_budget_finds_a_smaller_batch_whose_measured_peak_is_within_it(searches):
    assert 1 <= best(searches[6]) < best(searches[16]) <= 32
    for budget, section in searches.items():
        (answer,) = [t for t in section.rows if t["batch"] == best(section)]
        assert answer["how"] == "measured" and answer["peak_mib"] <= budget
        assert f"largest micro-batch that fits: {best(section)} rows of 64 tokens" in section.notes[0]


def test_the_search_doubles_then_bisects_in_few_monotone_trials(searches):
    for section in searches.values():
        batches = [t["batch"] for t in section.rows]
        assert batches[:3] == [1, 2, 4] and len(batches) == len(set(batches)) <= 2 * 5 + 1
        fit = [t["batch"] for t in section.rows if t["fits"]]
        too_big = [t["batch"] for t in section.rows if not t["fits"]]
        assert not too_big or max(fit) < min(too_big)  # every batch that fits is below every one that does not
        assert not too_big or min(too_big) == max(fit) + 1 or max(fit) == 32  # bisected to the boundary
        measured = [t for t in section.rows if t["how"] == "measured"]
        assert max(measured, key=lambda t: t["batch"])["peak_mib"] > measured[0]["peak_mib"]
        assert all(t["tokens"] == 64 * t["batch"] for t in section.rows)


def test_find_batch_suggests_a_split_of_the_configs_global_batch(searches):
    section = searches[6]
    micro = max(d for d in range(1, best(section) + 1) if 24 % d == 0)
    assert "global batch of 24 rows" in section.notes[-1]
    assert f"train.batch_size={micro} train.grad_accum={24 // micro}" in section.notes[-1]


def test_the_peak_of_a_step_grows_with_the_batch():
    config = tiny_config(d_ff=192)
    assert step_peak_mib(config, 32, CPU, "fp32") > step_peak_mib(config, 2, CPU, "fp32") + 10


def test_find_batch_says_so_when_not_even_one_row_fits():
    config = tiny_config(vocab_size=4096)  # weights, gradients and AdamW state of 2 x 4096 x 64 alone are 8 MiB
    with pytest.raises(LmlabError, match="not even one row of 64 tokens fits"):
        find_batch(config, budget_mib=1, log=quiet)
