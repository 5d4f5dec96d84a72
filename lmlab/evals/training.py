"""Evaluations during training (train.evals): a few numbers per evaluation in metrics.jsonl.

Design choices:
- Off by default. With train.evals = ["copy", "history"] (any of copy, reverse,
  history, and the bundled multiple-choice sets mmlu, cmmlu), they run right
  after the validation loss, every train.evals_every steps (0 = at every
  validation evaluation) and at the last step, and add one metrics event with
  their summary numbers: copy_acc_random / copy_acc_meaningful (mean accuracy
  over the lengths that fit the context), history_loss_gain /
  history_accuracy_gain (longest history against none), mmlu_acc.
- Cheaper than `lmlab eval`: the probes use the lengths that fit the context
  and 16 samples, the multiple-choice sets 5 items per subject. Random
  probe tokens are drawn as train.evals_random_tokens says (default: tokens
  seen in the training shards), separated by train.evals_separator (default
  end-of-text). Meaningful text
  and history positions come from the run's own validation split. The full
  curves come from `lmlab eval RUN --probe ...` after training.
- The seed is fixed, so two evaluations of the same weights give the same
  numbers, and the training RNGs are untouched (numpy's own generator; the
  model runs in eval mode, so dropout draws nothing).
"""

from lmlab.evals import choice, probes

SAMPLES = 16
CHOICE_LIMIT = 5


class TrainingEvals:
    def __init__(self, config, tokenizer, shards_dir, device, precision):
        self.names = list(config.train.evals)
        self.every = config.train.evals_every
        self.tokenizer, self.shards_dir = tokenizer, shards_dir
        self.device, self.precision = device, precision
        self._stream = None
        self.random_tokens, self.separator = config.train.evals_random_tokens, config.train.evals_separator or None
        self._counts = None

    def due(self, step, last_step):
        return bool(self.names) and (not self.every or step % self.every == 0 or step == last_step)

    def stream(self):
        if self._stream is None:
            self._stream = probes.shard_stream(self.shards_dir, "val", max_tokens=200_000)
        return self._stream

    def counts(self):
        """Token counts of the training split, for random probe tokens (None when they come from the vocabulary)."""
        if self._counts is None and self.random_tokens != "vocab":
            self._counts = probes.token_counts(self.shards_dir, "train")
        return self._counts

    def run(self, model):
        """{name: value} of every train.evals entry, for one metrics event."""
        out = {}
        context_length = model.config.context_length
        for name in self.names:
            if name in ("copy", "reverse"):
                lengths = [n for n in probes.default_lengths(context_length) if 2 * n + 1 <= context_length]
                result = probes.copy_probe(model, self.tokenizer, self.stream(), task=name, lengths=lengths,
                                           samples=SAMPLES, separator=self.separator, device=self.device,
                                           precision=self.precision, random_tokens=self.random_tokens,
                                           counts=self.counts())
                out.update(probes.probe_summary(result))
            elif name == "history":
                result = probes.history_probe(model, self.stream(), samples=4 * SAMPLES, device=self.device,
                                              precision=self.precision)
                out.update(probes.probe_summary(result))
            else:
                path, _ = choice.resolve_set(name)
                items, fmt = choice.read_items(path)
                result = choice.choice_eval(model, self.tokenizer, choice.limit_per_subject(items, CHOICE_LIMIT),
                                            fmt, device=self.device, precision=self.precision)
                out[f"{name}_acc"] = result["accuracy"]
        return out
