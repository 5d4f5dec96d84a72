"""Config: presets load, overrides apply and are type-checked, mistakes name the closest key."""

import tomllib

import pytest

from lmlab.config import Config, all_keys, describe_keys, from_dict, load_config, resolve_d_ff, to_toml, total_steps
from lmlab.errors import LmlabError

PRESETS = ["cpu-quickstart", "zh-quickstart", "tinystories-17m"]


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_loads_and_round_trips_through_toml(name):
    config = load_config(name)
    again = from_dict(tomllib.loads(to_toml(config)))
    assert again == config


def test_no_arguments_means_the_cpu_quickstart():
    assert load_config().name == "cpu-quickstart"


def test_overrides_convert_types():
    config = load_config("cpu-quickstart", ["optim.lr=3e-3", "train.max_steps=5000", "train.compile=true",
                                            "model.rope_theta=500000", "train.sample_prompts=Once,Lily"])
    assert config.optim.lr == 3e-3
    assert config.train.max_steps == 5000 and isinstance(config.train.max_steps, int)
    assert config.train.compile is True
    assert config.model.rope_theta == 500000.0
    assert config.train.sample_prompts == ["Once", "Lily"]


def test_the_17m_preset_is_the_cs336_reference_setup():
    c = load_config("tinystories-17m")
    m = c.model
    assert (m.vocab_size, m.context_length, m.d_model, m.n_layers, m.n_heads, m.d_ff, m.rope_theta) == (
        10000, 256, 512, 4, 16, 1344, 10000.0)
    assert c.data.tokenizer_vocab_size == 10000
    assert total_steps(c) * c.train.batch_size * c.train.grad_accum * m.context_length == 327_680_000


def test_unknown_key_names_the_closest_valid_key():
    with pytest.raises(LmlabError, match="did you mean 'optim.lr'"):
        load_config(None, ["optim.learning_rate=1"])
    with pytest.raises(LmlabError, match="did you mean 'train.max_steps'"):
        load_config(None, ["train.max_step=10"])
    with pytest.raises(LmlabError, match="did you mean 'model'"):
        from_dict({"modle": {"d_model": 4}})


def test_unknown_key_in_a_toml_file_names_the_file(tmp_path):
    path = tmp_path / "x.toml"
    path.write_text("[optim]\nlrr = 0.1\n")
    with pytest.raises(LmlabError, match=r"x\.toml.*'optim\.lrr'.*did you mean 'optim\.lr'"):
        load_config(path)


@pytest.mark.parametrize("override, message", [
    ("train.max_steps=ten", "wants an integer"),
    ("train.max_steps=1.5", "wants an integer"),
    ("optim.lr=fast", "wants a number"),
    ("train.compile=maybe", "wants true or false"),
    ("optim.lr", "not KEY=VALUE"),
    ("train.precision=fp8", "choose one of"),
    ("model.n_heads=3", "divisible"),
])
def test_wrong_values_are_errors(override, message):
    with pytest.raises(LmlabError, match=message):
        load_config(None, [override])


def test_wrong_type_in_toml_is_an_error(tmp_path):
    path = tmp_path / "x.toml"
    path.write_text('[train]\nmax_steps = "many"\n')
    with pytest.raises(LmlabError, match="train.max_steps"):
        load_config(path)


def test_missing_or_directory_config_is_an_error(tmp_path):
    with pytest.raises(LmlabError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    with pytest.raises(LmlabError, match="no config file or preset"):
        load_config("cpu-quickstrat")
    (tmp_path / "d.toml").mkdir()
    with pytest.raises(LmlabError, match="directory"):
        load_config(tmp_path / "d.toml")


def test_d_ff_defaults_to_eight_thirds_rounded_to_64():
    config = Config()
    config.model.d_model = 512
    assert resolve_d_ff(config.model) == 1408  # 8/3*512 = 1365.3 -> 1408
    config.model.d_ff = 1344
    assert resolve_d_ff(config.model) == 1344


@pytest.mark.parametrize("ffn", ["silu", "gelu"])
def test_d_ff_defaults_to_four_d_model_for_two_matrix_mlps(ffn):
    config = Config()
    config.model.d_model, config.model.ffn = 512, ffn
    assert resolve_d_ff(config.model) == 2048
    config.model.d_ff = 1000
    assert resolve_d_ff(config.model) == 1000


@pytest.mark.parametrize("override, message", [
    ("model.norm=batchnorm", "model.norm.*choose one of rmsnorm, layernorm, none"),
    ("model.norm_position=middle", "choose one of pre, post"),
    ("model.position=alibi", "choose one of rope, nope, learned"),
    ("model.ffn=relu", "choose one of swiglu, silu, gelu"),
    ("model.key_norm_scale=-1", "key_norm_scale must be >= 0"),
    ("model.dropout=1.5", "dropout must lie in"),
])
def test_wrong_switch_values_are_errors(override, message):
    with pytest.raises(LmlabError, match=message):
        load_config(None, [override])


def test_head_dim_frees_d_model_from_dividing_by_n_heads_and_rope_needs_it_even():
    config = load_config(None, ["model.d_model=100", "model.n_heads=3", "model.head_dim=32"])
    assert config.model.head_dim == 32
    with pytest.raises(LmlabError, match="must be even for RoPE"):
        load_config(None, ["model.head_dim=31"])
    assert load_config(None, ["model.head_dim=31", "model.position=nope"]).model.head_dim == 31


def test_max_tokens_converts_to_steps():
    config = load_config(None, ["train.max_tokens=1000000", "train.batch_size=8", "train.grad_accum=2",
                                "model.context_length=128"])
    assert total_steps(config) == -(-1_000_000 // (8 * 2 * 128))


def test_every_key_is_documented():
    text = describe_keys()
    for key in all_keys():
        if key != "name":
            assert f"{key} = " in text
    assert text.count("\n      ") == len(all_keys()) - 1
