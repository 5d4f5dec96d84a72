"""Hugging Face export and import, checked against `transformers` itself."""

import json
from pathlib import Path

import pytest
import torch

from conftest import tinystories_documents
from lmlab.config import Config, ModelConfig, resolve_d_ff
from lmlab.errors import LmlabError
from lmlab.model.hf import hf_architecture, load_hf_model
from lmlab.rundir.hf import export_hf, import_hf
from lmlab.model.sampling import generate_ids
from lmlab.model.transformer import Transformer
from lmlab.rundir.run import load_run, save_config, save_weights
from lmlab.data.tokenizer import Tokenizer, train_tokenizer

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

HF_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """A byte-level BPE with 320 tokens, trained on 100 real stories."""
    root = tmp_path_factory.mktemp("tok")
    (root / "stories.txt").write_text("".join(tinystories_documents("train", 100)), encoding="utf-8")
    return train_tokenizer([root / "stories.txt"], 320)


def make_run(run_dir, tokenizer, seed=0, **overrides):
    """A run directory holding a randomly initialised model with perturbed norm gains and biases."""
    base = dict(vocab_size=tokenizer.vocab_size, context_length=48, d_model=32, n_layers=2, n_heads=4, init_std=0.1)
    config = ModelConfig(**{**base, **overrides})
    config.d_ff = resolve_d_ff(config)
    torch.manual_seed(seed)
    model = Transformer(config).eval()
    with torch.no_grad():  # norm gains start at 1 and biases at 0: move them so that a swap would show
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.2 * torch.randn_like(p))
    Path(run_dir).mkdir(parents=True)
    save_config(run_dir, Config(model=config))
    tokenizer.save(run_dir)
    save_weights(model, run_dir)
    return Path(run_dir)


CASES = {
    "mha-untied-odd": dict(d_model=48, n_heads=6, n_layers=3, d_ff=80, vocab_size=331, rope_theta=1234.5, norm_eps=1e-6),
    "gqa-tied": dict(n_heads=4, n_kv_heads=2, tie_embeddings=True),
    "mqa-bias-headdim": dict(n_heads=4, n_kv_heads=1, head_dim=12, bias=True, rope_theta=500000.0),
    "qknorm-gqa": dict(qk_norm=True, d_model=40, n_heads=4, n_kv_heads=2, d_ff=72, vocab_size=333),
    "qknorm-tied-headdim": dict(qk_norm=True, n_heads=2, head_dim=20, tie_embeddings=True, dropout=0.1),
}


@pytest.mark.parametrize("case", CASES)
def test_export_loads_in_transformers_with_equal_logits_and_greedy_tokens_and_round_trips(case, tmp_path, tokenizer):
    overrides = CASES[case]
    run_dir = make_run(tmp_path / "run", tokenizer, seed=len(case), **overrides)
    out = export_hf(run_dir, tmp_path / "hf")
    assert sorted(p.name for p in out.iterdir()) == sorted(HF_FILES)
    ours = load_run(run_dir)

    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    expected_class = "Qwen3ForCausalLM" if overrides.get("qk_norm") else "LlamaForCausalLM"
    assert type(hf).__name__ == expected_class
    assert hf.num_parameters() == ours.model.num_params()

    # logits, to fp32 precision
    ids = torch.randint(0, tokenizer.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids).logits, ours.model(ids), rtol=1e-5, atol=1e-5)

    # the tokenizer, through AutoTokenizer
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    text = "Once upon a time, Lily saw a big dog.<|endoftext|>Tom ran."
    assert hf_tokenizer(text).input_ids == tokenizer.encode(text)
    assert hf_tokenizer.decode(tokenizer.encode(text)) == text
    assert hf_tokenizer.eos_token_id == tokenizer.eot_id and hf_tokenizer.pad_token_id == tokenizer.pad_id

    # greedy generation: transformers' generate (its own KV cache) against ours
    prompt = tokenizer.encode("Once upon a time")
    with torch.no_grad():
        generated = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                do_sample=False, max_new_tokens=40 - len(prompt))
    theirs = generated[0, len(prompt):].tolist()
    if theirs and theirs[-1] == tokenizer.eot_id:
        theirs = theirs[:-1]  # ours leaves the stop token out
    mine = generate_ids(ours.model, prompt, 40 - len(prompt), temperature=0, stop_ids=(tokenizer.eot_id,))
    assert mine == theirs and len(mine) > 0

    # export -> import -> export is byte-stable
    import_hf(out, tmp_path / "imported")
    again = export_hf(tmp_path / "imported", tmp_path / "hf2")
    first = safetensors_torch.load_file(out / "model.safetensors")
    second = safetensors_torch.load_file(again / "model.safetensors")
    assert first.keys() == second.keys()
    for key in first:
        assert first[key].dtype == second[key].dtype == torch.float32
        assert torch.equal(first[key].view(torch.int32), second[key].view(torch.int32)), key  # bitwise
    for name in HF_FILES:
        assert (out / name).read_bytes() == (again / name).read_bytes(), name


def test_tied_export_stores_the_embedding_once(tmp_path, tokenizer):
    out = export_hf(make_run(tmp_path / "run", tokenizer, tie_embeddings=True), tmp_path / "hf")
    names = safetensors_torch.load_file(out / "model.safetensors").keys()
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is True
    assert config["rope_parameters"] == {"rope_type": "default", "rope_theta": 10000.0}
    assert config["rope_theta"] == 10000.0 and config["rope_scaling"] is None  # the keys transformers 4 reads


def test_export_accepts_a_loaded_run_and_reports_the_class(tmp_path, tokenizer):
    run = load_run(make_run(tmp_path / "run", tokenizer, qk_norm=True))
    lines = []
    export_hf(run, tmp_path / "hf", log=lines.append)
    assert "Qwen3ForCausalLM" in lines[0]


@pytest.mark.parametrize("overrides, reason", [
    (dict(norm="none"), "model.norm='none'"),
    (dict(norm="layernorm"), "model.norm='layernorm'"),
    (dict(norm_position="post"), "model.norm_position='post'"),
    (dict(position="nope"), "model.position='nope'"),
    (dict(position="learned"), "model.position='learned'"),
    (dict(ffn="silu"), "model.ffn='silu'"),
    (dict(ffn="gelu"), "model.ffn='gelu'"),
    (dict(key_norm=True), "model.key_norm=true"),
    (dict(qk_norm=True, bias=True), "model.bias=true with model.qk_norm=true"),
])
def test_models_outside_the_standard_families_are_refused_naming_the_switch(overrides, reason):
    with pytest.raises(LmlabError, match=f"no standard Hugging Face class: .*{reason}".replace("(", r"\(")):
        hf_architecture(ModelConfig(**overrides))


def test_a_refused_export_writes_nothing_and_names_every_reason(tmp_path, tokenizer):
    run_dir = make_run(tmp_path / "run", tokenizer, norm_position="post", ffn="gelu")
    with pytest.raises(LmlabError) as error:
        export_hf(run_dir, tmp_path / "hf")
    assert "model.norm_position='post'" in str(error.value) and "model.ffn='gelu'" in str(error.value)
    assert not (tmp_path / "hf").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # no temporary folder left behind


def test_export_never_overwrites_a_folder(tmp_path, tokenizer):
    run_dir = make_run(tmp_path / "run", tokenizer)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "keep.txt").write_text("mine")
    with pytest.raises(LmlabError, match="already exists"):
        export_hf(run_dir, tmp_path / "hf")
    assert [p.name for p in (tmp_path / "hf").iterdir()] == ["keep.txt"]
    (tmp_path / "empty").mkdir()
    export_hf(run_dir, tmp_path / "empty")  # an empty folder is fine
    assert (tmp_path / "empty" / "config.json").is_file()


# --- import from folders that transformers wrote ------------------------------------


def hf_folder(tmp_path, model_type="llama", max_shard_size=None, tokenizer_files=None, **config):
    """A folder written by transformers' own save_pretrained, with a tokenizer that has no pad token."""
    base = dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6)
    cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
           "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM)}[model_type]
    torch.manual_seed(0)
    hf_config = cls[0](**{**base, **config})
    model = cls[1](hf_config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    out = tmp_path / f"hf-{model_type}"
    model.save_pretrained(out, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    for name, content in (tokenizer_files or {}).items():
        (out / name).write_text(content, encoding="utf-8")
    return out, model


def llama_style_tokenizer_files():
    """tokenizer.json with <s> / </s> specials (no <|endoftext|>), and a config with no pad token."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=290, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    hf.train_from_iterator(tinystories_documents("train", 30), trainer=trainer)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": {"content": "</s>"},
              "unk_token": "<unk>"}
    return {"tokenizer.json": hf.to_str(), "tokenizer_config.json": json.dumps(config)}


def test_import_a_sharded_llama_folder_with_no_pad_token_then_generate_and_export(tmp_path):
    files = llama_style_tokenizer_files()
    source, hf_model = hf_folder(tmp_path, max_shard_size="40KB", tokenizer_files=files, tie_word_embeddings=False)
    assert (source / "model.safetensors.index.json").is_file() and not (source / "model.safetensors").exists()

    model, tokenizer, config = load_hf_model(source)
    assert isinstance(model, Transformer) and isinstance(tokenizer, Tokenizer) and isinstance(config, ModelConfig)
    assert tokenizer.eot == "</s>" and tokenizer.eot_id == 2
    assert tokenizer.pad_id == tokenizer.eot_id  # no pad token in the folder: pad with end-of-text
    assert (config.d_model, config.n_kv_heads, config.d_ff, config.vocab_size, config.norm_eps) == (32, 2, 64, 300, 1e-6)
    ids = torch.randint(0, 290, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf_model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)

    run_dir = import_hf(source, tmp_path / "run")
    run = load_run(run_dir)
    assert run.tokenizer.eot == "</s>" and run.tokenizer.pad_id == 2
    assert run.config.model.init_from == str(source.resolve()) and run.config.data.tokenizer == str(source.resolve())
    with torch.no_grad():
        torch.testing.assert_close(run.model(ids), hf_model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    out = export_hf(run_dir, tmp_path / "back")
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids).logits, hf_model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_import_a_qwen3_folder_whose_head_dim_is_not_d_model_over_heads(tmp_path, tokenizer):
    tokenizer.save(tmp_path / "tok")
    files = {name: (tmp_path / "tok" / name).read_text() for name in ("tokenizer.json", "tokenizer_config.json")}
    source, hf_model = hf_folder(tmp_path, "qwen3", tokenizer_files=files, vocab_size=tokenizer.vocab_size,
                                 head_dim=16, tie_word_embeddings=True)
    model, _, config = load_hf_model(source)
    assert config.qk_norm and config.head_dim == 16 and config.tie_embeddings
    ids = torch.randint(0, tokenizer.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf_model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("change, message", [
    (dict(model_type="gpt2"), "model_type 'gpt2' is not supported"),
    (dict(architectures=["LlamaForSequenceClassification"]), "LlamaForSequenceClassification"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "rope_scaling"),
    (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}), "rope_parameters"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(attention_bias=True, mlp_bias=False), "attention_bias"),
    (dict(use_sliding_window=True), "use_sliding_window"),
    (dict(quantization_config={"quant_method": "bitsandbytes"}), "quantization_config"),
])
def test_unsupported_hf_configs_are_refused_with_the_key(change, message, tmp_path, tokenizer):
    tokenizer.save(tmp_path / "tok")
    source, _ = hf_folder(tmp_path, vocab_size=tokenizer.vocab_size,
                          tokenizer_files={"tokenizer.json": (tmp_path / "tok" / "tokenizer.json").read_text()})
    config = json.loads((source / "config.json").read_text())
    config.update(change)
    (source / "config.json").write_text(json.dumps(config))
    with pytest.raises(LmlabError, match=message):
        import_hf(source, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_import_errors_for_missing_pieces(tmp_path, tokenizer):
    with pytest.raises(LmlabError, match="does not exist"):
        load_hf_model(tmp_path / "nowhere")
    tokenizer.save(tmp_path / "tok")
    source, _ = hf_folder(tmp_path, vocab_size=tokenizer.vocab_size,
                          tokenizer_files={"tokenizer.json": (tmp_path / "tok" / "tokenizer.json").read_text()})
    (source / "model.safetensors").rename(tmp_path / "elsewhere.safetensors")
    with pytest.raises(LmlabError, match="no model.safetensors"):
        load_hf_model(source)
    (tmp_path / "elsewhere.safetensors").rename(source / "model.safetensors")
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "intermediate_size": 96}))
    with pytest.raises(LmlabError, match="do not match config.json.*wrong shape"):
        load_hf_model(source)
    (source / "tokenizer.json").unlink()
    with pytest.raises(LmlabError, match="no tokenizer.json"):
        load_hf_model(source)


# --- the CLI ----------------------------------------------------------------------


def test_cli_import_generate_export(tmp_path, tokenizer, capsys):
    from lmlab.cli import main

    tokenizer.save(tmp_path / "tok")
    files = {name: (tmp_path / "tok" / name).read_text() for name in ("tokenizer.json", "tokenizer_config.json")}
    source, _ = hf_folder(tmp_path, tokenizer_files=files, vocab_size=tokenizer.vocab_size)
    assert main(["import", str(source), str(tmp_path / "run")]) == 0
    assert "Transformer 2L d32 h4/kv2" in capsys.readouterr().out
    assert main(["generate", str(tmp_path / "run"), "--prompt", "Once upon", "--greedy", "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out.startswith("Once upon")
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "out")]) == 0
    assert "LlamaForCausalLM" in capsys.readouterr().out and (tmp_path / "out" / "model.safetensors").is_file()
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "out")]) == 2  # never overwrites
    assert capsys.readouterr().err.count("\n") == 1


def test_cli_export_refusal_is_one_line_naming_the_switch(tmp_path, tokenizer, capsys):
    from lmlab.cli import main

    run_dir = make_run(tmp_path / "run", tokenizer, position="nope")
    assert main(["export", str(run_dir), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lmlab: error:") and "model.position='nope'" in err and err.count("\n") == 1
