"""Muon (optim.name=muon): the Newton-Schulz step, one update by hand, the AdamW groups, and real training runs."""

import copy
import math
import subprocess

import pytest
import torch
from ckpt_support import quiet, same_weights, series
from test_resume_kill import CLI, TIMEOUT, kill_at

from lmlab import load_config, train
from lmlab.config import OptimConfig
from lmlab.errors import LmlabError
from lmlab.training.muon import NS_COEFFICIENTS, Muon, momentum_at, newton_schulz
from lmlab.training.optim import build_optimizer, muon_groups, set_lr

CPU = torch.device("cpu")


def reference_msign(matrix, steps=5):
    """The quintic applied to the singular values directly, in float64: U p^5(S / |G|_F) V^T."""
    a, b, c = 3.4445, -4.7750, 2.0315
    u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    s = s / (torch.linalg.matrix_norm(matrix.double()) + 1e-7)
    for _ in range(steps):
        s = a * s + b * s ** 3 + c * s ** 5
    return u @ torch.diag(s) @ vh


def test_the_published_quintic_coefficients():
    assert NS_COEFFICIENTS == (3.4445, -4.7750, 2.0315)


@pytest.mark.parametrize("shape", [(64, 32), (32, 64), (48, 48), (128, 344)])
def test_newton_schulz_orthogonalises_as_the_reference_does(shape):
    torch.manual_seed(0)
    g = torch.randn(shape)
    got = newton_schulz(g)
    torch.testing.assert_close(got.double(), reference_msign(g), atol=2e-5, rtol=1e-4)
    singular = torch.linalg.svdvals(got)
    assert singular.min() > 0.6 and singular.max() < 1.25  # the band the quintic aims at, not exactly 1
    assert got.shape == g.shape and got.dtype == torch.float32


class Tiny(torch.nn.Module):
    """Names as the transformer's: embed_tokens, layers.N..., norm, lm_head."""

    def __init__(self):
        super().__init__()
        self.embed_tokens = torch.nn.Embedding(11, 6)
        self.layers = torch.nn.ModuleList([torch.nn.Linear(6, 10)])  # weight 10x6 (Muon) and bias (scalar group)
        self.norm = torch.nn.LayerNorm(10)
        self.lm_head = torch.nn.Linear(10, 11, bias=False)

    def forward(self, ids):
        return self.lm_head(self.norm(self.layers[0](self.embed_tokens(ids))))


def loss_of(model, seed):
    ids = torch.randint(0, 11, (4, 5), generator=torch.Generator().manual_seed(seed))
    return model(ids).square().mean()


def test_groups_and_their_learning_rates():
    cfg = OptimConfig(name="muon", lr=0.02, embed_lr=0.3, head_lr=0.004, weight_decay=0.1)
    groups = {g["name"]: g for g in muon_groups(Tiny(), cfg)}
    assert set(groups) == {"muon", "embed", "head", "scalar"}
    assert [p.shape for p in groups["muon"]["params"]] == [torch.Size([10, 6])]
    assert len(groups["scalar"]["params"]) == 3 and groups["scalar"]["weight_decay"] == 0
    assert groups["scalar"]["lr"] == 0.02  # 0 = optim.lr
    assert groups["embed"]["lr_scale"] == pytest.approx(15) and groups["head"]["lr_scale"] == pytest.approx(0.2)
    optimizer = build_optimizer(Tiny(), cfg, CPU)
    set_lr(optimizer, 0.01)  # the schedule's value: every group follows it by its own scale
    assert {g["name"]: g["lr"] for g in optimizer.param_groups} == pytest.approx(
        {"muon": 0.01, "embed": 0.15, "head": 0.002, "scalar": 0.01})


def test_two_muon_steps_match_a_hand_computation():
    torch.manual_seed(1)
    model = Tiny()
    w0 = model.layers[0].weight.detach().clone()
    lr, wd, mu = 0.05, 0.1, 0.95
    optimizer = build_optimizer(model, OptimConfig(name="muon", lr=lr, weight_decay=wd, muon_momentum=mu), CPU)
    expected, buf = w0.double(), torch.zeros_like(w0, dtype=torch.float64)
    for seed in (0, 1):
        optimizer.zero_grad()
        loss_of(model, seed).backward()
        g = model.layers[0].weight.grad.double()
        buf = mu * buf + g
        nesterov = g + mu * buf
        expected = expected * (1 - lr * wd) - lr * 0.2 * math.sqrt(10) * reference_msign(nesterov)
        optimizer.step()
    torch.testing.assert_close(model.layers[0].weight.double(), expected, atol=1e-5, rtol=1e-5)


def test_the_adamw_groups_step_as_torch_adamw():
    torch.manual_seed(2)
    a, b = Tiny(), Tiny()
    b.load_state_dict(a.state_dict())
    cfg = OptimConfig(name="muon", lr=0.01, embed_lr=0.05, head_lr=0.002, weight_decay=0.1)
    ours = build_optimizer(a, cfg, CPU)
    reference = torch.optim.AdamW([{k: v for k, v in g.items() if k in ("params", "lr", "weight_decay")}
                                   for g in muon_groups(b, cfg) if g["kind"] == "adamw"],
                                  betas=(0.9, 0.95), eps=1e-8, foreach=False)
    for seed in range(6):
        for model, opt in ((a, ours), (b, reference)):
            opt.zero_grad()
            loss_of(model, seed).backward()
            opt.step()
        with torch.no_grad():  # the Muon matrix is tested above; here it only has to be the same in both
            b.layers[0].weight.copy_(a.layers[0].weight)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        if name != "layers.0.weight":
            torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-6)


def test_momentum_warmup():
    assert momentum_at(1, 0.95, 0) == 0.95
    assert momentum_at(50, 0.95, 100) == pytest.approx(0.90)
    assert momentum_at(100, 0.95, 100) == momentum_at(500, 0.95, 100) == 0.95


def test_optimizer_state_round_trips():
    torch.manual_seed(3)
    a = Tiny()
    cfg = OptimConfig(name="muon", lr=0.02, muon_momentum_warmup_steps=10)
    opt = build_optimizer(a, cfg, CPU)
    for seed in range(3):
        opt.zero_grad()
        loss_of(a, seed).backward()
        opt.step()
    b = Tiny()
    b.load_state_dict(a.state_dict())
    opt_b = build_optimizer(b, cfg, CPU)
    opt_b.load_state_dict(copy.deepcopy(opt.state_dict()))  # torch shares tensors on load otherwise
    for model, o in ((a, opt), (b, opt_b)):
        o.zero_grad()
        loss_of(model, 9).backward()
        o.step()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


ARCHITECTURES = [
    [],
    ["model.norm=layernorm", "model.position=learned", "model.ffn=gelu", "model.tie_embeddings=true",
     "model.bias=true"],
    ["model.norm=none", "model.position=nope", "model.ffn=silu"],
    ["model.norm_position=post", "model.qk_norm=true"],
    ["model.key_norm=true", "model.n_kv_heads=2"],
]


@pytest.mark.parametrize("switches", ARCHITECTURES, ids=lambda s: ",".join(k.split(".")[1] for k in s) or "default")
def test_muon_trains_every_switchable_architecture(tiny_overrides, switches):
    run = train(load_config(None, tiny_overrides + ["optim.name=muon", "optim.lr=1e-2", "train.max_steps=20", "train.eval_every=10",
                                                    *switches]), log=quiet)
    losses = [loss for _, loss in series(run)]
    assert len(losses) == 20 and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0] - 0.2  # it learns, not just runs (no-norm models start slowest)


def test_muon_resumes_bitwise_after_a_kill(tiny_overrides):
    """SIGKILL mid-run, resume from the last checkpoint: the same losses and weights as the run never killed."""
    ov = tiny_overrides + ["optim.name=muon", "optim.muon_momentum_warmup_steps=10", "train.grad_accum=2",
                           "train.threads=1", "train.checkpoint_every=5", "train.checkpoint_minutes=0",
                           "train.max_steps=40", "train.sample_tokens=4"]
    reference = train(load_config(None, ov + ["train.run_name=whole"]), log=quiet)
    run_dir = reference.parent / "killed"
    process = subprocess.Popen(CLI + ov + ["train.run_name=killed"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    kill_at(process, run_dir, 17, "muon")
    process = subprocess.Popen(CLI + ["--resume", str(run_dir)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert process.wait(TIMEOUT) == 0, process.stderr.read().decode()[-2000:]
    assert [s for s, _ in series(run_dir)] == list(range(1, 41))
    assert series(run_dir) == series(reference)
    assert series(run_dir, "val_loss") == series(reference, "val_loss")
    assert same_weights(run_dir, reference)


@pytest.mark.parametrize("overrides, message", [
    (["optim.name=muonn"], "did you mean 'muon'"),
    (["optim.name=muon", "optim.fused=true"], "optim.name=muon runs its own update"),
    (["optim.embed_lr=0.1"], "applies to optim.name=muon only"),
    (["optim.name=muon", "optim.muon_momentum=1"], "muon_momentum must lie in [0, 1)"),
])
def test_bad_muon_settings_get_one_line(tiny_overrides, overrides, message):
    with pytest.raises(LmlabError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        train(load_config(None, tiny_overrides + overrides), log=quiet)


def test_muon_group_without_matrices_is_refused():
    with pytest.raises(LmlabError, match="no 2-D weights inside the blocks"):
        build_optimizer(torch.nn.Embedding(4, 4), OptimConfig(name="muon"), CPU)


def test_muon_class_defaults_to_adamw_groups():
    p = torch.nn.Parameter(torch.ones(3))
    opt = Muon([{"params": [p]}], lr=0.1)
    assert opt.param_groups[0]["kind"] == "adamw"


def test_relu2_ffn_and_zero_initialised_projections():
    from lmlab.config import ModelConfig
    from lmlab.model.transformer import Transformer

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=50, d_model=32, n_heads=4, n_layers=2, ffn="relu2",
                                    zero_init_proj=True))
    mlp = model.layers[0].mlp
    assert mlp.up_proj.weight.shape == (128, 32)  # d_ff 0 = 4 d_model, as for the other two-matrix MLPs
    x = torch.randn(3, 32)
    with torch.no_grad():
        torch.testing.assert_close(mlp(x), mlp.down_proj(torch.relu(mlp.up_proj(x)) ** 2))
    for block in model.layers:
        assert not block.self_attn.o_proj.weight.any() and not block.mlp.down_proj.weight.any()
    ids = torch.randint(0, 50, (2, 7))
    with torch.no_grad():  # zero-initialised blocks are the identity: logits = head(norm(embedding))
        torch.testing.assert_close(model(ids), model.lm_head(model.norm(model.embed_tokens(ids))))


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_with_muon_train_what_one_process_with_accumulation_2_trains(small_corpus, data_cache, tmp_path,
                                                                                   mode):
    """DDP: every rank orthogonalises the same all-reduced matrix; FSDP: the shards are gathered, then split again."""
    from evals_support import tiny_overrides
    from test_distributed import assert_same_run, finish, overrides, torchrun

    base = overrides(tiny_overrides(small_corpus, data_cache, tmp_path / "runs"), "optim.name=muon",
                     "optim.muon_momentum_warmup_steps=8")
    single = train(load_config(None, base + ["train.run_name=single"]), log=quiet)
    finish(torchrun(["-m", "lmlab", "train", *base, f"train.parallel={mode}", f"train.run_name={mode}"]))
    assert_same_run(tmp_path / "runs" / mode, single, tol=1e-5)
