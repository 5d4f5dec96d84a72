"""Helpers shared by the evaluation tests: a tiny trained run and mock models with known behaviour."""

import torch
import torch.nn as nn

from lmlab import load_config, train


def tiny_overrides(small_corpus, data_cache, runs_dir):
    """KEY=VALUE overrides of the tiny 30-step run on the small corpus, shared by every test that trains one."""
    train_file, valid_file = small_corpus
    return [
        "data.corpus=", f"data.train_files={train_file}", f"data.val_files={valid_file}",
        "data.tokenizer_vocab_size=512", f"data.cache_dir={data_cache}",
        "model.context_length=64", "model.d_model=64", "model.n_layers=2", "model.n_heads=4",
        "train.batch_size=8", "train.max_steps=30", "train.eval_every=10", "train.eval_batches=2",
        "train.log_every=1", "train.sample_tokens=16", "optim.warmup_steps=5", "optim.lr=3e-3",
        f"train.runs_dir={runs_dir}", "train.device=cpu",
    ]


def train_tiny(small_corpus, data_cache, runs_dir, extra=()):
    config = load_config(None, tiny_overrides(small_corpus, data_cache, runs_dir) + list(extra))
    return train(config, log=lambda *_: None)


class _Config:
    def __init__(self, vocab_size, context_length):
        self.vocab_size, self.context_length = vocab_size, context_length


class InductionModel(nn.Module):
    """A perfect induction head: predicts the token that followed the latest earlier occurrence of the current one.

    It copies whatever it has seen in its window and nothing else, so a copy probe must
    give it (nearly) full marks while the sequence fits the window, and a reverse probe none.
    """

    def __init__(self, vocab_size, context_length):
        super().__init__()
        self.config = _Config(vocab_size, context_length)
        self.dummy = nn.Parameter(torch.zeros(()))  # for the device

    def forward(self, x):
        B, T = x.shape
        assert T <= self.config.context_length
        same = (x[:, :, None] == x[:, None, :]) & torch.ones(T, T, dtype=torch.bool).tril(-1)
        last = (same * torch.arange(1, T + 1)).argmax(-1)  # latest earlier j with x[j] == x[i] (0 if none)
        found = same.any(-1)
        nxt = x.gather(1, (last + 1).clamp(max=T - 1))
        logits = torch.zeros(B, T, self.config.vocab_size)
        logits.scatter_(2, nxt.unsqueeze(-1), torch.where(found, 10.0, 0.0).unsqueeze(-1))
        return logits


class BigramModel(nn.Module):
    """Logits from the current token alone: by construction it uses no history."""

    def __init__(self, vocab_size, context_length, seed=0):
        super().__init__()
        self.config = _Config(vocab_size, context_length)
        self.table = nn.Parameter(torch.randn(vocab_size, vocab_size, generator=torch.Generator().manual_seed(seed)))

    def forward(self, x):
        return self.table[x]
