"""The `lmlab` command: verbs -> functions. Argument parsing only, no logic.

Expected mistakes (`LmlabError`) print one line and exit with status 2.
"""

import argparse
import sys

from lmlab.errors import LmlabError

EPILOG_OVERRIDES = "Any config key can follow as KEY=VALUE, e.g. optim.lr=3e-3 train.max_steps=5000."


def _add_config_args(parser):
    parser.add_argument("--config", metavar="FILE",
                        help="TOML config file or preset name (default: the CPU quick start, cpu-quickstart)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. optim.lr=3e-3")


def cmd_train(args):
    from lmlab.config import load_config

    config = load_config(args.config, args.overrides)  # config mistakes surface before torch is imported
    from lmlab.trainer import train

    train(config)


def cmd_config(args):
    from lmlab.config import describe_keys, load_config, to_toml

    print(describe_keys() if args.keys else to_toml(load_config(args.config, args.overrides)), end="\n")


def cmd_tokenizer_train(args):
    from lmlab.tokenizer import train_tokenizer

    tokenizer = train_tokenizer(args.files, args.vocab_size, special_tokens=args.special_token,
                                text_key=args.text_key)
    tokenizer.save(args.out)
    print(f"tokenizer with {tokenizer.vocab_size} tokens ({tokenizer.fingerprint}) -> {args.out}")


def cmd_prepare(args):
    from lmlab.data import prepare
    from lmlab.tokenizer import Tokenizer

    meta = prepare(args.files, Tokenizer.load(args.tokenizer), args.out, val_files=args.val or (),
                   val_fraction=args.val_fraction, text_key=args.text_key)
    counts = ", ".join(f"{split}: {info['tokens']:,} tokens in {info['documents']:,} documents"
                       for split, info in meta["splits"].items())
    print(f"{counts} -> {args.out}")


def cmd_generate(args):
    from lmlab.device import resolve_device
    from lmlab.sampling import generate
    from lmlab.run import load_run

    run = load_run(args.run, device=resolve_device(args.device))
    print(args.prompt, end="", flush=True)
    generate(run.model, run.tokenizer, args.prompt, max_new_tokens=args.max_new_tokens,
             temperature=0.0 if args.greedy else args.temperature, top_k=args.top_k, top_p=args.top_p,
             seed=args.seed, stream=lambda piece: print(piece, end="", flush=True))
    print()


def cmd_export(args):
    from lmlab.export import export_hf

    export_hf(args.run, args.out, log=print)


def cmd_import(args):
    from lmlab.export import import_hf

    import_hf(args.hf_dir, args.run_dir, log=print)


def build_parser():
    from lmlab import __version__

    parser = argparse.ArgumentParser(prog="lmlab", description="Pretrain small language models and run experiments on them.")
    parser.add_argument("--version", action="version", version=f"lmlab {__version__}")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    p = verbs.add_parser("train", help="train a model (default: the CPU quick start on bundled TinyStories)",
                         description="Train a model. With no arguments, runs the CPU quick-start preset on the "
                                     "bundled TinyStories corpus, building its tokenizer and shards first if needed.",
                         epilog=EPILOG_OVERRIDES + " `lmlab config --keys` lists every key. Architecture "
                                "switches for ablations: model.norm (rmsnorm, layernorm, none), "
                                "model.norm_position (pre, post), model.position (rope, nope, learned), "
                                "model.ffn (swiglu, silu, gelu), model.qk_norm, model.key_norm, "
                                "model.key_norm_scale, model.bias, model.tie_embeddings, model.n_kv_heads.")
    _add_config_args(p)
    p.set_defaults(func=cmd_train)

    p = verbs.add_parser("config", help="print the resolved config, or every key with --keys",
                         epilog=EPILOG_OVERRIDES)
    _add_config_args(p)
    p.add_argument("--keys", action="store_true", help="list every config key with its default and meaning")
    p.set_defaults(func=cmd_config)

    tok = verbs.add_parser("tokenizer", help="train a byte-level BPE tokenizer")
    tok_verbs = tok.add_subparsers(dest="tokenizer_verb", required=True, metavar="VERB")
    p = tok_verbs.add_parser("train", help="train a byte-level BPE tokenizer on text / JSONL files",
                             description="Train a byte-level BPE tokenizer (HF tokenizers) and save tokenizer.json.")
    p.add_argument("files", nargs="+", metavar="FILE", help="text or .jsonl files (.gz / .xz accepted)")
    p.add_argument("--vocab-size", type=int, required=True, help="vocabulary size, special tokens included")
    p.add_argument("--out", required=True, metavar="DIR", help="directory to write tokenizer.json to")
    p.add_argument("--special-token", action="append", default=None, metavar="TOKEN",
                   help="special token (repeatable; default <|endoftext|>)")
    p.add_argument("--text-key", default="text", help="JSON field holding the text in .jsonl files")
    p.set_defaults(func=cmd_tokenizer_train)

    p = verbs.add_parser("prepare", help="tokenize text into train / validation shards",
                         description="Tokenize text or JSONL files into memory-mapped .npy token shards "
                                     "(train and val) plus meta.json.")
    p.add_argument("files", nargs="+", metavar="FILE", help="training text or .jsonl files (.gz / .xz accepted)")
    p.add_argument("--tokenizer", required=True, metavar="DIR",
                   help="directory with tokenizer.json (or vocab.json + merges.txt), or a tokenizer.json file")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory for the shards")
    p.add_argument("--val", nargs="+", metavar="FILE", help="validation files (default: hold out --val-fraction)")
    p.add_argument("--val-fraction", type=float, default=0.05, help="share of documents held out for validation")
    p.add_argument("--text-key", default="text", help="JSON field holding the text in .jsonl files")
    p.set_defaults(func=cmd_prepare)

    p = verbs.add_parser("generate", help="sample text from a trained run",
                         description="Sample a continuation of a prompt from a run's model, streamed to the terminal.")
    p.add_argument("run", metavar="RUN", help="run directory, e.g. runs/cpu-quickstart-20260101-120000")
    p.add_argument("--prompt", default="Once upon a time", help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate at most")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature; 0 = greedy")
    p.add_argument("--top-k", type=int, default=50, help="sample from the k most likely tokens; 0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass; 1 = off")
    p.add_argument("--greedy", action="store_true", help="always take the most likely token")
    p.add_argument("--seed", type=int, default=None, help="random seed for reproducible samples")
    p.add_argument("--device", default="cpu", help="device to run on (cpu, cuda, mps, auto)")
    p.set_defaults(func=cmd_generate)

    p = verbs.add_parser("export", help="write a run as a Hugging Face folder (Llama, or Qwen3 with QK-norm)",
                         description="Write a run's model and tokenizer as a Hugging Face folder (config.json, "
                                     "model.safetensors, tokenizer.json, tokenizer_config.json, "
                                     "generation_config.json) that transformers.AutoModelForCausalLM loads: "
                                     "LlamaForCausalLM, or Qwen3ForCausalLM when model.qk_norm is on. Models "
                                     "with other switches (no norm, post-norm, NoPE, SiLU FFN, ...) are refused.")
    p.add_argument("run", metavar="RUN", help="run directory, e.g. runs/cpu-quickstart-20260101-120000")
    p.add_argument("out", metavar="OUT_DIR", help="new (or empty) directory to write the Hugging Face folder to")
    p.set_defaults(func=cmd_export)

    p = verbs.add_parser("import", help="turn a local Hugging Face Llama / Qwen3 folder into a run directory",
                         description="Read a local Hugging Face LlamaForCausalLM / Qwen3ForCausalLM folder "
                                     "(config.json, safetensors weights, tokenizer.json) into a run directory "
                                     "that lmlab generate, eval and export use.")
    p.add_argument("hf_dir", metavar="HF_DIR", help="local Hugging Face model folder")
    p.add_argument("run_dir", metavar="RUN_DIR", help="new run directory to create")
    p.set_defaults(func=cmd_import)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except LmlabError as e:
        print(f"lmlab: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lmlab: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
