"""model.memory: Transformer-XL memory across segments, exact against a plain model on the joined text."""

import dataclasses

import pytest
import torch

from lmlab.config import ModelConfig
from lmlab.model.transformer import Transformer

T = 16


def pair(memory=T, **switches):
    """(model with memory over T-token segments, the same weights as a plain model of context 2T)."""
    shape = {"vocab_size": 97, "context_length": T, "d_model": 32, "n_layers": 2, "n_heads": 4, **switches}
    config = ModelConfig(memory=memory, **shape)
    torch.manual_seed(0)
    model = Transformer(config).eval()
    plain = Transformer(dataclasses.replace(config, context_length=2 * T, memory=0)).eval()
    plain.load_state_dict(model.state_dict())
    return model, plain


@pytest.mark.parametrize("switches", [{}, {"n_kv_heads": 2, "qk_norm": True}, {"position": "nope"}])
def test_second_segment_sees_the_first_as_a_plain_model_would(switches):
    """With M = T, segment 2's logits equal a plain model's on segments 1+2 joined (RoPE positions continue)."""
    model, plain = pair(**switches)
    ids = torch.randint(0, 97, (3, 2 * T))
    memory = model.new_memory(3)
    with torch.no_grad():
        first = model(ids[:, :T], memory=memory)
        second = model(ids[:, T:], memory=memory)
        whole = plain(ids)
    torch.testing.assert_close(first, whole[:, :T], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(second, whole[:, T:], atol=1e-5, rtol=1e-5)


def test_a_shorter_memory_sees_only_the_last_m_tokens():
    """M < T: the first query of segment 2 sees exactly the M tokens before it, as a plain model given just those.

    One layer, so that a key depends on its own token only, not on the context it was computed in.
    """
    M = 5
    model, plain = pair(memory=M, n_layers=1)
    ids = torch.randint(0, 97, (2, 2 * T))
    memory = model.new_memory(2)
    with torch.no_grad():
        model(ids[:, :T], memory=memory)
        got = model(ids[:, T:], memory=memory)
        want = plain(ids[:, T - M:T + 1])[:, -1]
    torch.testing.assert_close(got[:, 0], want, atol=1e-5, rtol=1e-5)


def test_a_row_that_starts_a_document_forgets_and_the_memory_is_detached():
    model, _ = pair()
    ids = torch.randint(0, 97, (2, 2 * T))
    memory = model.new_memory(2)
    model.train()
    model(ids[:, :T], memory=memory)
    assert not memory.k.requires_grad and memory.filled.tolist() == [T, T]
    memory.reset(torch.tensor([True, False]))
    with torch.no_grad():
        model.eval()
        carried = model(ids[:, T:], memory=memory)
        fresh = model(ids[:, T:])
    torch.testing.assert_close(carried[0], fresh[0], atol=1e-5, rtol=1e-5)  # row 0 starts over
    assert not torch.allclose(carried[1], fresh[1], atol=1e-3)  # row 1 remembers


def test_memory_state_round_trips_exactly():
    model, _ = pair(memory=7)
    memory = model.new_memory(2)
    with torch.no_grad():
        model(torch.randint(0, 97, (2, T)), memory=memory)
    memory.reset(torch.tensor([False, True]))
    other = model.new_memory(2)
    other.load_state_dict(memory.state_dict())
    assert torch.equal(other.k, memory.k) and torch.equal(other.v, memory.v) and torch.equal(other.filled, memory.filled)


def test_memory_zero_is_todays_model():
    config = ModelConfig(vocab_size=97, context_length=T, d_model=32, n_layers=2, n_heads=4)
    torch.manual_seed(0)
    model = Transformer(config)
    assert model.new_memory(2) is None and model.rope_cos.shape[0] == T and "memory" not in model.summary()


def test_saved_memories_are_dealt_to_ranks_by_global_micro_batch():
    """Written by 2 ranks x 1 micro-batch, read by 1 process x 2 (and back): each micro-batch gets its own rows' memory."""
    from lmlab.training.memories import Memories

    class Ranks:
        def __init__(self, rank, world_size):
            self.rank, self.world_size = rank, world_size

        def gather(self, obj):
            return [obj]

    model, _ = pair(memory=4)
    writers = [Memories(model, 2, 1, Ranks(r, 2)) for r in (0, 1)]
    for i, w in enumerate(writers):
        w.slots[0].k.fill_(i + 1)
    state = {"ranks": [w.state_dict()["ranks"][0] for w in writers]}
    single = Memories(model, 2, 2, Ranks(0, 1))
    single.load_state_dict(state)
    assert [float(m.k.mean()) for m in single.slots] == [1.0, 2.0]
    back = Memories(model, 2, 1, Ranks(1, 2))
    back.load_state_dict({"ranks": single.state_dict()["ranks"]})
    assert float(back.slots[0].k.mean()) == 2.0
    with pytest.raises(Exception, match="same train.grad_accum"):
        Memories(model, 2, 3, Ranks(0, 1)).load_state_dict(state)


def _train_copy_across_the_boundary(memory, steps=300):
    """Loss on segment 2 of documents whose segment 2 repeats segment 1, after `steps` AdamW steps.

    With memory the copy is a lookup T - 1 tokens back (in the memory); without, segment 2 is
    random tokens with nothing to copy from (log 26 = 3.26 nats).
    """
    vocab, rows = 26, 16
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=vocab, context_length=T, d_model=32, n_layers=2, n_heads=2,
                                    memory=T if memory else 0))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        block = torch.randint(0, vocab, (rows, T), generator=g)
        targets = torch.roll(block, -1, 1)  # segment 2's next tokens: the block again, its first token last
        state = model.new_memory(rows)
        if memory:
            with torch.no_grad():
                model(block, memory=state)  # segment 1 fills the memory
        loss = model(block, targets=targets, memory=state)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss.item()


def test_a_model_with_memory_learns_to_copy_the_previous_segment_and_one_without_cannot():
    """The decisive check that memory reaches across the boundary with the right positions and mask."""
    assert _train_copy_across_the_boundary(memory=True) < 0.5
    assert _train_copy_across_the_boundary(memory=False) > 3.0
