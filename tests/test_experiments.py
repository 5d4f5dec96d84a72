"""experiments/*/run.sh: each parses (`bash -n`) and runs only lmlab commands (and shell builtins).

An experiment that needs Python glue shows a feature lmlab lacks (issue 14), so this
test reads every command word of every run.sh and refuses anything that is not
lmlab or a shell builtin / keyword. No experiment is run here: they take minutes
to most of an hour each.
"""

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"
SCRIPTS = sorted(EXPERIMENTS.glob("*/run.sh"))
BUILTINS = {"set", "echo", "printf", "mkdir", "cd", "export", "test", "[", "[[", "true", "false", "exit", "shift",
            "local", "unset", "readonly", "return", ":", "wait", "trap", "time", "times"}
KEYWORDS = {"if", "then", "else", "elif", "fi", "for", "in", "do", "done", "while", "until", "case", "esac", "{", "}",
            "!", "function", "select"}
SEPARATORS = {";", "&&", "||", "|", "&", "(", ")", ";;", "|&"}


def strip_comments(text):
    """The script without its comments: a `#` that starts a word outside quotes, to the end of its line."""
    out, quote, i = [], None, 0
    while i < len(text):
        c = text[i]
        if quote:
            quote = None if c == quote else quote
        elif c in "'\"":
            quote = c
        elif c == "\\":
            out.append(text[i:i + 2])
            i += 2
            continue
        elif c == "#" and (i == 0 or text[i - 1] in " \t\n;"):
            while i < len(text) and text[i] != "\n":
                i += 1
            continue
        out.append(c)
        i += 1
    return "".join(out)


def command_words(text):
    """The command word of every simple command in a shell script (a plain reading, enough for run.sh files)."""
    text = re.sub(r"\$\{[^}]*\}", "$P", strip_comments(text))  # ${1:?usage: run.sh DIR} is one word
    lexer = shlex.shlex(text.replace("\\\n", " "), posix=True, punctuation_chars=";&|()")
    lexer.whitespace, lexer.commenters = " \t\r", ""  # newlines end commands
    lexer.wordchars += "$[]{}=/.,:-+*@%^~!#?"
    words, at_start, skipping = [], True, False
    for token in lexer:
        if token == "\n" or token in SEPARATORS:
            at_start, skipping = True, False
            continue
        if skipping or not at_start:
            continue
        if token in KEYWORDS:
            skipping = token in ("for", "select", "case")  # `for x in a b c`: no commands until `;` / newline
            continue
        if "=" in token.split("$")[0] and not token.startswith("="):  # VAR=value before a command
            continue
        words.append(token)
        at_start = False
    return words


def test_there_are_experiments():
    assert SCRIPTS, f"no run.sh under {EXPERIMENTS}"


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.parent.name)
def test_run_sh_parses(script):
    done = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.parent.name)
def test_run_sh_runs_only_lmlab(script):
    text = script.read_text()
    assert "$(" not in text and "`" not in text, f"{script}: command substitution runs commands the test cannot see"
    others = sorted({w for w in command_words(text) if w != "lmlab" and w not in BUILTINS})
    assert not others, f"{script} runs {others}: an experiment is lmlab commands only (add the feature to lmlab)"


def test_the_reader_finds_commands_that_are_not_lmlab():
    script = ("set -eu  # it's strict\n"
              'RUNS=${1:?usage: run.sh DIR}  # where\nSMALL="a=1\n  b=2"\n'
              'for s in 1 2; do lmlab train x=$s $SMALL; done && python glue.py\n'
              'lmlab eval "$RUNS/a" --probe copy | tee out.txt\nif [ -d x ]; then\n  echo ok > "$RUNS/#1"\nfi\n'
              'lmlab runs \\\n  "$RUNS" > list.md\n')
    assert command_words(script) == ["set", "lmlab", "python", "lmlab", "tee", "[", "echo", "lmlab"]
