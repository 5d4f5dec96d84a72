"""Multiple choice: the layouts of MMLU, CMMLU, C-Eval, ARC and HellaSwag, scoring checked by hand and
against transformers, chance level for random weights, and errors that name the file and row."""

import csv
import json
import lzma
from pathlib import Path

import numpy as np
import pytest
import torch

from evals_support import train_tiny
from lmlab import load_run
from lmlab.cli import main
from lmlab.errors import LmlabError
from lmlab.evals import choice
from lmlab.model.transformer import Transformer

DATA = Path(__file__).parent / "data" / "evals"


@pytest.fixture(scope="module")
def run_dir(small_corpus, data_cache, tmp_path_factory):
    return train_tiny(small_corpus, data_cache, tmp_path_factory.mktemp("runs"))


@pytest.fixture(scope="module")
def run(run_dir):
    return load_run(run_dir)


def bundled_rows(name="mmlu_dev"):
    with lzma.open(choice.DATA_DIR / f"{name}.csv.xz", "rt", encoding="utf-8") as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------- layouts


def test_bundled_sets_read_with_subjects():
    items, fmt = choice.read_items(choice.resolve_set("mmlu")[0])
    assert fmt == "mmlu" and len(items) == 1542 and len({i.subject for i in items}) == 57
    assert items[0].subject == "abstract_algebra" and items[0].choices == ["4", "8", "12", "6"] and items[0].answer == 0
    items, fmt = choice.read_items(choice.resolve_set("cmmlu")[0])
    assert fmt == "cmmlu" and len(items) == 2010 and len({i.subject for i in items}) == 67


def test_original_per_subject_layouts(tmp_path):
    rows = [r for r in bundled_rows("mmlu_dev") if r["subject"] == "anatomy"]
    mmlu = tmp_path / "anatomy_dev.csv"  # hendrycks/test: no header, subject in the file name
    with open(mmlu, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([[r["question"], r["A"], r["B"], r["C"], r["D"], r["answer"]] for r in rows])
    items, fmt = choice.read_items(mmlu)
    assert fmt == "mmlu" and len(items) == 5 and {i.subject for i in items} == {"anatomy"}
    assert [i.labels[i.answer] for i in items] == [r["answer"] for r in rows]

    zh = [r for r in bundled_rows("cmmlu_dev") if r["subject"] == "agronomy"]
    cmmlu = tmp_path / "agronomy.csv"  # haonan-li/CMMLU: header ,Question,A,B,C,D,Answer
    with open(cmmlu, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([["", "Question", "A", "B", "C", "D", "Answer"]] +
                                [[k, r["question"], r["A"], r["B"], r["C"], r["D"], r["answer"]] for k, r in enumerate(zh)])
    items, fmt = choice.read_items(cmmlu)
    assert fmt == "cmmlu" and items[0].question == zh[0]["question"] and items[0].subject == "agronomy"

    ceval = tmp_path / "agronomy_val.csv"  # C-Eval's layout: id,question,A,B,C,D,answer,explanation
    with open(ceval, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([["id", "question", "A", "B", "C", "D", "answer", "explanation"]] +
                                [[k, r["question"], r["A"], r["B"], r["C"], r["D"], r["answer"], ""] for k, r in enumerate(zh)])
    items, fmt = choice.read_items(ceval)
    assert fmt == "ceval" and items[0].subject == "agronomy" and len(items) == 5
    context, choices, delimiter = choice.build_prompt(items[0], fmt, "letter")
    assert context.startswith("以下是中国关于agronomy考试的单项选择题") and context.endswith("答案：")
    assert choices == ["A", "B", "C", "D"] and delimiter == ""


def test_arc_and_hellaswag_layouts():
    items, fmt = choice.read_items(DATA / "ARC-Easy-Train.jsonl")
    assert fmt == "arc" and len(items) == 8 and items[0].subject == "ARC-Easy"
    rocks = items[3]
    assert rocks.labels == ["1", "2", "3", "4"] and rocks.choices[rocks.answer] == "how they formed"
    items_hf, fmt = choice.read_items(DATA / "arc_challenge_hf.jsonl")
    assert fmt == "arc" and items_hf[0].choices[items_hf[0].answer] == "dry palms"
    context, choices, _ = choice.build_prompt(items_hf[0], "arc", "cloze")
    assert context == ("Question: George wants to warm his hands quickly by rubbing them. "
                       "Which skin surface will produce the most heat?\nAnswer:")
    assert choices[0] == "dry palms"

    items, fmt = choice.read_items(DATA / "hellaswag_sample.jsonl")
    assert fmt == "hellaswag" and [i.answer for i in items] == [3, 3, 3, 1, 2]
    assert [i.subject for i in items] == ["activitynet", "wikihow", "activitynet", "activitynet", "activitynet"]
    assert items[0].question == "Roof shingle removal: A man is sitting on a roof. He"  # lm-eval's preprocessing
    assert "[" not in items[1].question and "[" not in "".join(items[1].choices)


# ---------------------------------------------------------------- bad data


@pytest.mark.parametrize("name, text, message", [
    ("empty.csv", "", "is empty"),
    ("blank.jsonl", "\n\n", "is empty"),
    ("noanswer.csv", "subject,question,A,B,C,D\nx,q,a,b,c,d\n", "row 1 (header): missing column(s) answer"),
    ("letters.csv", "question,answer\nq,A\n", "missing column(s) choice columns"),
    ("outside.csv", "subject,question,A,B,C,D,answer\nx,q,a,b,c,d,A\nx,q2,a,b,c,d,E\n", "row 3: answer 'E' is not one of A, B, C, D"),
    ("blankanswer.csv", "id,question,A,B,C,D,answer\n1,q,a,b,c,d,\n", "row 2: answer '' is not one of"),
    ("short_dev.csv", "q,a,b,c,d,A\nq2,a,b,c,B\n", "row 2: 5 columns, expected 6 columns"),
    ("arc.jsonl", '{"question": {"stem": "q", "choices": [{"text": "a", "label": "A"}, {"text": "b", "label": "B"}]}, '
                  '"answerKey": "C"}\n', ":1: answerKey 'C' is not one of A, B"),
    ("arc2.jsonl", '{"question": "q", "answerKey": "A", "choices": {"text": ["a", "b"], "label": ["A", "B"]}}\n{oops\n',
     ":2 is not valid JSON"),
    ("hs.jsonl", '{"ctx": "c", "endings": ["a", "b", "c", "d"], "label": 7}\n', ":1: label 7 is not an index"),
    ("hs2.jsonl", '{"ctx": "c", "endings": ["a", "b"], "label": 0}\n{"endings": ["a", "b"], "label": 0}\n',
     ":2 has no 'ctx' field"),
    ("other.jsonl", '{"prompt": "x"}\n', "neither ARC"),
])
def test_bad_data_names_the_file_and_row(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    with pytest.raises(LmlabError) as error:
        choice.read_items(path)
    assert str(path) in str(error.value) and message in str(error.value)


def test_bad_choice_file_on_the_command_line_is_one_line(run_dir, tmp_path, capsys):
    path = tmp_path / "bad.csv"
    path.write_text("subject,question,A,B,C,D,answer\nx,q,a,b,c,d,Z\n", encoding="utf-8")
    assert main(["eval", str(run_dir), "--choice", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}, row 2: answer 'Z'" in err and err.count("\n") == 1
    assert main(["eval", str(run_dir), "--choice", "mmlu-test"]) == 2
    assert "does not exist (bundled sets: mmlu, mmlu-dev, cmmlu, cmmlu-dev)" in capsys.readouterr().err


# ---------------------------------------------------------------- scoring


def by_hand(model, tokenizer, context, continuation):
    """Sum of log-probabilities of the continuation's tokens after the context, one plain forward pass."""
    context_ids = tokenizer.encode(context)
    whole = tokenizer.encode(context + continuation)
    assert whole[:len(context_ids)] == context_ids
    ids = torch.tensor(whole[-65:])  # the 64-token model reads the last 64 tokens before the last target
    n = len(whole) - len(context_ids)
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids[None, :-1])[0].float(), -1)
    return sum(logprobs[len(ids) - 1 - n + k, ids[len(ids) - n + k]].item() for k in range(n))


def test_letter_scores_agree_with_a_hand_computation(run):
    items = [i for i in choice.read_items(choice.resolve_set("mmlu-dev")[0])[0] if i.subject == "astronomy"][:3]
    result = choice.choice_eval(run.model, run.tokenizer, items, "mmlu")
    for item, record in zip(items, result["records"]):
        prompt = (f"The following are multiple choice questions (with answers) about astronomy.\n\n{item.question}\n"
                  f"A. {item.choices[0]}\nB. {item.choices[1]}\nC. {item.choices[2]}\nD. {item.choices[3]}\nAnswer:")
        expected = [by_hand(run.model, run.tokenizer, prompt, f" {letter}") for letter in "ABCD"]
        assert record["logliks"] == pytest.approx(expected, abs=1e-4)
        assert record["predicted"] == int(np.argmax(expected))
    assert result["accuracy"] == np.mean([r["correct"] for r in result["records"]])


def test_cloze_scores_and_length_normalisation(run):
    items, fmt = choice.read_items(DATA / "ARC-Easy-Train.jsonl")
    plain = choice.choice_eval(run.model, run.tokenizer, items, fmt)
    assert plain["style"] == "cloze"
    by_chars = choice.choice_eval(run.model, run.tokenizer, items, fmt, norm="chars")
    by_tokens = choice.choice_eval(run.model, run.tokenizer, items, fmt, norm="tokens")
    for item, record, chars, tokens in zip(items, plain["records"], by_chars["records"], by_tokens["records"]):
        context = f"Question: {item.question}\nAnswer:"
        expected = [by_hand(run.model, run.tokenizer, context, " " + c) for c in item.choices]
        assert record["logliks"] == pytest.approx(expected, abs=1e-4)
        assert chars["predicted"] == int(np.argmax([x / len(c) for x, c in zip(expected, item.choices)]))
        n_tokens = [len(run.tokenizer.encode(context + " " + c)) - len(run.tokenizer.encode(context)) for c in item.choices]
        assert tokens["predicted"] == int(np.argmax([x / n for x, n in zip(expected, n_tokens)]))


def test_few_shot_prompts_use_other_items_of_the_same_subject():
    dev, _ = choice.read_items(choice.resolve_set("mmlu-dev")[0])
    val, _ = choice.read_items(choice.resolve_set("mmlu")[0])
    item = val[0]
    shots = choice.pick_shots(item, dev, 3)
    assert [s.subject for s in shots] == ["abstract_algebra"] * 3 and shots == dev[:3]
    context, _, _ = choice.build_prompt(item, "mmlu", "letter", shots)
    assert context.count("The following are multiple choice questions") == 1
    assert context.count("\nAnswer:") == 4 and context.count("\n\n") == 4
    assert f"{dev[0].question}\nA. {dev[0].choices[0]}" in context
    assert f"Answer: {dev[0].labels[dev[0].answer]}\n\n" in context
    assert item not in choice.pick_shots(item, val, 5)  # from the evaluated file itself: never the item


def test_random_weights_score_near_chance_on_a_four_choice_set(run):
    config = run.config.model
    torch.manual_seed(0)
    model = Transformer(config).eval()
    items, fmt = choice.read_items(choice.resolve_set("mmlu")[0])
    items = choice.limit_per_subject(items, 12)  # 669 questions; each letter is the answer of 22% to 28%
    result = choice.choice_eval(model, run.tokenizer, items, fmt)
    assert result["items"] == 669 and result["chance"] == 0.25
    assert abs(result["accuracy"] - 0.25) < 0.04


def test_choice_command_writes_accuracy_per_subject(run_dir, capsys):
    assert main(["eval", str(run_dir), "--choice", "mmlu", "--limit", "1", "--shots", "2"]) == 0
    result = json.loads((run_dir / "evals" / "choice-mmlu.json").read_text())
    assert result["items"] == 57 and len(result["subjects"]) == 57 and result["shots"] == 2
    assert result["fewshot_file"].endswith("mmlu_dev.csv.xz")
    assert 0 <= result["accuracy"] <= 1 and "records" not in result
    lines = (run_dir / "evals" / "choice-mmlu.items.jsonl").read_text().splitlines()
    assert len(lines) == 57 and len(json.loads(lines[0])["logliks"]) == 4
    assert "all (micro)" in capsys.readouterr().out


# ---------------------------------------------------------------- against transformers and lm-eval


def test_loglikelihoods_agree_with_transformers_on_the_exported_model(run, run_dir, tmp_path):
    transformers = pytest.importorskip("transformers")
    from lmlab.model.hf import load_hf_model
    from lmlab.rundir.hf import export_hf

    hf_dir = export_hf(run_dir, tmp_path / "hf")
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    items = choice.read_items(DATA / "arc_challenge_hf.jsonl")[0] + choice.read_items(choice.resolve_set("mmlu")[0])[0][:2]
    ours = choice.choice_eval(run.model, run.tokenizer, items[:3], "arc")["records"]
    ours += choice.choice_eval(run.model, run.tokenizer, items[3:], "mmlu")["records"]
    # the Hugging Face folder loaded by lmlab's own eval scores the same too
    folder_model, folder_tokenizer, _ = load_hf_model(hf_dir)
    from_folder = choice.choice_eval(folder_model, folder_tokenizer, items[:3], "arc")["records"]
    assert [r["logliks"] for r in from_folder] == [r["logliks"] for r in ours[:3]]
    for k, (item, record) in enumerate(zip(items, ours)):
        fmt, style = ("arc", "cloze") if k < 3 else ("mmlu", "letter")
        context, choices, delimiter = choice.build_prompt(item, fmt, style)
        for choice_text, loglik in zip(choices, record["logliks"]):
            context_ids = hf_tokenizer(context, add_special_tokens=False).input_ids
            whole = hf_tokenizer(context + delimiter + choice_text, add_special_tokens=False).input_ids
            ids = torch.tensor(whole[-65:])[None]
            n = len(whole) - len(context_ids)
            with torch.no_grad():
                logprobs = torch.log_softmax(hf_model(ids[:, :-1]).logits[0].float(), -1)
            expected = sum(logprobs[ids.shape[1] - 1 - n + j, ids[0, ids.shape[1] - n + j]].item() for j in range(n))
            assert loglik == pytest.approx(expected, abs=1e-4)


def test_lm_eval_harness_runs_the_exported_model_with_a_local_task(run, run_dir, tmp_path):
    """docs/lm-eval.md's recipe: the same accuracy as lmlab's own letter scoring (runs when lm-eval is installed)."""
    pytest.importorskip("lm_eval")
    import subprocess
    import sys

    from lmlab.rundir.hf import export_hf

    hf_dir = export_hf(run_dir, tmp_path / "hf")
    rows = [r for r in bundled_rows("mmlu_val") if r["subject"] in ("astronomy", "virology")]
    data = tmp_path / "mmlu_subset.csv"
    with open(data, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    template = (Path(__file__).parent.parent / "docs" / "lm-eval-mmlu.yaml").read_text(encoding="utf-8")
    (tasks / "lmlab_mmlu.yaml").write_text(template.replace("/path/to/mmlu_val.csv", str(data)), encoding="utf-8")
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
                           f"pretrained={hf_dir},dtype=float32", "--tasks", "lmlab_mmlu", "--include_path", str(tasks),
                           "--device", "cpu", "--batch_size", "8", "--output_path", str(out), "--log_samples"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    harness = json.loads(next(out.rglob("results*.json")).read_text())["results"]["lmlab_mmlu"]["acc,none"]
    samples = sorted((json.loads(line) for line in next(out.rglob("samples*.jsonl")).read_text().splitlines()),
                     key=lambda sample: sample["doc_id"])
    items, fmt = choice.read_items(data)
    ours = choice.choice_eval(run.model, run.tokenizer, items, fmt)
    assert harness == pytest.approx(ours["accuracy"], abs=1e-9)
    assert len(samples) == len(ours["records"]) == len(rows)
    for sample, record in zip(samples, ours["records"]):
        assert [float(r[0]) for r in sample["filtered_resps"]] == pytest.approx(record["logliks"], abs=1e-4)
