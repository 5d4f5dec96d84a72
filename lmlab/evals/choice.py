"""Multiple-choice benchmarks by log-likelihood: MMLU, CMMLU, C-Eval, ARC, HellaSwag.

Each choice is scored by the log-probability the model gives its text after
the prompt; the prediction is the most likely choice. Nothing is generated,
so the smallest model gets a score, and the scoring is the one the
benchmarks' own harnesses use (lm-eval-harness's `multiple_choice`).

Design choices:
- Two prompt styles. "letter" (MMLU's own protocol): the question, the
  lettered choices, "Answer:", and the choices are the letters " A" ... " D".
  "cloze": "Question: ...\\nAnswer:" and the choices are the answer texts
  themselves (how lm-eval scores ARC and HellaSwag, and fairer to small models,
  which rarely learn the letter format). Default: letter for the exam sets
  (MMLU, CMMLU, C-Eval), cloze for ARC and HellaSwag.
- The English letter prompt is lm-eval-harness's MMLU prompt, character for
  character, with its description line; the Chinese sets use CMMLU's and
  C-Eval's own description lines and "答案：" with no space before the letter.
- Few-shot: `shots` solved examples of the same subject (first in file order,
  never the item itself) from a few-shot file (the dev split; the bundled sets
  bring theirs) or else from the evaluated file, joined by blank lines.
- A prompt and a choice are tokenized together and split where the prompt's
  own tokens end (lm-eval's rule; trailing spaces move to the choice), so a
  merge across the boundary cannot bias a choice. No BOS token is added (as
  lm-eval does for these models); a prompt longer than the context keeps its
  end (`lmlab.evals.scoring` slides the window).
- Choices of one token after a shared prompt (the letters) are read off one
  forward pass; longer choices get a pass each (batched). Same numbers, and
  letter-style MMLU costs a quarter.
- Length normalisation: none (sum of log-probabilities), chars (divided by the
  choice's characters: lm-eval's acc_norm), tokens (divided by its tokens).
- Input layouts, detected from the file (or `format`): MMLU CSV (original
  per-subject files without a header: question, A, B, C, D, answer; or with a
  header, optionally a subject column), CMMLU CSV (header ,Question,A,B,C,D,Answer),
  C-Eval CSV (id,question,A,B,C,D,answer,explanation), ARC JSONL (question.stem,
  question.choices[].text/label, answerKey; or the Hugging Face flat layout),
  HellaSwag JSONL (ctx / ctx_a + ctx_b, endings, label). The subject is the
  subject column, else the file name without _dev / _val / _test (HellaSwag:
  its source, activitynet or wikihow). Compressed files (.gz, .xz) are fine.
- Bad data stops with one line naming the file and the row (spreadsheet
  numbering: the header is row 1) or line (JSONL).
"""

import csv
import io
import json
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lmlab.data.documents import json_rows
from lmlab.errors import LmlabError
from lmlab.evals.scoring import next_token_logprobs, score

FORMATS = ("auto", "mmlu", "cmmlu", "ceval", "arc", "hellaswag")
STYLES = ("auto", "letter", "cloze")
NORMS = ("none", "chars", "tokens")
DATA_DIR = Path(__file__).parent / "data"
# bundled sets: name -> (items file, few-shot file)
BUNDLED = {
    "mmlu": ("mmlu_val.csv.xz", "mmlu_dev.csv.xz"),
    "mmlu-dev": ("mmlu_dev.csv.xz", None),
    "cmmlu": ("cmmlu_test_subset.csv.xz", "cmmlu_dev.csv.xz"),
    "cmmlu-dev": ("cmmlu_dev.csv.xz", None),
}
CHINESE = ("cmmlu", "ceval")


@dataclass
class Item:
    question: str
    choices: list[str]
    answer: int  # index into choices
    subject: str
    labels: list[str] = field(default_factory=list)  # A, B, C, D (or the file's own labels)
    where: str = ""  # file and row, for messages


# ---------------------------------------------------------------- reading


def resolve_set(name_or_path):
    """(items file, few-shot file or None) for a bundled set name or a path."""
    if name_or_path in BUNDLED:
        items, fewshot = BUNDLED[name_or_path]
        return DATA_DIR / items, (DATA_DIR / fewshot if fewshot else None)
    path = Path(name_or_path).expanduser()
    if not path.is_file():
        bundled = ", ".join(BUNDLED)
        raise LmlabError(f"multiple-choice file {path} does not exist (bundled sets: {bundled})")
    return path, None


def _read_text(path):
    from lmlab.data.documents import COMPRESSED
    from lmlab.data.documents import file_kind

    path = Path(path)
    _, compression = file_kind(path)
    try:
        with open(path, "rb") as raw:
            data = (COMPRESSED[compression](raw) if compression else raw).read()
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise LmlabError(f"{path} is not UTF-8 text; re-encode it as UTF-8") from None
    except (OSError, EOFError) as e:
        raise LmlabError(f"cannot read {path}: {e}") from None


def base_name(path):
    """A data file's name without its format and compression suffixes: ARC-Easy-Test.jsonl.gz -> ARC-Easy-Test."""
    name = Path(path).name
    for suffix in (".gz", ".xz", ".bz2", ".csv", ".jsonl", ".json", ".ndjson", ".txt"):
        name = name.removesuffix(suffix)
    return name


def _subject_from_name(path):
    return re.sub(r"([_-](dev|val|valid|validation|test|train))+$", "", base_name(path), flags=re.I)


def detect_format(path, text):
    """mmlu / cmmlu / ceval for CSV, arc / hellaswag for JSONL, from the content."""
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise LmlabError(f"{path} is empty: no multiple-choice items")
    if lines[0].lstrip().startswith("{"):
        try:
            first = json.loads(lines[0])
        except json.JSONDecodeError:
            raise LmlabError(f"{path}:1 is not valid JSON; a .jsonl file holds one JSON object per line") from None
        if "endings" in first:
            return "hellaswag"
        if "question" in first and ("answerKey" in first or "choices" in first):
            return "arc"
        raise LmlabError(f"{path}:1 has fields {', '.join(first)}: neither ARC (question, answerKey) nor "
                         "HellaSwag (ctx, endings, label); pass --format")
    header = [h.strip().lower() for h in next(csv.reader([lines[0]]))]
    if header and header[0] == "id":
        return "ceval"
    sample = "".join(lines[:20])
    return "cmmlu" if re.search(r"[\u4e00-\u9fff]", sample) else "mmlu"


def _csv_items(path, text):
    rows = csv.reader(io.StringIO(text))
    try:
        first = next(rows)
    except StopIteration:
        raise LmlabError(f"{path} is empty: no multiple-choice items") from None
    names = [h.strip().lower() for h in first]
    has_header = "question" in names or "answer" in names
    if has_header:
        letters = [h for h in names if len(h) == 1 and h.isalpha()]
        missing = [c for c in ("question", "answer") if c not in names]
        if len(letters) < 2:
            missing.append("choice columns A, B, ...")
        if missing:
            raise LmlabError(f"{path}, row 1 (header): missing column(s) {', '.join(missing)} "
                             f"(columns: {', '.join(first)})")
        column = {name: i for i, name in enumerate(names) if name}
        choice_columns = [column[c] for c in letters]
        labels = [c.upper() for c in letters]
        start = 2
    else:
        column, choice_columns, labels = {"question": 0, "answer": 5}, [1, 2, 3, 4], list("ABCD")
        rows = iter([first, *rows])
        start = 1
    items, default_subject = [], _subject_from_name(path)
    for number, row in enumerate(rows, start=start):
        if not any(cell.strip() for cell in row):
            continue
        width = max(column.values()) + 1
        if len(row) < width:
            layout = "the header's columns" if has_header else "6 columns: question, A, B, C, D, answer"
            raise LmlabError(f"{path}, row {number}: {len(row)} columns, expected {layout}")
        answer = row[column["answer"]].strip().upper()
        if answer not in labels:
            raise LmlabError(f"{path}, row {number}: answer {row[column['answer']]!r} is not one of "
                             f"{', '.join(labels)}")
        subject = row[column["subject"]].strip() if "subject" in column else default_subject
        items.append(Item(question=row[column["question"]].strip(), choices=[row[i].strip() for i in choice_columns],
                          answer=labels.index(answer), subject=subject, labels=labels, where=f"{path}, row {number}"))
    return items


def _jsonl_rows(path, text):
    return json_rows(path, enumerate(text.splitlines(), start=1))


def _need(path, number, row, *keys):
    missing = [k for k in keys if k not in row]
    if missing:
        raise LmlabError(f"{path}:{number} has no {', '.join(repr(k) for k in missing)} field "
                         f"(fields: {', '.join(row)})")


def _arc_items(path, text):
    items, subject = [], _subject_from_name(path)
    for number, row in _jsonl_rows(path, text):
        _need(path, number, row, "question", "answerKey")
        question = row["question"]
        if isinstance(question, dict):  # the original AI2 layout
            _need(path, number, question, "stem", "choices")
            stem, choices = question["stem"], question["choices"]
            texts, labels = [c.get("text", "") for c in choices], [str(c.get("label", "")) for c in choices]
        else:  # the Hugging Face datasets layout
            _need(path, number, row, "choices")
            stem, texts, labels = question, row["choices"].get("text", []), [str(x) for x in row["choices"].get("label", [])]
        if len(texts) < 2 or len(texts) != len(labels):
            raise LmlabError(f"{path}:{number}: needs at least two choices, each with a text and a label")
        answer = str(row["answerKey"]).strip()
        if answer not in labels:
            raise LmlabError(f"{path}:{number}: answerKey {row['answerKey']!r} is not one of {', '.join(labels)}")
        items.append(Item(question=str(stem).strip(), choices=[str(t).strip() for t in texts],
                          answer=labels.index(answer), subject=subject, labels=labels, where=f"{path}:{number}"))
    return items


def _hellaswag_clean(text):
    """lm-eval-harness's HellaSwag preprocessing: WikiHow markup out, double spaces collapsed."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _hellaswag_items(path, text):
    items = []
    for number, row in _jsonl_rows(path, text):
        _need(path, number, row, "endings", "label")
        if "ctx_a" in row and "ctx_b" in row:
            context = row["ctx_a"] + " " + row["ctx_b"].capitalize()
        else:
            _need(path, number, row, "ctx")
            context = row["ctx"]
        query = _hellaswag_clean(f"{row.get('activity_label', '')}: {context}" if row.get("activity_label") else context)
        endings = [_hellaswag_clean(e) for e in row["endings"]]
        try:
            answer = int(row["label"])
        except (TypeError, ValueError):
            answer = -1
        if not 0 <= answer < len(endings):
            raise LmlabError(f"{path}:{number}: label {row['label']!r} is not an index of its "
                             f"{len(endings)} endings (0..{len(endings) - 1})")
        subject = str(row.get("source_id", "")).split("~")[0] or _subject_from_name(path)
        items.append(Item(question=query, choices=endings, answer=answer, subject=subject,
                          labels=[str(i) for i in range(len(endings))], where=f"{path}:{number}"))
    return items


def read_items(path, fmt="auto"):
    """(items, format) of a multiple-choice file."""
    if fmt not in FORMATS:
        raise LmlabError(f"unknown multiple-choice format {fmt!r}; choose one of {', '.join(FORMATS)}")
    text = _read_text(path)
    fmt = detect_format(path, text) if fmt == "auto" else fmt
    reader = {"arc": _arc_items, "hellaswag": _hellaswag_items}.get(fmt, _csv_items)
    items = reader(path, text)
    if not items:
        raise LmlabError(f"{path} holds no multiple-choice items")
    return items, fmt


# ---------------------------------------------------------------- prompts


def _description(fmt, subject):
    name = subject.replace("_", " ")
    if fmt == "cmmlu":
        return f"以下是关于{name}的单项选择题，请直接给出正确答案的选项。\n\n"
    if fmt == "ceval":
        return f"以下是中国关于{name}考试的单项选择题，请选出其中的正确答案。\n\n"
    return f"The following are multiple choice questions (with answers) about {name}.\n\n"


def _query(item, fmt, style):
    """The prompt of one item (without few-shot examples or description)."""
    if fmt == "hellaswag" and style == "cloze":
        return item.question
    chinese = fmt in CHINESE
    if style == "letter":
        lines = [item.question] + [f"{label}. {choice}" for label, choice in zip(item.labels, item.choices)]
        return "\n".join(lines) + ("\n答案：" if chinese else "\nAnswer:")
    return f"问题：{item.question}\n答案：" if chinese else f"Question: {item.question}\nAnswer:"


def _choices(item, style):
    return list(item.labels) if style == "letter" else list(item.choices)


def build_prompt(item, fmt, style, shots=()):
    """(context, [choice strings], delimiter): choice i is scored as context + delimiter + choices[i]."""
    delimiter = "" if fmt in CHINESE else " "
    parts = [_query(shot, fmt, style) + delimiter + _choices(shot, style)[shot.answer] for shot in shots]
    description = _description(fmt, item.subject) if style == "letter" else ""
    context = description + "".join(p + "\n\n" for p in parts) + _query(item, fmt, style)
    return context, _choices(item, style), delimiter


def encode_pair(tokenizer, context, continuation):
    """(context ids, continuation ids) split where the context's own tokens end, as lm-eval does."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode(context + continuation)
    context_ids = tokenizer.encode(context)
    if whole[:len(context_ids)] != context_ids:  # the boundary merged: fall back to separate encodings
        return context_ids, tokenizer.encode(continuation)
    return context_ids, whole[len(context_ids):]


def pick_shots(item, pool, shots):
    """The first `shots` examples of the item's subject in the pool (never the item), then of other subjects."""
    if shots <= 0:
        return []
    same = [p for p in pool if p.subject == item.subject and p is not item and p.question != item.question]
    other = [p for p in pool if p.subject != item.subject]
    return (same + other)[:shots]


# ---------------------------------------------------------------- scoring


def choice_eval(model, tokenizer, items, fmt, style="auto", shots=0, fewshot_items=None, norm="none",
                device=None, precision="fp32"):
    """Accuracy overall and per subject; also one record per item (the log-likelihood of every choice)."""
    if style not in STYLES:
        raise LmlabError(f"unknown prompt style {style!r}; choose one of {', '.join(STYLES)}")
    if norm not in NORMS:
        raise LmlabError(f"unknown length normalisation {norm!r}; choose one of {', '.join(NORMS)}")
    if shots < 0:
        raise LmlabError(f"shots must be >= 0, got {shots}")
    style = ("letter" if fmt in ("mmlu", "cmmlu", "ceval") else "cloze") if style == "auto" else style
    pool = fewshot_items if fewshot_items is not None else items
    sequences, shared, plans = [], [], []
    for item in items:
        context, choices, delimiter = build_prompt(item, fmt, style, pick_shots(item, pool, shots))
        pairs = [encode_pair(tokenizer, context, delimiter + choice) for choice in choices]
        if any(not choice_ids for _, choice_ids in pairs):
            raise LmlabError(f"{item.where}: a choice is empty, so it cannot be scored")
        pairs = [(context_ids or [tokenizer.eot_id], choice_ids) for context_ids, choice_ids in pairs]
        one_pass = all(len(c) == 1 and ctx == pairs[0][0] for ctx, c in pairs)
        if one_pass:  # one-token choices after one context (the letters): one forward pass scores them all
            shared.append((pairs[0][0], [c[0] for _, c in pairs]))
        else:
            sequences += [(ctx + c, len(ctx)) for ctx, c in pairs]
        plans.append((one_pass, [(len(c), len(choice)) for (_, c), choice in zip(pairs, choices)]))
    scored = iter(score(model, sequences, device=device, precision=precision))
    scored_shared = iter(next_token_logprobs(model, shared, device=device, precision=precision))

    records, by_subject = [], defaultdict(list)
    for item, (one_pass, lengths) in zip(items, plans):
        if one_pass:
            logliks = [float(x) for x in next(scored_shared)]
        else:
            logliks = [float(next(scored).logprobs.sum()) for _ in lengths]
        divisors = [{"none": 1, "chars": max(n_chars, 1), "tokens": n_tokens}[norm] for n_tokens, n_chars in lengths]
        predicted = int(np.argmax([x / d for x, d in zip(logliks, divisors)]))
        correct = predicted == item.answer
        by_subject[item.subject].append(correct)
        records.append({"subject": item.subject, "answer": item.answer, "predicted": predicted,
                        "correct": correct, "logliks": [round(x, 6) for x in logliks]})
    subjects = {s: {"items": len(v), "accuracy": sum(v) / len(v)} for s, v in sorted(by_subject.items())}
    return {
        "kind": "choice", "format": fmt, "style": style, "shots": shots, "norm": norm,
        "items": len(items), "accuracy": sum(r["correct"] for r in records) / len(records),
        "macro_accuracy": float(np.mean([s["accuracy"] for s in subjects.values()])),
        "chance": float(np.mean([1 / len(item.choices) for item in items])),
        "subjects": subjects, "records": records,
    }


def limit_per_subject(items, limit):
    """The first `limit` items of every subject (all when limit is 0)."""
    if not limit:
        return items
    seen = defaultdict(int)
    kept = []
    for item in items:
        seen[item.subject] += 1
        if seen[item.subject] <= limit:
            kept.append(item)
    return kept
