"""The model: a Llama-style transformer whose switches leave the family without a fork.

    transformer.py  Transformer, attention, blocks, the LM loss (chunked: no full logits)
    layers.py       the swappable parts: norms, RoPE, FFNs, attention back-ends
    sampling.py     generation with a KV cache: temperature, top-k, top-p
    weights.py      weights in and out of any module; the tied LM head handled in one place
    hf.py           Hugging Face export and import (Llama / Qwen3 folders)
"""
