"""Key norms in the norms events (for KeyNorm against q.k/sqrt(d)), and per-layer norms as compare metrics."""

from pathlib import Path

import pytest
import torch

from lmlab.config import ModelConfig
from lmlab.errors import LmlabError
from lmlab.lab.table import RunRecord
from lmlab.model.transformer import Transformer
from lmlab.rundir.plots import compare_figure
from lmlab.training.norms import NormProbe


@pytest.mark.parametrize("key_norm", [False, True])
def test_key_l2_is_the_mean_norm_of_each_heads_key_as_k_proj_makes_it(key_norm):
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=64, context_length=16, d_model=32, n_layers=2, n_heads=4, key_norm=key_norm)
    model = Transformer(config)
    x = torch.randint(0, 64, (3, 16))
    inputs = {}
    hooks = [block.self_attn.register_forward_pre_hook(
        lambda module, args, i=i: inputs.__setitem__(i, args[0].detach())) for i, block in enumerate(model.layers)]
    event = NormProbe(model, every=1).event(x)
    for h in hooks:
        h.remove()
    assert set(event["key_l2"]) == {"layers.0", "layers.1"}
    for i, block in enumerate(model.layers):
        keys = block.self_attn.k_proj(inputs[i]).view(3, 16, 4, 8)  # (batch, position, head, head_dim)
        assert event["key_l2"][f"layers.{i}"] == pytest.approx(keys.norm(dim=-1).mean().item(), rel=1e-5)
    # the activation records are unchanged by the key hooks
    assert {"embed_tokens", "layers.0", "layers.1.mlp", "norm"} <= set(event["act_rms"])


def _record(events):
    return RunRecord(path=Path("runs/a"), config={}, events=events)


def test_nested_norms_are_metrics_named_record_dot_layer():
    events = [{"step": 1, "loss": 5.0}, {"step": 100, "kind": "norms", "key_l2": {"layers.0": 3.5, "layers.1": 4.0}},
              {"step": 200, "kind": "norms", "key_l2": {"layers.0": 6.0, "layers.1": 7.5}}]
    record = _record(events)
    assert record.series("key_l2.layers.0") == [(100, 3.5), (200, 6.0)]
    assert record.series("key_l2.layers.1") == [(100, 4.0), (200, 7.5)]
    assert record.series("loss") == [(1, 5.0)]
    fig = compare_figure([record], metric="key_l2.layers.1")
    assert fig.axes[0].get_lines()[0].get_ydata().tolist() == [4.0, 7.5]


def test_an_unknown_metric_names_the_nested_ones_too():
    record = _record([{"step": 100, "kind": "norms", "key_l2": {"layers.0": 3.5}}, {"step": 1, "loss": 5.0}])
    with pytest.raises(LmlabError, match=r"key_l2\.layers\.0"):
        compare_figure([record], metric="key_norm")


def test_trials_of_two_sweeps_are_told_apart_by_the_sweeps_name(tmp_path):
    from lmlab.lab.table import read_runs

    for sweep in ("postnorm", "silu"):
        run = tmp_path / sweep / "runs" / "000-seed=1"
        run.mkdir(parents=True)
        (run / "config.toml").write_text("")
        (run / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n')
    labels = sorted(r.label for r in read_runs([tmp_path / "postnorm" / "runs", tmp_path / "silu" / "runs"]))
    assert labels == ["postnorm/000-seed=1", "silu/000-seed=1"]
