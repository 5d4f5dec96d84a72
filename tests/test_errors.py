"""Expected mistakes give one clear line, a non-zero exit, and leave nothing half-written."""

import subprocess
import sys

import pytest

from lmlab.cli import main


def run_cli(capsys, *argv):
    code = main(list(argv))
    err = capsys.readouterr().err.strip()
    return code, err


def assert_one_line_error(code, err, *fragments):
    assert code == 2
    assert "\n" not in err and err.startswith("lmlab: error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, err


@pytest.fixture
def base(tiny_overrides, tmp_path):
    """tiny_overrides without the corpus, with an empty cache of its own."""
    keep = [o for o in tiny_overrides if not o.startswith(("data.train_files", "data.val_files", "data.cache_dir"))]
    return keep + [f"data.cache_dir={tmp_path / 'cache'}"]


def nothing_written(tmp_path):
    runs = tmp_path / "runs"
    cache = tmp_path / "cache"
    leftovers = [p for p in cache.rglob("*")] if cache.exists() else []
    return not runs.exists() and not any(p.name.startswith(".") or "tmp" in p.name for p in leftovers)


def test_missing_corpus_file(capsys, base, tmp_path):
    code, err = run_cli(capsys, "train", *base, f"data.train_files={tmp_path / 'missing.txt'}")
    assert_one_line_error(code, err, "missing.txt")
    assert nothing_written(tmp_path)


def test_empty_corpus(capsys, base, tmp_path):
    (tmp_path / "empty.txt").write_text("")
    code, err = run_cli(capsys, "train", *base, f"data.train_files={tmp_path / 'empty.txt'}")
    assert_one_line_error(code, err, "empty.txt")
    assert nothing_written(tmp_path)


def test_directory_where_a_file_is_expected(capsys, base, tmp_path):
    (tmp_path / "adir").mkdir()
    code, err = run_cli(capsys, "train", *base, f"data.train_files={tmp_path / 'adir'}")
    assert_one_line_error(code, err, "adir", "directory")
    assert nothing_written(tmp_path)


def test_invalid_utf8_says_where(capsys, base, tmp_path, small_corpus):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(small_corpus[0].read_bytes()[:2000] + b"\nOnce upon a \xff time\n")
    code, err = run_cli(capsys, "train", *base, f"data.train_files={bad}")
    assert_one_line_error(code, err, "bad.txt", "UTF-8")
    assert any(ch.isdigit() for ch in err.split("bad.txt", 1)[1])  # a position follows the file name
    assert nothing_written(tmp_path)


def test_tokenizer_that_does_not_match_the_shards(capsys, base, tmp_path, small_corpus):
    train_file, _ = small_corpus
    assert main(["tokenizer", "train", str(train_file), "--vocab-size", "300", "--out", str(tmp_path / "tokA")]) == 0
    assert main(["tokenizer", "train", str(train_file), "--vocab-size", "320", "--out", str(tmp_path / "tokB")]) == 0
    assert main(["prepare", str(train_file), "--tokenizer", str(tmp_path / "tokA"), "--out",
                 str(tmp_path / "shards")]) == 0
    capsys.readouterr()
    code, err = run_cli(capsys, "train", *base, f"data.shards={tmp_path / 'shards'}",
                        f"data.tokenizer={tmp_path / 'tokB'}")
    assert_one_line_error(code, err, "tokenizer")
    assert not (tmp_path / "runs").exists()


def test_cuda_asked_for_but_absent(capsys, base, tmp_path, small_corpus):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code, err = run_cli(capsys, "train", *base, f"data.train_files={small_corpus[0]}", "train.device=cuda")
    assert_one_line_error(code, err, "CUDA")
    assert nothing_written(tmp_path)


def test_unknown_key_from_the_console_script():
    result = subprocess.run([sys.executable, "-m", "lmlab.cli", "train", "optim.learning_rate=1e-3"],
                            check=False, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip() == "lmlab: error: unknown config key 'optim.learning_rate' (did you mean 'optim.lr'?)"


def test_generate_on_a_missing_run(capsys, tmp_path):
    code, err = run_cli(capsys, "generate", str(tmp_path / "nope"))
    assert_one_line_error(code, err, "nope")


@pytest.mark.parametrize("argv", [["config", "--keys"], ["runs", "RUNS"]])
def test_a_reader_that_closes_the_pipe_early_gets_no_traceback(argv, tmp_path):
    """`lmlab runs | head -1`: the reader leaves before lmlab writes; lmlab exits quietly with 141.

    The pipe's read end is closed before the child has even imported Python's
    standard library, so every write lmlab makes meets a closed pipe (EPIPE):
    without the fix this printed a BrokenPipeError traceback, or Python's
    "Exception ignored ... BrokenPipeError" at exit.
    """
    (tmp_path / "runs" / "a").mkdir(parents=True)
    (tmp_path / "runs" / "a" / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n', encoding="utf-8")
    argv = [str(tmp_path / "runs") if a == "RUNS" else a for a in argv]
    process = subprocess.Popen([sys.executable, "-m", "lmlab.cli", *argv], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    process.stdout.close()  # the reader is gone
    err = process.stderr.read()
    assert process.wait(timeout=60) == 141, err
    assert err == "", err
