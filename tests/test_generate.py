import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lmlab.config import ModelConfig, resolve_d_ff
from lmlab.errors import LmlabError
from lmlab.model.sampling import generate, generate_ids, sample_next
from lmlab.model.transformer import KVCache, Transformer


def tiny_model(vocab_size=97, context_length=32, seed=0, **overrides):
    config = ModelConfig(vocab_size=vocab_size, context_length=context_length, d_model=32, n_layers=2, n_heads=4, **overrides)
    config.d_ff = resolve_d_ff(config)
    torch.manual_seed(seed)
    return Transformer(config)


class ByteTokenizer:
    """The smallest tokenizer with the interface generate() needs: one token per UTF-8 byte."""

    eot_id = 256

    def encode(self, text):
        return list(text.encode("utf-8"))

    def decode(self, ids):
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class ScriptedModel(torch.nn.Module):
    """Stands in for a Transformer and predicts a fixed script of tokens, one per forward call."""

    def __init__(self, script, vocab_size=257, context_length=64):
        super().__init__()
        self.script = list(script)
        self.vocab_size = vocab_size
        self.config = ModelConfig(vocab_size=vocab_size, context_length=context_length)
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # gives generate a device to read
        self.calls = 0

    def new_kv_cache(self, batch_size, max_len):
        return KVCache(1, batch_size, 1, max_len, 2)

    def forward(self, ids, kv_cache=None):
        logits = torch.zeros(ids.shape[0], ids.shape[1], self.vocab_size)
        logits[:, -1, self.script[self.calls]] = 10.0
        self.calls += 1
        if kv_cache is not None:
            kv_cache.pos += ids.shape[1]
        return logits


# --- sample_next ----------------------------------------------------------------------


def random_logits(batch=4, vocab=50, seed=0):
    return torch.randn(batch, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def test_temperature_zero_is_argmax():
    logits = random_logits()
    assert torch.equal(sample_next(logits, temperature=0), logits.argmax(-1))


def test_top_k_one_and_tiny_top_p_are_greedy():
    logits = random_logits()
    greedy = logits.argmax(-1)
    for seed in range(5):
        g = torch.Generator().manual_seed(seed)
        assert torch.equal(sample_next(logits, temperature=1.5, top_k=1, generator=g), greedy)
        assert torch.equal(sample_next(logits, temperature=1.5, top_p=1e-9, generator=g), greedy)


def test_top_k_samples_only_among_the_k_most_likely():
    logits = random_logits(batch=1, vocab=30)
    top3 = set(torch.topk(logits[0], 3).indices.tolist())
    g = torch.Generator().manual_seed(0)
    drawn = {int(sample_next(logits, temperature=2.0, top_k=3, generator=g)) for _ in range(200)}
    assert drawn == top3


@settings(max_examples=50, deadline=None)
@given(probs=st.lists(st.floats(0.01, 1.0), min_size=2, max_size=8), top_p=st.floats(0.05, 0.99))
def test_top_p_samples_from_the_smallest_set_reaching_top_p(probs, top_p):
    p = torch.tensor(probs) / sum(probs)
    logits = p.log()[None]
    order = torch.argsort(p, descending=True)
    cumulative = torch.cumsum(p[order], 0)
    n_keep = int((cumulative < top_p - 1e-6).sum()) + 1  # smallest prefix whose mass reaches top_p
    allowed = set(order[:n_keep].tolist())
    g = torch.Generator().manual_seed(0)
    drawn = {int(sample_next(logits, top_p=top_p, generator=g)) for _ in range(100)}
    assert drawn <= allowed
    assert order[0].item() in allowed


def test_same_seed_same_samples():
    logits = random_logits(batch=8)
    a = sample_next(logits, top_k=10, top_p=0.9, generator=torch.Generator().manual_seed(7))
    b = sample_next(logits, top_k=10, top_p=0.9, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


def test_bad_sampling_arguments_are_rejected():
    with pytest.raises(LmlabError, match="temperature"):
        sample_next(random_logits(), temperature=-1)
    with pytest.raises(LmlabError, match="top_p"):
        sample_next(random_logits(), top_p=0)


# --- generate_ids ---------------------------------------------------------------------


@pytest.mark.parametrize("max_new_tokens", [10, 45])  # 45: past the 32-token window, where the cache runs out
def test_greedy_with_cache_equals_without(max_new_tokens):
    model = tiny_model(n_kv_heads=2)
    prompt = [5, 17, 3, 9, 60]
    cached = generate_ids(model, prompt, max_new_tokens, temperature=0, use_cache=True)
    recomputed = generate_ids(model, torch.tensor(prompt), max_new_tokens, temperature=0, use_cache=False)
    assert len(cached) == max_new_tokens
    assert cached == recomputed


def test_sampling_is_deterministic_for_a_seed():
    model = tiny_model()
    runs = [generate_ids(model, [1, 2, 3], 20, temperature=1.0, top_k=20, seed=s) for s in (3, 3, 4)]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]
    assert runs[0] == generate_ids(model, [1, 2, 3], 20, temperature=1.0, top_k=20, seed=3, use_cache=False)


def test_a_stop_token_ends_generation_and_is_left_out():
    script = [7, 8, 9, 42, 10]
    streamed = []
    ids = generate_ids(ScriptedModel(script), [1], 10, temperature=0, stop_ids=[42], on_token=streamed.append)
    assert ids == streamed == [7, 8, 9]


def test_a_long_prompt_keeps_its_last_context_length_tokens():
    model = tiny_model(context_length=16)
    prompt = list(range(40))
    assert generate_ids(model, prompt, 5, temperature=0) == generate_ids(model, prompt[-16:], 5, temperature=0)


def test_generate_ids_restores_training_mode_and_rejects_an_empty_prompt():
    model = tiny_model().train()
    generate_ids(model, [1, 2], 3)
    assert model.training
    with pytest.raises(LmlabError, match="empty"):
        generate_ids(model, [], 3)


# --- generate (text) ------------------------------------------------------------------


def test_stream_emits_whole_characters_that_add_up_to_the_text():
    target = "你好, world 🙂! ça va"
    tokenizer = ByteTokenizer()
    script = tokenizer.encode(target) + [tokenizer.eot_id]
    pieces = []
    text = generate(ScriptedModel(script), tokenizer, "说", max_new_tokens=100, temperature=0, stream=pieces.append)
    assert text == target
    assert "".join(pieces) == text
    assert "你" in pieces and "🙂" in pieces  # multi-byte characters arrive whole, as soon as complete
    assert not any("\ufffd" in piece for piece in pieces)


def test_stream_flushes_a_character_cut_off_by_max_new_tokens():
    tokenizer = ByteTokenizer()
    script = tokenizer.encode("ab🙂")
    pieces = []
    text = generate(ScriptedModel(script), tokenizer, "x", max_new_tokens=4, temperature=0, stream=pieces.append)
    assert text == "ab\ufffd"  # the emoji's first two of four bytes
    assert "".join(pieces) == text


@pytest.fixture(scope="module")
def bpe_tokenizer():
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
    )
    text = ["Once upon a time there was a little cat. 从前有一只小猫。🐱 It liked fish. 它喜欢鱼。"] * 20
    tok.train_from_iterator(text, trainer)

    class Wrapper:
        eot_id = tok.token_to_id("<|endoftext|>")

        def encode(self, s):
            return tok.encode(s).ids

        def decode(self, ids):
            return tok.decode(ids)

    return Wrapper()


@pytest.mark.parametrize("prompt", ["Once upon a time", "从前有一只小猫🐱", ""])
def test_generate_with_a_real_bpe_tokenizer_streams_pieces_that_add_up(bpe_tokenizer, prompt):
    model = tiny_model(vocab_size=301, context_length=64)  # padded past the tokenizer's 300
    for seed in range(3):
        pieces = []
        text = generate(model, bpe_tokenizer, prompt, max_new_tokens=40, temperature=1.0, top_k=0, seed=seed, stream=pieces.append)
        assert "".join(pieces) == text
        assert text == generate(model, bpe_tokenizer, prompt, max_new_tokens=40, temperature=1.0, top_k=0, seed=seed)
