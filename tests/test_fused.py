"""Run-time packing of q/k/v and gate/up (lmlab.model.fused): same numbers, same files, exact resume."""

import copy
import io

import pytest
import torch

from lmlab.config import ModelConfig, load_config, validate
from lmlab.errors import LmlabError
from lmlab.model import weights
from lmlab.model.fused import (
    PackedLinear,
    fuse_projections,
    is_fused,
    packed_optimizer_state,
    unfuse_projections,
    unpacked_optimizer_state,
)
from lmlab.model.hf import hf_state_dict
from lmlab.model.transformer import Transformer
from lmlab.training.norms import NormProbe

BASE = dict(vocab_size=97, context_length=16, d_model=32, n_layers=2, n_heads=4, init_std=0.1)
CASES = {
    "llama": {},
    "gqa-bias": dict(n_kv_heads=2, bias=True),
    "mqa-headdim": dict(n_kv_heads=1, head_dim=12),
    "qk-norm-gqa": dict(qk_norm=True, n_kv_heads=2),
    "key-norm-learned": dict(key_norm=True),
    "gpt2": dict(norm="layernorm", position="learned", ffn="gelu", tie_embeddings=True, bias=True),
    "memory": dict(memory=8),
}


def pair(case, seed=0):
    """(unfused, fused) models holding the same weights (1-D ones moved off their init so a swap would show)."""
    torch.manual_seed(seed)
    plain = Transformer(ModelConfig(**{**BASE, **CASES[case]}))
    with torch.no_grad():
        for p in plain.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return plain, fuse_projections(copy.deepcopy(plain))


def grads_by_hf_name(model):
    """{Hugging Face name: gradient}: a packed gradient is split into its parts, as state_dict splits weights."""
    out = {}
    for module_name, module in model.named_modules():
        for tensor_name, p in module.named_parameters(recurse=False):
            owner = module_name.rsplit(".", 1)[0]
            if isinstance(module, PackedLinear):
                for part, g in zip(module.parts, p.grad.split(module.sizes)):
                    out[f"{owner}.{part}.{tensor_name}"] = g
            else:
                out[f"{module_name}.{tensor_name}"] = p.grad
    return out


def loss_of(model, ids, case):
    memory = model.new_memory(ids.shape[0]) if CASES[case].get("memory") else None
    kwargs = {"memory": memory} if memory is not None else {}
    return model(ids[:, :-1], targets=ids[:, 1:], **kwargs)


@pytest.mark.parametrize("case", CASES)
def test_a_fused_model_gives_the_loss_and_gradients_of_the_unfused_one(case):
    plain, fused = pair(case)
    assert is_fused(fused) and not is_fused(plain)
    assert fused.num_params() == plain.num_params() and fused.flops_per_token() == plain.flops_per_token()
    ids = torch.randint(0, BASE["vocab_size"], (3, BASE["context_length"] + 1), generator=torch.Generator().manual_seed(1))
    losses = [loss_of(m, ids, case) for m in (plain, fused)]
    for loss in losses:
        loss.backward()
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=1e-6)
    ours, theirs = grads_by_hf_name(fused), grads_by_hf_name(plain)
    assert ours.keys() == theirs.keys()
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-6, atol=1e-6, msg=name)
    with torch.no_grad():  # generation's path: logits with a KV cache
        cache_a, cache_b = plain.new_kv_cache(2), fused.new_kv_cache(2)
        torch.testing.assert_close(fused(ids[:2, :5], kv_cache=cache_b), plain(ids[:2, :5], kv_cache=cache_a),
                                   rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("case", ["gqa-bias", "qk-norm-gqa", "gpt2"])
def test_saved_weights_keep_hugging_face_names_and_round_trip_bitwise(case, tmp_path):
    plain, fused = pair(case)
    a, b = plain.state_dict(), fused.state_dict()
    assert list(b) == list(a)  # names and order
    assert all(torch.equal(a[k], b[k]) for k in a)
    hf_a, hf_b = hf_state_dict(plain) if case != "gpt2" else a, hf_state_dict(fused) if case != "gpt2" else b
    assert all(torch.equal(hf_a[k], hf_b[k]) for k in hf_a)  # export: the same tensors, so parity is unchanged
    weights.save_file(plain, tmp_path / "plain.safetensors")
    weights.save_file(fused, tmp_path / "fused.safetensors")
    assert (tmp_path / "plain.safetensors").read_bytes() == (tmp_path / "fused.safetensors").read_bytes()

    other_plain, other_fused = pair(case, seed=1)  # different weights, loaded both ways
    weights.load_file(other_fused, tmp_path / "plain.safetensors")
    weights.load_file(other_plain, tmp_path / "fused.safetensors")
    for k, v in other_fused.state_dict().items():
        assert torch.equal(v, a[k]) and torch.equal(other_plain.state_dict()[k], a[k])
    buffer = io.BytesIO()
    torch.save(fused.state_dict(), buffer)  # torch's own format as well
    assert torch.load(io.BytesIO(buffer.getvalue())).keys() == a.keys()


def test_unfuse_gives_back_the_separate_modules_with_the_same_bits():
    plain, fused = pair("gqa-bias")
    unfuse_projections(fused)
    assert not is_fused(fused)
    assert [n for n, _ in fused.named_parameters()] == [n for n, _ in plain.named_parameters()]
    assert all(torch.equal(p, q) for p, q in zip(fused.parameters(), plain.parameters()))
    fuse_projections(fused)
    fuse_projections(fused)  # twice is once
    assert sum(isinstance(m, PackedLinear) for m in fused.modules()) == 2 * BASE["n_layers"]


def adamw_steps(model, ids, n, optimizer=None):
    optimizer = optimizer or torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(n):
        model(ids[:, :-1], targets=ids[:, 1:]).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return optimizer


def test_optimizer_state_is_saved_unpacked_and_resume_is_exact_either_way():
    plain, fused = pair("gqa-bias")
    ids = torch.randint(0, BASE["vocab_size"], (2, 17), generator=torch.Generator().manual_seed(2))
    reference = copy.deepcopy(fused)
    adamw_steps(reference, ids, 4)  # uninterrupted, packed

    opt = adamw_steps(fused, ids, 2)
    saved = unpacked_optimizer_state(fused, opt, opt.state_dict())
    plain_opt = adamw_steps(plain, ids, 2)
    expected = plain_opt.state_dict()  # the unfused run's optimizer has this layout
    assert [g["params"] for g in saved["param_groups"]] == [g["params"] for g in expected["param_groups"]]
    for i, entry in expected["state"].items():
        for key, value in entry.items():
            torch.testing.assert_close(saved["state"][i][key], value, rtol=1e-5, atol=1e-7)
    packed = packed_optimizer_state(fused, opt, saved)
    for i, entry in opt.state_dict()["state"].items():
        assert all(torch.equal(packed["state"][i][k], v) for k, v in entry.items())

    # resume into a fresh packed model: bit for bit the uninterrupted run
    weights_file = {k: v.clone() for k, v in fused.state_dict().items()}
    resumed, _ = pair("gqa-bias", seed=3)
    fuse_projections(resumed)
    resumed.load_state_dict(weights_file)
    new_opt = torch.optim.AdamW(resumed.parameters(), lr=1e-2, weight_decay=0.1)
    new_opt.load_state_dict(packed_optimizer_state(resumed, new_opt, saved))
    adamw_steps(resumed, ids, 2, new_opt)
    assert all(torch.equal(p, q) for p, q in zip(resumed.parameters(), reference.parameters()))

    # and into an unfused model, from the same checkpoint
    unfused = Transformer(plain.config)
    unfused.load_state_dict(weights_file)
    unfused_opt = torch.optim.AdamW(unfused.parameters(), lr=1e-2, weight_decay=0.1)
    unfused_opt.load_state_dict(packed_optimizer_state(unfused, unfused_opt, saved))
    loaded = unfused_opt.state_dict()["state"]  # exactly what was saved (AdamW's later steps amplify any rounding)
    assert all(torch.equal(loaded[i][k], v) for i, entry in saved["state"].items() for k, v in entry.items())


def test_the_norm_probe_still_sees_the_keys():
    plain, fused = pair("gqa-bias")
    ids = torch.randint(0, BASE["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(4))
    _, keys_a = NormProbe(plain, 1).activations(ids)
    _, keys_b = NormProbe(fused, 1).activations(ids)
    assert keys_a.keys() == keys_b.keys() and len(keys_a) == BASE["n_layers"]
    for k in keys_a:
        assert keys_b[k] == pytest.approx(keys_a[k], rel=1e-5)


@pytest.mark.parametrize("extra, message", [
    (["optim.name=muon"], "needs optim.name=adamw"),
    (["optim.name=adamw8bit"], "needs optim.name=adamw"),
    (["train.parallel=fsdp"], "train.parallel=fsdp"),
])
def test_fusion_is_refused_where_it_would_change_the_step(extra, message):
    with pytest.raises(LmlabError, match=message):
        validate(load_config(None, ["train.fuse_projections=true", *extra]))
    validate(load_config(None, ["train.fuse_projections=auto", *extra]))  # auto stays off there


# --- in `lmlab train`: checkpoints and exact resume -------------------------------------


def test_a_packed_run_resumes_bit_for_bit_and_its_files_keep_the_separate_names(tiny_overrides, tmp_path):
    import shutil

    from ckpt_support import quiet, same_weights, series
    from safetensors.torch import load_file

    from lmlab import train
    from lmlab.training import checkpoint

    base = tiny_overrides + ["train.threads=1", "train.checkpoint_minutes=0", "train.checkpoint_every=10",
                             "train.keep_checkpoints=5", "model.bias=true", "model.n_kv_heads=2"]
    packed = base + ["train.fuse_projections=true"]
    full = train(load_config(None, packed + ["train.run_name=packed"]), log=quiet)
    names = set(load_file(str(full / "model.safetensors")))
    assert "layers.0.self_attn.k_proj.bias" in names and "layers.0.mlp.gate_proj.weight" in names
    assert not any("qkv_proj" in n or "gate_up_proj" in n for n in names)

    for run_name, overrides in (("part-packed", packed), ("part-plain", base)):  # resumed packed, and unpacked
        part = tmp_path / "runs" / run_name
        shutil.copytree(full, part)
        for step, path in checkpoint.list_checkpoints(part):
            if step > 10:
                shutil.rmtree(path)
        train(load_config(None, overrides + [f"train.resume={part}"]), log=quiet)
        assert len(series(part)) == len(series(full))
        if overrides is packed:
            assert series(part) == series(full) and same_weights(part, full)

    plain = train(load_config(None, base + ["train.run_name=plain"]), log=quiet)  # an unpacked run's checkpoint ...
    part = tmp_path / "runs" / "plain-then-packed"
    shutil.copytree(plain, part)
    for step, path in checkpoint.list_checkpoints(part):
        if step > 10:
            shutil.rmtree(path)
    train(load_config(None, packed + [f"train.resume={part}"]), log=quiet)  # ... resumes packed
    assert [s for s, _ in series(part)] == [s for s, _ in series(plain)]
