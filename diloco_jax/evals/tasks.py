"""Multiple-choice task files -> `Example`s: HellaSwag, PIQA and ARC-Easy (jsonl).

Every format becomes the same thing: a context string, the candidate continuations and the index
of the right one. The prompts follow the common zero-shot setup (the one EleutherAI's
lm-evaluation-harness uses), and every continuation starts with a space, so it reads on from the
context:

* HellaSwag: context ``ctx`` (or ``ctx_a + " " + ctx_b``), continuations ``" " + ending``; WikiHow
  markup (``[title]``, ``[header]``, ...) is removed.
* PIQA: context ``"Question: {goal}\\nAnswer:"``, continuations ``" " + sol1`` and ``" " + sol2``.
* ARC-Easy: context ``"Question: {stem}\\nAnswer:"``, continuations ``" " + text`` per choice.

A malformed file raises `FormatError` with one sentence naming the file and the line.

Numpy and json only (no JAX), so the command line can check every file before JAX starts.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Iterator

TASKS = ("hellaswag", "piqa", "arc_easy")


class FormatError(ValueError):
  """A malformed task file; the message is one sentence naming the file and the line."""


@dataclasses.dataclass(frozen=True)
class Example:
  """One question: score each `choices[i]` as a continuation of `context`; `label` is right."""

  context: str
  choices: tuple[str, ...]
  label: int


def _records(path: str, task: str) -> Iterator[tuple[int, dict]]:
  """(line number, object) for every non-blank line of a jsonl file."""
  if not os.path.isfile(path):
    raise FormatError(f"{task} file {path!r} does not exist.")
  with open(path, encoding="utf-8") as f:
    for number, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise FormatError(f"{_where(task, path, number)}: not valid JSON ({e.msg}).") from None
      if not isinstance(record, dict):
        raise FormatError(f"{_where(task, path, number)}: expected a JSON object, "
                          f"got {type(record).__name__}.")
      yield number, record


def _where(task: str, path: str, number: int) -> str:
  return f"{task} file {path!r} line {number}"


def _text(record: dict, key: str, where: str) -> str:
  """record[key] as a non-empty string, or a FormatError naming the field."""
  value = record.get(key)
  if not isinstance(value, str) or not value.strip():
    got = "missing" if key not in record else f"{value!r}"
    raise FormatError(f"{where}: field {key!r} must be a non-empty string, got {got}.")
  return value


def _label(value, num_choices: int, where: str, key: str = "label") -> int:
  """An int label (or its decimal string) in [0, num_choices)."""
  if isinstance(value, str) and value.strip().lstrip("-").isdigit():
    value = int(value)
  if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < num_choices:
    raise FormatError(f"{where}: {key} must be an integer in [0, {num_choices}), got {value!r}.")
  return value


def _checked(examples: list[Example], task: str, path: str) -> list[Example]:
  if not examples:
    raise FormatError(f"{task} file {path!r} holds no examples.")
  return examples


# ------------------------------------------------------------------------------------ HellaSwag
_WIKIHOW_TAG = re.compile(r"\[.*?\]")


def _clean_hellaswag(text: str) -> str:
  """Drops the WikiHow markup ("[title]" ends a sentence, other [tags] go) and double spaces."""
  text = text.strip().replace(" [title]", ". ")
  text = _WIKIHOW_TAG.sub("", text)
  return re.sub(" +", " ", text).strip()


def load_hellaswag(path: str) -> list[Example]:
  """HellaSwag jsonl: ``ctx`` (or ``ctx_a`` and ``ctx_b``), ``endings`` (4 strings), ``label``."""
  examples = []
  for number, record in _records(path, "hellaswag"):
    where = _where("hellaswag", path, number)
    if "ctx" in record:
      context = _text(record, "ctx", where)
    elif "ctx_a" in record:
      context = _text(record, "ctx_a", where) + " " + record.get("ctx_b", "")
    else:
      raise FormatError(f"{where}: needs a 'ctx' field (or 'ctx_a' and 'ctx_b').")
    endings = record.get("endings")
    if (not isinstance(endings, list) or len(endings) != 4
        or not all(isinstance(e, str) and e.strip() for e in endings)):
      raise FormatError(f"{where}: field 'endings' must be a list of 4 non-empty strings, "
                        f"got {endings!r}.")
    if record.get("label") in (None, ""):
      raise FormatError(f"{where}: field 'label' is missing (HellaSwag's test split is "
                        f"unlabelled; use the validation split).")
    label = _label(record["label"], 4, where)
    context = _clean_hellaswag(context)
    if not context:
      raise FormatError(f"{where}: the context is empty after removing WikiHow markup.")
    examples.append(Example(context, tuple(" " + _clean_hellaswag(e) for e in endings), label))
  return _checked(examples, "hellaswag", path)


# ----------------------------------------------------------------------------------------- PIQA
def _read_labels(path: str) -> list[tuple[int, str]]:
  """(line number, text) of every non-blank line of a PIQA labels file."""
  if not os.path.isfile(path):
    raise FormatError(f"piqa labels file {path!r} does not exist.")
  with open(path, encoding="utf-8") as f:
    return [(n, line.strip()) for n, line in enumerate(f, start=1) if line.strip()]


def load_piqa(path: str, labels_path: str | None = None) -> list[Example]:
  """PIQA jsonl (``goal``, ``sol1``, ``sol2``); labels from `labels_path` (one 0/1 per line, as
  PIQA ships them) when given, else from each record's ``label`` field."""
  records = list(_records(path, "piqa"))
  if labels_path is not None:
    labels = _read_labels(labels_path)
    if len(labels) != len(records):
      raise FormatError(f"piqa labels file {labels_path!r} has {len(labels)} labels but "
                        f"{path!r} has {len(records)} examples.")
    labels = [_label(text, 2, _where("piqa labels", labels_path, n)) for n, text in labels]
  examples = []
  for i, (number, record) in enumerate(records):
    where = _where("piqa", path, number)
    goal, sol1, sol2 = (_text(record, key, where) for key in ("goal", "sol1", "sol2"))
    if labels_path is not None:
      label = labels[i]
    elif "label" in record:
      label = _label(record["label"], 2, where)
    else:
      raise FormatError(f"{where}: field 'label' is missing; pass the labels file "
                        f"(--piqa_labels) instead.")
    examples.append(Example(f"Question: {goal.strip()}\nAnswer:",
                            (" " + sol1.strip(), " " + sol2.strip()), label))
  return _checked(examples, "piqa", path)


# ------------------------------------------------------------------------------------- ARC-Easy
def load_arc(path: str, task: str = "arc_easy") -> list[Example]:
  """ARC jsonl: ``question`` {``stem``, ``choices``: [{``text``, ``label``}]}, ``answerKey`` (a
  choice's label: a letter, or a digit in the few questions labelled 1-4)."""
  examples = []
  for number, record in _records(path, task):
    where = _where(task, path, number)
    question = record.get("question")
    if not isinstance(question, dict):
      raise FormatError(f"{where}: field 'question' must be an object with 'stem' and 'choices'.")
    stem = _text(question, "stem", where)
    choices = question.get("choices")
    if (not isinstance(choices, list) or len(choices) < 2
        or not all(isinstance(c, dict) and isinstance(c.get("text"), str) and "label" in c
                   for c in choices)):
      raise FormatError(f"{where}: field 'question.choices' must be a list of at least 2 objects "
                        f"with 'text' and 'label'.")
    labels = [str(c["label"]).strip() for c in choices]
    key = str(record.get("answerKey", "")).strip()
    if key not in labels:
      raise FormatError(f"{where}: answerKey {record.get('answerKey')!r} is not one of the "
                        f"choice labels {labels}.")
    examples.append(Example(f"Question: {stem.strip()}\nAnswer:",
                            tuple(" " + c["text"].strip() for c in choices), labels.index(key)))
  return _checked(examples, task, path)
