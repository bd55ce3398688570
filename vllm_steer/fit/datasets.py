"""Labelled completions for fitting probes and steering vectors, and the splits they are fitted on.

Every loader returns a list of :class:`LabeledCompletion`: a prompt, one completion of it, and a
label (1 = desired/true, 0 = undesired/false). ``group`` names the question the completion answers;
all completions of one question share it, and every split here keeps a group on one side only, so a
probe is never validated on answers to a question it was trained on.

Loaders validate the whole file before returning anything: a problem raises :class:`DatasetError`
naming the file, the entry/row/line and the offending key or column (``error.field``).

Formats:

* TruthfulQA ``mc_task.json`` (:func:`load_truthfulqa_mc`): a list of
  ``{"question", "mc1_targets", "mc2_targets"}``; every answer of ``mc2_targets`` (all true and all
  false answers) becomes one completion. Group = the entry's index.
* TruthfulQA ``TruthfulQA.csv`` (:func:`load_truthfulqa_csv`): columns ``Question``, ``Best Answer``,
  ``Correct Answers``, ``Incorrect Answers`` (``Type``, ``Category``, ``Source`` are not needed);
  answers are separated by ``;``. Group = the row's index (0 = first data row).
* JSONL (:func:`load_jsonl`): one object a line, either ``{"prompt", "positive", "negative"}`` (two
  completions, labels 1 and 0) or ``{"prompt", "completion", "label"}``; an optional ``"group"``
  (or ``"id"``) key names the group, otherwise the line number does.

TruthfulQA prompts have ITI's form: prompt ``"Q: {question} A:"``, completion ``" {answer}"``.
"""

from __future__ import annotations

import csv
import io
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from vllm_steer.errors import SteeringError

TRUTHFULQA_JSON_NAME = "mc_task.json"
TRUTHFULQA_CSV_NAME = "TruthfulQA.csv"
TRUTHFULQA_CSV_COLUMNS = ("Question", "Best Answer", "Correct Answers", "Incorrect Answers")


@dataclass(frozen=True)
class LabeledCompletion:
    group: str  # question/prompt id; splits never put one group on both sides
    prompt: str
    completion: str  # appended to the prompt verbatim (carries its own leading space)
    label: int  # 1 = desired/true, 0 = undesired/false


class DatasetError(SteeringError):
    """A dataset file is missing, unreadable or malformed; ``field`` names the key, column or path."""


def qa_prompt(question: str) -> str:
    """ITI's prompt for a question: ``"Q: {question} A:"`` (the answer follows as ``" {answer}"``)."""
    return f"Q: {question} A:"


# ----------------------------------------------------------------------------------------- loaders


def load_dataset(path: str | Path) -> list[LabeledCompletion]:
    """Load labelled completions, choosing the format by suffix.

    ``.jsonl`` -> :func:`load_jsonl`; ``.json``, ``.csv`` or a folder -> :func:`load_truthfulqa`.
    """
    p = Path(path)
    if p.is_dir() or p.suffix.lower() in (".json", ".csv"):
        return load_truthfulqa(p)
    if p.suffix.lower() == ".jsonl":
        return load_jsonl(p)
    _require_file(p)
    raise DatasetError(
        f"{p}: unknown dataset format {p.suffix or '(no suffix)'!r}; expected .jsonl, .json (TruthfulQA "
        f"mc_task.json), .csv (TruthfulQA.csv) or a folder holding one of those",
        field=str(p),
    )


def load_truthfulqa(path: str | Path) -> list[LabeledCompletion]:
    """TruthfulQA from ``mc_task.json``, ``TruthfulQA.csv``, or a folder holding one of them.

    A folder picks ``mc_task.json`` inside it, or ``TruthfulQA.csv`` when there is no JSON file.
    """
    p = Path(path)
    if p.is_dir():
        for name, loader in ((TRUTHFULQA_JSON_NAME, load_truthfulqa_mc), (TRUTHFULQA_CSV_NAME, load_truthfulqa_csv)):
            if (p / name).is_file():
                return loader(p / name)
        raise DatasetError(
            f"{p}: folder holds neither {TRUTHFULQA_JSON_NAME} nor {TRUTHFULQA_CSV_NAME}", field=str(p)
        )
    if p.suffix.lower() == ".json":
        return load_truthfulqa_mc(p)
    if p.suffix.lower() == ".csv":
        return load_truthfulqa_csv(p)
    _require_file(p)
    raise DatasetError(f"{p}: TruthfulQA must be a .json or .csv file or a folder", field=str(p))


def load_truthfulqa_mc(path: str | Path) -> list[LabeledCompletion]:
    """TruthfulQA's ``mc_task.json``: one completion per ``mc2_targets`` answer (label = its 0/1)."""
    p = Path(path)
    text = _read_text(p)
    try:
        entries = json.loads(text)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{p}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}", field=str(p)) from e
    if not isinstance(entries, list):
        raise DatasetError(f"{p}: expected a JSON list of questions, got {type(entries).__name__}", field=str(p))
    if not entries:
        raise DatasetError(f"{p}: no questions (the list is empty)", field=str(p))
    examples: list[LabeledCompletion] = []
    for i, entry in enumerate(entries):
        where = f"{p}, entry {i}"
        if not isinstance(entry, dict):
            raise DatasetError(f"{where}: expected an object, got {type(entry).__name__}", field=str(p))
        question = _text(_key(entry, "question", where), where, "question")
        targets = _key(entry, "mc2_targets", where)
        if not isinstance(targets, dict):
            raise DatasetError(
                f"{where}: 'mc2_targets' must map answer -> 0/1, got {type(targets).__name__}", field="mc2_targets"
            )
        if not targets:
            raise DatasetError(f"{where}: 'mc2_targets' is empty, so the question has no examples", field="mc2_targets")
        for answer, label in targets.items():
            answer = _text(answer, f"{where}, an answer of 'mc2_targets'", "mc2_targets")
            label = _label(label, f"{where}, 'mc2_targets'[{answer!r}]", "mc2_targets")
            examples.append(LabeledCompletion(str(i), qa_prompt(question), f" {answer}", label))
    return _finish(examples, p)


def load_truthfulqa_csv(path: str | Path) -> list[LabeledCompletion]:
    """TruthfulQA's ``TruthfulQA.csv``: true = Best Answer + Correct Answers, false = Incorrect Answers.

    Answers are split on ``;`` and stripped; like TruthfulQA's own loader, an answer that does not end
    in ``"."`` gets one appended (so the text matches ``mc_task.json``'s style). Repeated answers are
    kept once. An answer listed as both correct and incorrect (the file has two: "Unknown" in rows 348
    and 355) is ambiguous and dropped from both sides.
    """
    p = Path(path)
    text = _read_text(p)
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        header = reader.fieldnames
        if not header:
            raise DatasetError(f"{p}: no header row", field=str(p))
        missing = [c for c in TRUTHFULQA_CSV_COLUMNS if c not in header]
        if missing:
            raise DatasetError(
                f"{p}: missing column(s) {', '.join(map(repr, missing))} (header: {', '.join(header)})",
                field=missing[0],
            )
        examples: list[LabeledCompletion] = []
        for row_index, row in enumerate(reader):
            where = f"{p}, row {row_index + 1} (line {reader.line_num})"
            values = {c: row.get(c) for c in TRUTHFULQA_CSV_COLUMNS}
            for column, value in values.items():
                if value is None:
                    raise DatasetError(f"{where}: no value in column {column!r}", field=column)
            question = _text(values["Question"], where, "Question")
            best = values["Best Answer"].strip()
            true_answers = _split_answers(([best] if best else []) + [values["Correct Answers"]])
            false_answers = _split_answers([values["Incorrect Answers"]])
            ambiguous = set(true_answers) & set(false_answers)
            true_answers = [a for a in true_answers if a not in ambiguous]
            false_answers = [a for a in false_answers if a not in ambiguous]
            if not true_answers and not false_answers:
                raise DatasetError(f"{where}: no answers, so the question has no examples", field="Correct Answers")
            prompt = qa_prompt(question)
            examples += [LabeledCompletion(str(row_index), prompt, f" {a}", 1) for a in true_answers]
            examples += [LabeledCompletion(str(row_index), prompt, f" {a}", 0) for a in false_answers]
    except csv.Error as e:
        raise DatasetError(f"{p}, line {reader.line_num}: malformed CSV: {e}", field=str(p)) from e
    return _finish(examples, p)


def jsonl_objects(p: Path) -> Iterator[tuple[int, str, dict]]:
    """``(line number, "<file>, line <n>", object)`` for each non-blank line of a JSONL file; a missing,
    unreadable or empty file, invalid JSON or a line that is not an object is a DatasetError naming
    the file and the line."""
    for line_number, line in enumerate(_read_text(p).splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{p}, line {line_number}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{where}, column {e.colno}: invalid JSON: {e.msg}", field=str(p)) from e
        if not isinstance(obj, dict):
            raise DatasetError(f"{where}: expected a JSON object, got {type(obj).__name__}", field=str(p))
        yield line_number, where, obj


def load_jsonl(path: str | Path) -> list[LabeledCompletion]:
    """Generic JSONL: ``{"prompt", "positive", "negative"}`` or ``{"prompt", "completion", "label"}``.

    The pair form yields two completions (``positive`` label 1, ``negative`` label 0). ``label`` is
    0/1 or true/false; an empty ``completion`` labels the prompt itself (its activations are then read
    at the prompt's last token, e.g. the answer cue). The group is the line's ``"group"`` (else ``"id"``) value as a string, or the
    1-based line number. Blank lines are skipped; the two forms may be mixed in one file.
    """
    p = Path(path)
    examples: list[LabeledCompletion] = []
    for line_number, where, obj in jsonl_objects(p):
        group = _group_of(obj, where, default=str(line_number))
        if "positive" in obj or "negative" in obj:
            prompt = _text(_key(obj, "prompt", where), where, "prompt")
            positive = _text(_key(obj, "positive", where), where, "positive")
            negative = _text(_key(obj, "negative", where), where, "negative")
            examples += [LabeledCompletion(group, prompt, positive, 1), LabeledCompletion(group, prompt, negative, 0)]
        elif "completion" in obj or "label" in obj:
            prompt = _text(_key(obj, "prompt", where), where, "prompt")
            completion = _text(_key(obj, "completion", where), where, "completion", allow_empty=True)
            label = _label(_key(obj, "label", where), where, "label")
            examples.append(LabeledCompletion(group, prompt, completion, label))
        else:
            raise DatasetError(
                f"{where}: needs keys 'prompt', 'positive', 'negative' or keys 'prompt', 'completion', 'label' "
                f"(has: {', '.join(map(repr, obj)) or 'none'})",
                field="completion",
            )
    return _finish(examples, p)


# -------------------------------------------------------------------------------------------- splits


def split_groups(
    examples: Sequence[LabeledCompletion], val_fraction: float = 0.2, seed: int = 42
) -> tuple[list[int], list[int]]:
    """Split example indices into (train, val) by group: no group lands on both sides.

    Groups are shuffled with ``random.Random(seed)``; ``round(val_fraction * #groups)`` of them (at
    least one, at most all but one) go to validation. Indices come back in ascending order.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    groups = _shuffled_groups(examples, seed)
    n_val = min(max(1, round(val_fraction * len(groups))), len(groups) - 1)
    val_groups = set(groups[:n_val])
    train = [i for i, ex in enumerate(examples) if ex.group not in val_groups]
    val = [i for i, ex in enumerate(examples) if ex.group in val_groups]
    return train, val


def two_folds(examples: Sequence[LabeledCompletion], seed: int = 0) -> list[tuple[list[int], list[int]]]:
    """The papers' 2-fold protocol: groups shuffled and halved into folds A and B.

    Returns ``[(fit_idx, heldout_idx), ...]`` where entry i holds out fold i: ``[(B, A), (A, B)]``.
    Fold A gets the extra group when the count is odd.
    """
    groups = _shuffled_groups(examples, seed)
    fold_a = set(groups[: (len(groups) + 1) // 2])
    a = [i for i, ex in enumerate(examples) if ex.group in fold_a]
    b = [i for i, ex in enumerate(examples) if ex.group not in fold_a]
    return [(b, a), (a, b)]


def tuning_prompts(examples: Sequence[LabeledCompletion], seed: int = 0) -> list[str]:
    """Texts whose last-token activations set ITI's σ (projection std), one per example.

    Each is ``"{prompt}{completion} {another question}"``, the other question being the prompt of a
    randomly drawn *different* group (``random.Random(seed)``) with its trailing ``" A:"`` removed and
    a ``"Q: "`` put in front when it lacks one. For ITI-form prompts this is exactly
    ``"Q: {q} A: {answer} Q: {another q}"``.
    """
    by_group = _group_indices(examples)
    if len(by_group) < 2:
        raise DatasetError("tuning prompts need at least two groups (questions)", field="group")
    names = list(by_group)
    question_of = {g: _as_question(examples[idx[0]].prompt) for g, idx in by_group.items()}
    rng = random.Random(seed)
    texts = []
    for ex in examples:
        other = ex.group
        while other == ex.group:
            other = names[rng.randrange(len(names))]
        texts.append(f"{ex.prompt}{ex.completion} {question_of[other]}")
    return texts


def check_lengths(examples: Sequence[LabeledCompletion], tokenizer: Any, max_model_len: int) -> None:
    """Raise :class:`DatasetError` if any prompt+completion is longer than ``max_model_len`` tokens.

    Counts ``len(tokenizer.encode(prompt + completion))`` (special tokens included, as the engine
    adds them). The error names the first offending row and how many rows exceed the limit.
    """
    if max_model_len <= 0:
        raise ValueError(f"max_model_len must be positive, got {max_model_len}")
    too_long = []
    for i, ex in enumerate(examples):
        n = len(tokenizer.encode(ex.prompt + ex.completion))
        if n > max_model_len:
            too_long.append((i, n))
    if too_long:
        i, n = too_long[0]
        raise DatasetError(
            f"row {i} (group {examples[i].group!r}) is {n} tokens (prompt + completion) but max_model_len is "
            f"{max_model_len}; {len(too_long)} row(s) in all are too long",
            field=f"examples[{i}]",
        )


# ------------------------------------------------------------------------------------------- helpers


def _require_file(p: Path) -> None:
    if not p.exists():
        raise DatasetError(f"{p}: no such file", field=str(p))
    if not p.is_file():
        raise DatasetError(f"{p}: not a regular file", field=str(p))


def _read_text(p: Path) -> str:
    _require_file(p)
    try:
        text = p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DatasetError(f"{p}: not UTF-8 text (byte {e.start}): {e.reason}", field=str(p)) from e
    except OSError as e:
        raise DatasetError(f"{p}: cannot read: {e}", field=str(p)) from e
    if not text.strip():
        raise DatasetError(f"{p}: file is empty", field=str(p))
    return text


def _key(obj: dict, key: str, where: str) -> Any:
    if key not in obj:
        raise DatasetError(f"{where}: missing key {key!r}", field=key)
    return obj[key]


def _text(value: Any, where: str, field: str, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise DatasetError(f"{where}: {field!r} must be a string, got {type(value).__name__}", field=field)
    if not value.strip() and not allow_empty:
        raise DatasetError(f"{where}: {field!r} is empty", field=field)
    return value


def _label(value: Any, where: str, field: str) -> int:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int) and value in (0, 1):
        return value
    raise DatasetError(f"{where}: label must be 0/1 or true/false, got {value!r}", field=field)


def _group_of(obj: dict, where: str, default: str) -> str:
    for key in ("group", "id"):
        if key in obj:
            value = obj[key]
            if isinstance(value, bool) or not isinstance(value, (str, int)) or str(value).strip() == "":
                raise DatasetError(f"{where}: {key!r} must be a non-empty string or an integer, got {value!r}", field=key)
            return str(value)
    return default


def _split_answers(cells: list[str]) -> list[str]:
    answers: list[str] = []
    for cell in cells:
        for answer in cell.split(";"):
            answer = answer.strip()
            if not answer:
                continue
            if not answer.endswith("."):
                answer += "."
            if answer not in answers:
                answers.append(answer)
    return answers


def _finish(examples: list[LabeledCompletion], p: Path) -> list[LabeledCompletion]:
    if not examples:
        raise DatasetError(f"{p}: no rows", field=str(p))
    labels = {ex.label for ex in examples}
    if len(labels) < 2:
        raise DatasetError(
            f"{p}: every example has label {labels.pop()}; fitting needs both desired (1) and undesired (0) ones",
            field="label",
        )
    return examples


def _group_indices(examples: Sequence[LabeledCompletion]) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = {}
    for i, ex in enumerate(examples):
        groups.setdefault(ex.group, []).append(i)
    return groups


def _shuffled_groups(examples: Sequence[LabeledCompletion], seed: int) -> list[str]:
    groups = list(_group_indices(examples))
    if len(groups) < 2:
        raise DatasetError(f"splitting needs at least two groups, got {len(groups)}", field="group")
    random.Random(seed).shuffle(groups)
    return groups


def _as_question(prompt: str) -> str:
    text = prompt.rstrip()
    if text.endswith("A:"):
        text = text[: -len("A:")].rstrip()
    if not text.startswith("Q:"):
        text = f"Q: {text}"
    return text
