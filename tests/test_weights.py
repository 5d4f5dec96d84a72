"""One place for each rule: weights in and out (the tied head), derived model values, switch values."""

import typing

import pytest
import torch
import torch.nn as nn

from lmlab.config import Config, ModelConfig, choice_fields, load_config, resolve_d_ff, validate
from lmlab.errors import LmlabError
from lmlab.model import weights
from lmlab.model.transformer import Transformer


class TiedLM(nn.Module):
    """A module with no `.config`: the tie is seen in the module itself."""

    def __init__(self, tied=True):
        super().__init__()
        self.embed_tokens = nn.Embedding(11, 4)
        self.proj = nn.Linear(4, 4)
        self.lm_head = nn.Linear(4, 11, bias=False)
        if tied:
            self.lm_head.weight = self.embed_tokens.weight


@pytest.mark.parametrize("tied", [True, False])
def test_weights_round_trip_through_a_file_for_a_module_without_config(tmp_path, tied):
    torch.manual_seed(0)
    source, target = TiedLM(tied), TiedLM(tied)
    weights.save_file(source, tmp_path / "w.safetensors")
    from safetensors.torch import load_file

    assert ("lm_head.weight" in load_file(str(tmp_path / "w.safetensors"))) is not tied  # a tied matrix once
    weights.load_file(target, tmp_path / "w.safetensors")
    for name, tensor in source.state_dict().items():
        assert torch.equal(tensor, target.state_dict()[name]), name
    assert (target.lm_head.weight is target.embed_tokens.weight) is tied


def test_a_file_that_stores_the_tied_head_anyway_loads_as_the_embedding():
    model = TiedLM(tied=True)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["lm_head.weight"] = torch.zeros_like(state["lm_head.weight"])  # HF folders sometimes keep a copy
    loaded = weights.to_load(model, state)
    assert torch.equal(loaded["lm_head.weight"], state["embed_tokens.weight"])


def test_a_state_that_does_not_fit_names_what_is_missing_unexpected_and_misshapen():
    model = TiedLM(tied=False)
    state = dict(model.state_dict())
    del state["proj.bias"]
    state["extra.weight"] = torch.zeros(1)
    state["proj.weight"] = torch.zeros(3, 3)
    with pytest.raises(weights.WeightsMismatch) as caught:
        weights.load(model, state)
    message = str(caught.value)
    assert "missing: proj.bias" in message and "unexpected: extra.weight" in message
    assert "wrong shape: proj.weight" in message


def test_the_transformer_saves_a_tied_head_once_and_loads_it_back(tmp_path):
    config = ModelConfig(vocab_size=64, context_length=16, d_model=32, n_layers=1, n_heads=4, tie_embeddings=True)
    torch.manual_seed(0)
    source, target = Transformer(config), Transformer(config)
    assert "lm_head.weight" not in weights.to_save(source)
    weights.save_file(source, tmp_path / "m.safetensors")
    weights.load_file(target, tmp_path / "m.safetensors")
    x = torch.randint(0, 64, (2, 16))
    assert torch.equal(source(x), target(x))


def test_resolved_fills_every_derived_value_once_and_leaves_the_config_alone():
    config = ModelConfig(d_model=512, n_heads=8)
    resolved = config.resolved(vocab_size=300)
    assert (resolved.vocab_size, resolved.d_ff, resolved.n_kv_heads, resolved.head_dim) == (300, 1408, 8, 64)
    assert (config.vocab_size, config.d_ff, config.n_kv_heads, config.head_dim) == (0, 0, 0, 0)  # a copy
    assert resolved.resolved(vocab_size=999) == resolved  # idempotent: set values stay
    assert resolved.d_ff == resolve_d_ff(config)
    gelu = ModelConfig(d_model=64, n_heads=4, n_kv_heads=2, head_dim=8, ffn="gelu").resolved()
    assert (gelu.d_ff, gelu.n_kv_heads, gelu.head_dim) == (256, 2, 8)


def test_the_model_built_from_an_unresolved_config_matches_the_resolved_one():
    config = ModelConfig(vocab_size=64, context_length=16, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2)
    torch.manual_seed(0)
    a = Transformer(config)
    torch.manual_seed(0)
    b = Transformer(config.resolved())
    x = torch.randint(0, 64, (1, 16))
    assert torch.equal(a(x), b(x))
    assert a.config is config  # the model keeps what it was given


def test_every_switch_is_a_literal_whose_values_validate_checks():
    switches = {key: allowed for key, _, allowed in choice_fields(Config())}
    assert switches["model.norm"] == ("rmsnorm", "layernorm", "none")
    assert switches["optim.name"] == ("adamw", "adamw8bit", "muon")
    assert switches["model.ffn"] == ("swiglu", "silu", "gelu", "relu2")
    assert {"model.position", "model.ffn", "data.packing", "optim.schedule", "train.precision"} <= set(switches)
    for key, value, allowed in choice_fields(load_config()):
        assert value in allowed  # the quick start's own choices
    for key, allowed in switches.items():
        section, name = key.split(".")
        config = Config()
        setattr(getattr(config, section), name, "nonsense")
        with pytest.raises(LmlabError, match=f"config key '{key}' is 'nonsense'; choose one of"):
            validate(config)


def test_switch_fields_are_typed_with_their_choices():
    hints = typing.get_type_hints(ModelConfig)
    assert typing.get_origin(hints["norm"]) is typing.Literal
    assert typing.get_args(hints["ffn"]) == ("swiglu", "silu", "gelu", "relu2")
