"""Any logits-giving module, seen by the evaluations as they see lmlab's Transformer.

The probes and scorers (scoring.py, probes.py, choice.py, perplexity.py) need
three things of a model: `model(ids)` returning logits (B, T, vocab),
`model.config.vocab_size` and `model.config.context_length`, and the usual
module methods (parameters, train / eval). lmlab's Transformer has them;
another implementation (transformers' LlamaForCausalLM, which returns an
output object and names its window max_position_embeddings) gets them here,
so the same probe code measures both.

    probed = LogitsModel(hf_model, vocab_size=300, context_length=128)
    copy_probe(probed, tokenizer, stream, ...)

Design choice: a wrapping nn.Module, not a duck-typed object, so that
`next(model.parameters())`, `model.eval()` and `model.training` reach the
wrapped module's own parameters and mode.
"""

from types import SimpleNamespace

from torch import nn


class LogitsModel(nn.Module):
    """`module` (called as module(ids), returning logits or an object with .logits) with the config evals read."""

    def __init__(self, module, vocab_size, context_length):
        super().__init__()
        self.module = module
        self.config = SimpleNamespace(vocab_size=int(vocab_size), context_length=int(context_length))

    def forward(self, input_ids):
        out = self.module(input_ids)
        return getattr(out, "logits", out)
