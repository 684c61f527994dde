"""Readers for the published benchmark files, and the prompts lm-evaluation-harness builds from them.

Layouts (a file, or a folder holding them; see `find_files`):

    mmlu       {split}/{subject}_{split}.csv      no header: question,A,B,C,D,answer
    ceval      {split}/{subject}_{split}.csv      header: id,question,A,B,C,D,answer[,explanation]
    cmmlu      {split}/{subject}.csv              header: ,Question,A,B,C,D,Answer
    arc        *-{Split}.jsonl                    question (str, or AI2's {stem, choices}),
                                                  choices {text: [...], label: [...]}, answerKey
    hellaswag  hellaswag_{split}.jsonl            ctx_a, ctx_b (or ctx), activity_label, endings, label
    gsm8k      {split}.jsonl                      question, answer ("… #### 42")

Each item becomes a `Doc`: the prompt text (lm-eval's `doc_to_text`), the choices scored as
continuations (`doc_to_choice`), the gold index, and the delimiter put between them. The prompts
are exactly those of lm-eval 0.4's tasks `mmlu_*`, `ceval-valid_*`, `cmmlu_*`, `arc_easy`,
`hellaswag` and `gsm8k`, so scores can be compared with it (tests/test_bench_parity.py checks).

`--style cloze` (CSV layouts) scores the answer *texts* after the bare question instead of the
letters A–D — what a small base model can do before it learns the letter format. Its delimiter
is a space after a Latin letter, digit or punctuation and nothing after a CJK character.

C-Eval and CMMLU name subjects in Chinese in their descriptions; put the C-Eval
`subject_mapping.json` ({"subject": ["English", "中文", "category"], …}) next to the split
folders and its Chinese names are used, else the file's subject name.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from tiaoyu_cli.data.jsonl import iter_jsonl
from tiaoyu_cli.errors import DataError, TiaoyuError

TASKS = ("ceval", "cmmlu", "mmlu", "arc", "hellaswag", "gsm8k")
CSV_TASKS = ("ceval", "cmmlu", "mmlu")
LETTERS = ("A", "B", "C", "D")
DEFAULT_SPLIT = {"ceval": "val", "cmmlu": "test", "mmlu": "test", "arc": "test", "hellaswag": "val", "gsm8k": "test"}
FEWSHOT_SPLIT = {"ceval": "dev", "cmmlu": "dev", "mmlu": "dev", "arc": "train", "hellaswag": "train", "gsm8k": "train"}
SPLIT_WORDS = {"val": ("val", "validation"), "validation": ("val", "validation"), "test": ("test",),
               "dev": ("dev",), "train": ("train",)}
CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff00-\uffef\u3000-\u303f]")


@dataclass
class Doc:
    subject: str
    text: str  # the prompt of this item (lm-eval doc_to_text)
    choices: list[str]  # continuations scored, without the delimiter (doc_to_choice)
    gold: int  # index into choices (multiple choice); -1 for generation tasks
    where: str  # "file:row", for messages
    delimiter: str = " "  # target_delimiter
    raw: str = ""  # question and right answer as plain text (contamination checks)
    target: str = ""  # generation tasks: the reference answer text (GSM8K: the whole solution)
    extra: dict = field(default_factory=dict)

    def answer_text(self) -> str:
        return self.choices[self.gold] if self.gold >= 0 else self.target


# ---- finding files ------------------------------------------------------------------------------

def _split_of(path: Path) -> set[str]:
    words = set(re.split(r"[-_.\s]+", path.stem.lower()))
    words |= {path.parent.name.lower()}
    return words


def find_files(path: str | Path, task: str, split: str) -> list[Path]:
    """The files of `split` under `path`: a file is taken as is; a folder's `{split}/` subfolder,
    else its files whose name (or folder) holds the split word (val/validation, test, dev, train)."""
    p = Path(path)
    ext = ".csv" if task in CSV_TASKS else ".jsonl"
    if not p.exists():
        raise TiaoyuError(f"{p}: no such file or folder")
    if p.is_file():
        return [p]
    words = SPLIT_WORDS.get(split, (split,))
    for w in words:
        if (p / w).is_dir():
            files = sorted(f for f in (p / w).iterdir() if f.suffix == ext)
            if files:
                return files
    files = sorted(f for f in p.rglob(f"*{ext}") if _split_of(f) & set(words))
    if not files:
        raise TiaoyuError(f"{p}: no {ext} files of split '{split}' (looked for {p}/{words[0]}/ and file names "
                          f"holding '{words[0]}'); give a file or --split")
    return files


def fewshot_files(path: str | Path, task: str, split: str, eval_files: list[Path]) -> list[Path]:
    """Few-shot files: the `split` files next to the evaluated ones (a file's sibling `dev/` folder…)."""
    p = Path(path)
    base = p.parent.parent if p.is_file() and p.parent.name.lower() in sum(SPLIT_WORDS.values(), ()) else \
        (p.parent if p.is_file() else p)
    try:
        return find_files(base, task, split)
    except TiaoyuError:
        raise TiaoyuError(f"--shots needs the '{split}' split next to {p} (e.g. {base}/{split}/); "
                          f"give --fewshot-split or --shots 0") from None


def subject_of(path: Path, task: str) -> str:
    stem = path.stem
    for w in ("_dev", "_val", "_test", "_train", "_validation"):
        if task in ("ceval", "mmlu") and stem.endswith(w):
            return stem[: -len(w)]
    return stem


def subject_names(files: list[Path]) -> dict[str, str]:
    """C-Eval style subject_mapping.json (subject -> [en, zh, category]) found near the files."""
    for f in files[:1]:
        for d in (f.parent, f.parent.parent, f.parent.parent.parent):
            m = d / "subject_mapping.json"
            if m.is_file():
                try:
                    data = json.loads(m.read_text(encoding="utf-8"))
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    raise TiaoyuError(f"{m}: corrupt JSON ({e})") from None
                return {k: (v[1] if isinstance(v, list) and len(v) > 1 else str(v)) for k, v in data.items()}
    return {}


# ---- CSV layouts: C-Eval, CMMLU, MMLU ----------------------------------------------------------

def _read_csv_rows(path: Path, task: str) -> list[tuple[int, dict]]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"invalid UTF-8 ({e.reason})", str(path)) from None
    reader = csv.reader(text.splitlines(keepends=True))
    rows: list[tuple[int, list[str]]] = []  # (first line of the row, fields): quoted fields may span lines
    prev = 0
    for row in reader:
        rows.append((prev + 1, row))
        prev = reader.line_num
    if task == "mmlu":
        header, body = ["question", "A", "B", "C", "D", "answer"], rows
    else:
        if not rows:
            raise DataError("empty file (no header, no rows)", str(path))
        header = [h.strip() for h in rows[0][1]]
        body = rows[1:]
        q = "question" if task == "ceval" else "Question"
        a = "answer" if task == "ceval" else "Answer"
        for need in (q, *LETTERS, a):
            if need not in header:
                raise DataError(f"missing column '{need}' (header has {header})", str(path), 1)
    out = []
    for line, row in body:
        if not any(c.strip() for c in row):
            continue
        if len(row) < len(header):
            raise DataError(f"{len(row)} columns, expected {len(header)} ({', '.join(header)}): missing column "
                            f"'{header[len(row)]}'", str(path), line)
        out.append((line, dict(zip(header, row))))
    if not out:
        raise DataError("empty file: no question rows", str(path))
    return out


def _cloze_delimiter(text: str) -> str:
    return "" if not text or CJK.match(text[-1]) or text[-1].isspace() else " "


def read_csv_docs(path: Path, task: str, style: str = "letters", names: dict[str, str] | None = None) -> list[Doc]:
    subject = subject_of(path, task)
    qkey, akey = ("Question", "Answer") if task == "cmmlu" else ("question", "answer")
    docs = []
    for line, r in _read_csv_rows(path, task):
        ans = r[akey].strip()
        where = f"{path}:{line}"
        if not ans:
            raise DataError("no answer (test splits whose answers are hidden, like C-Eval's, cannot be scored: "
                            "use --split val)", str(path), line, akey)
        if ans not in LETTERS:
            raise DataError(f"answer {ans!r} is not one of A, B, C, D", str(path), line, akey)
        opts = [r[k] for k in LETTERS]
        q = r[qkey].strip()
        if style == "cloze":
            text, choices, delim = q, [o.strip() for o in opts], _cloze_delimiter(q)
        elif task == "mmlu":
            text = f"{q}\nA. {opts[0]}\nB. {opts[1]}\nC. {opts[2]}\nD. {opts[3]}\nAnswer:"
            choices, delim = list(LETTERS), " "
        else:
            text = f"{q}\nA. {opts[0]}\nB. {opts[1]}\nC. {opts[2]}\nD. {opts[3]}\n答案："
            choices, delim = list(LETTERS), " "
        docs.append(Doc(subject, text, choices, LETTERS.index(ans), where, delim,
                        raw=q + "\n" + opts[LETTERS.index(ans)]))
    return docs


def description(task: str, subject: str, names: dict[str, str], style: str) -> str:
    """lm-eval's per-subject `description`, put before the few-shot examples."""
    if style == "cloze":
        return ""
    if task == "mmlu":
        return f"The following are multiple choice questions (with answers) about {' '.join(subject.split('_'))}.\n\n"
    name = names.get(subject, subject)
    if task == "ceval":
        return f"以下是中国关于{name}考试的单项选择题，请选出其中的正确答案。\n\n"
    if task == "cmmlu":
        return f"以下是关于{name}的单项选择题，请直接给出正确答案的选项。\n\n"
    return ""


# ---- JSONL layouts: ARC, HellaSwag, GSM8K -------------------------------------------------------

def _need(rec: dict, key: str, path: Path, line: int):
    if key not in rec:
        raise DataError(f"missing column '{key}'", str(path), line)
    return rec[key]


def _arc_doc(rec: dict, path: Path, line: int) -> Doc:
    q = _need(rec, "question", path, line)
    if isinstance(q, dict):  # AI2's own layout: {"question": {"stem", "choices": [{"text", "label"}]}}
        stem = q.get("stem")
        ch = q.get("choices")
        if not isinstance(stem, str) or not isinstance(ch, list):
            raise DataError("question must hold 'stem' and a 'choices' list", str(path), line, "question")
        texts, labels = [c.get("text", "") for c in ch], [str(c.get("label", "")) for c in ch]
        q = stem
    else:
        ch = _need(rec, "choices", path, line)
        if not isinstance(ch, dict) or not isinstance(ch.get("text"), list) or not isinstance(ch.get("label"), list):
            raise DataError("choices must be {\"text\": [...], \"label\": [...]}", str(path), line, "choices")
        texts, labels = ch["text"], [str(x) for x in ch["label"]]
    key = str(_need(rec, "answerKey", path, line))
    if key not in labels:
        raise DataError(f"answerKey {key!r} is not one of the labels {labels}", str(path), line, "answerKey")
    if len(texts) != len(labels) or len(texts) < 2:
        raise DataError("choices need as many texts as labels, at least two", str(path), line, "choices")
    return Doc(path.stem, f"Question: {q}\nAnswer:", [str(t) for t in texts], labels.index(key), f"{path}:{line}",
               raw=f"{q}\n{texts[labels.index(key)]}")


def hellaswag_preprocess(text: str) -> str:
    """lm-eval's hellaswag `preprocess`: strip, WikiHow bracket artifacts out, double spaces single."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _hellaswag_doc(rec: dict, path: Path, line: int) -> Doc:
    if "ctx_a" in rec:
        ctx = str(rec["ctx_a"]) + " " + str(rec.get("ctx_b", "")).capitalize()
    else:
        ctx = str(_need(rec, "ctx", path, line))
    label = rec.get("activity_label")
    query = hellaswag_preprocess(f"{label}: {ctx}" if label else ctx)
    endings = _need(rec, "endings", path, line)
    if not isinstance(endings, list) or len(endings) < 2:
        raise DataError("endings must be a list of at least two strings", str(path), line, "endings")
    lab = _need(rec, "label", path, line)
    try:
        gold = int(lab)
    except (TypeError, ValueError):
        raise DataError(f"label {lab!r} is not a number (the test split has no labels)", str(path), line,
                        "label") from None
    if not 0 <= gold < len(endings):
        raise DataError(f"label {gold} is out of range for {len(endings)} endings", str(path), line, "label")
    return Doc(path.stem, query, [hellaswag_preprocess(str(e)) for e in endings], gold, f"{path}:{line}",
               raw=f"{query} {endings[gold]}")


GSM8K_ANSWER = re.compile(r"#### (\-?[0-9\.\,]+)")


def _gsm8k_doc(rec: dict, path: Path, line: int) -> Doc:
    q, a = _need(rec, "question", path, line), _need(rec, "answer", path, line)
    m = GSM8K_ANSWER.search(str(a))
    if not m:
        raise DataError("answer does not end in '#### N'", str(path), line, "answer")
    return Doc(path.stem, f"Question: {q}\nAnswer:", [], -1, f"{path}:{line}", raw=f"{q}\n{a}", target=str(a),
               extra={"number": m.group(1)})


def read_jsonl_docs(path: Path, task: str) -> list[Doc]:
    make = {"arc": _arc_doc, "hellaswag": _hellaswag_doc, "gsm8k": _gsm8k_doc}[task]
    docs = [make(rec, path, line) for line, rec in iter_jsonl(path)]
    if not docs:
        raise DataError("empty file: no records", str(path))
    return docs


def read_docs(files: list[Path], task: str, style: str = "letters") -> list[Doc]:
    if task not in TASKS:
        raise TiaoyuError(f"--task {task!r}: choose one of {', '.join(TASKS)}")
    if style not in ("letters", "cloze"):
        raise TiaoyuError(f"--style {style!r}: choose letters or cloze")
    docs: list[Doc] = []
    for f in files:
        docs += read_csv_docs(f, task, style) if task in CSV_TASKS else read_jsonl_docs(f, task)
    return docs


def fewshot_prefix(task: str, subject: str, shots: list[Doc], names: dict[str, str], style: str) -> str:
    """description + each example as text + delimiter + answer + "\\n\\n" (lm-eval's fewshot_context)."""
    out = description(task, subject, names, style)
    for d in shots:
        out += d.text + d.delimiter + d.answer_text() + "\n\n"
    return out
