"""benchmarks/gpu_speedrun.py: every part that runs without a GPU (the config, the dry run, the result file)."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from lmlab import load_config
from lmlab.errors import LmlabError

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_speedrun.py"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("gpu_speedrun", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_real_run_is_tinystories_17m_with_the_fast_settings(script, tmp_path):
    config = load_config("tinystories-17m", script.overrides_for(False, str(tmp_path), 1.45))
    m, o, t = config.model, config.optim, config.train
    assert (m.d_model, m.n_layers, m.n_heads, m.vocab_size, m.context_length) == (512, 4, 16, 10000, 256)
    assert o.name == "muon" and o.schedule == "wsd" and t.target_val_loss == 1.45
    assert t.precision == "bf16" and t.compile and t.device == "cuda" and t.attention in ("flash_attn", "sdpa")
    assert t.max_tokens == 327_680_000  # the handout's budget stays the cap
    assert config.data.train_files == [str(tmp_path / "TinyStoriesV2-GPT4-train.txt")]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without a GPU")
def test_without_a_gpu_the_real_run_is_one_line(script, capsys):
    assert script.main(["--data-dir", "nowhere"]) == 2
    assert capsys.readouterr().err.strip() == (
        "gpu_speedrun: error: no CUDA GPU here: run with --dry-run to test the script on the CPU")


def test_missing_data_is_one_line(script, tmp_path):
    config = load_config("tinystories-17m", script.overrides_for(False, str(tmp_path), 1.45))
    with pytest.raises(LmlabError, match="TinyStoriesV2-GPT4-train.txt does not exist"):
        script.check_machine(config, dry_run=True)


def test_the_dry_run_trains_stops_at_the_target_and_records_the_result(script, tiny_overrides, tmp_path, capsys):
    data = [o for o in tiny_overrides if o.startswith("data.")]
    assert script.main(["--dry-run", "--runs-dir", str(tmp_path), "--target", "5.8", *data]) == 0
    result = json.loads((tmp_path / "gpu-speedrun" / "result.json").read_text())
    assert result["reached"] and result["status"] == "target_reached" and result["final_val_loss"] <= 5.8
    assert result["train_seconds"] > 0 and result["wall_seconds"] >= result["train_seconds"]
    assert result["tokens"] == result["step"] * 8 * 64 and 0 < result["mfu"] < 1 and result["peak_mem_mb"] > 0
    out = capsys.readouterr().out
    assert script.HEADER.splitlines()[0] in out and "| yes |" in out
    config = (tmp_path / "gpu-speedrun" / "config.toml").read_text()
    assert 'name = "muon"' in config and "d_model = 64" in config
