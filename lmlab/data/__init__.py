"""Data: documents in, deterministic batches out.

    documents.py   read .txt / .jsonl / .parquet (compressed too) as a stream of documents
    tokenizer.py   byte-level BPE (HF tokenizers): train, load, save, fingerprint; extra special tokens
    textstream.py  encode_iterable: a text stream to ids in bounded memory, the ids of one encode
    encode.py      encoding on every core, byte-identical to one core
    shards.py      `lmlab prepare`: token shards (.npy) + meta.json, train/val split
    stream.py      data.packing = stream: each row reads one document segment by segment
    batches.py     (x, y) batches as a function of (seed, step, micro, rank); the validation subset
    corpora.py     the bundled corpora (corpora/, with SOURCES.md) and the tokenizer/shard cache
    curriculum.py  train.context_schedule: shorter windows early, same tokens per step
"""
