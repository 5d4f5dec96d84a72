"""`lmlab bench`: speed and memory of lmlab measured next to a reference, on this machine.

    lmlab.bench.common     machine info, side-by-side timing, peak memory, Markdown tables
    lmlab.bench.train      training step vs transformers' LlamaForCausalLM (same shape and weights)
    lmlab.bench.find_batch the largest batch that fits a memory budget
    lmlab.bench.generate   generation with and without the KV cache (and transformers' generate)
    lmlab.bench.data       data loader vs the training step; prepare and tokenizer training vs cores
"""
