"""Needle-in-a-haystack prompts built from real text (SPEC §6.3): Gemini's single needle and
RULER's multi-key, multi-value and multi-query variants. Pure Python and numpy (no JAX), so the
training-data pipeline (`diloco_jax.retrieval`) and the evaluation (`evals.needle`) build
exactly the same episodes.

Protocol of one episode (`make_episode`), all in UTF-8 bytes:

* The haystack is a stretch of the given text starting at a sentence start (drawn from the rng,
  or `start`), trimmed so that haystack + needles + question fill exactly `length` bytes.
* Needle i is ``template.format(key=k_i, value=v_i)`` plus one space, inserted into the haystack
  at ``depths[i] * len(haystack)`` snapped BACK to the previous sentence start (`sentence_starts`;
  offset 0 always counts), the way the canonical harness snaps to a sentence boundary.
* The question comes last and ends exactly where the model must write the answer, e.g.
  ``"\\nWhat is the special magic Paris number? The special magic Paris number is: "``.
* The answer is the value(s) as bytes; several values are joined by ``", "``.

Variants (`VARIANTS`; RULER's NIAH family, values of `value_digits` digits, no leading zero, all
distinct within an episode):

* ``"single"``: one needle, queried (``num_needles`` is ignored: always 1).
* ``"multikey"``: ``num_needles`` needles with distinct keys; needle 0's key is queried, the
  others are distractors.
* ``"multivalue"``: ``num_needles`` needles with one key and distinct values; all values must be
  returned, answered in the order the needles appear in the prompt.
* ``"multiquery"``: ``num_needles`` needles with distinct keys, all queried in a random order;
  the answer lists each queried key's value in the question's order.

The control (``needles=False`` or `remove_needles`) is the same episode (same text start, keys,
values, question and answer) with no needle: the haystack is simply longer, so the prompt has the
same length and a model can only guess (chance: 10**-value_digits per value).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

import numpy as np

VARIANTS = ("single", "multikey", "multivalue", "multiquery")
DEFAULT_NUM_NEEDLES = {"single": 1, "multikey": 4, "multivalue": 4, "multiquery": 4}

# Keys: world cities, none a substring of another (a distractor key must never match the query).
CITIES = (
    "Paris", "Tokyo", "Lima", "Cairo", "Oslo", "Nairobi", "Lagos", "Dublin", "Madrid", "Rome",
    "Berlin", "Vienna", "Prague", "Warsaw", "Athens", "Lisbon", "Helsinki", "Stockholm",
    "Copenhagen", "Budapest", "Istanbul", "Moscow", "Beijing", "Shanghai", "Seoul", "Bangkok",
    "Hanoi", "Manila", "Jakarta", "Singapore", "Mumbai", "Delhi", "Karachi", "Dhaka", "Tehran",
    "Baghdad", "Riyadh", "Dubai", "Sydney", "Melbourne", "Auckland", "Toronto", "Montreal",
    "Chicago", "Boston", "Seattle", "Denver", "Houston", "Havana", "Bogota", "Quito", "Santiago",
    "Caracas", "Montevideo", "Accra", "Dakar", "Kinshasa", "Luanda", "Casablanca", "Tunis",
    "Reykjavik", "Zurich",
)

TEMPLATE = "The special magic {key} number is: {value}."
QUESTIONS = {
    "single": "\nWhat is the special magic {key} number? The special magic {key} number is: ",
    "multikey": "\nWhat is the special magic {key} number? The special magic {key} number is: ",
    "multivalue": ("\nWhat are all the special magic {key} numbers? "
                   "The special magic {key} numbers are: "),
    "multiquery": ("\nWhat are the special magic numbers for {keys}? "
                   "The special magic numbers for {keys} are: "),
}
SEPARATOR = ", "   # between the values of a multi-value or multi-query answer

# Sentence boundaries. A sentence may start right after
#   (a) sentence-final punctuation . ! ? (optionally followed by closing quotes or brackets)
#       and at least one whitespace character, or
#   (b) a paragraph break: a newline, optional blanks, and another newline;
# at the first non-whitespace character after that whitespace run. Offset 0 always counts (a text
# begins a sentence). A "." after a common abbreviation (Mr. Dr. St. e.g. ...) is not an end.
_CLOSERS = "\"')\\]\u201d\u2019"
_BOUNDARY_STR = re.compile(f"(?:([.!?])[{_CLOSERS}]*\\s+|\\n[ \\t\\r\\f\\v]*\\n\\s*)")
_BOUNDARY_BYTES = re.compile(
    rb"(?:([.!?])(?:[\"')\]]|\xe2\x80[\x99\x9d])*\s+|\n[ \t\r\f\v]*\n\s*)")
_ABBREVIATIONS = ("mr", "mrs", "ms", "dr", "st", "jr", "sr", "prof", "vs", "e.g", "i.e",
                  "vol", "cf")
_ABBREVIATION_STR = re.compile(
    r"(?:^|[^A-Za-z.])(?:" + "|".join(re.escape(a) for a in _ABBREVIATIONS) + r")$",
    re.IGNORECASE)
_ABBREVIATION_BYTES = re.compile(_ABBREVIATION_STR.pattern.encode(), re.IGNORECASE)


def sentence_starts(text: str | bytes) -> list[int]:
  """Sorted offsets in `text` where a sentence may begin (character offsets for a str, byte
  offsets for bytes); see the rule above. Always holds 0 for a non-empty text."""
  is_str = isinstance(text, str)
  if not is_str and not isinstance(text, (bytes, bytearray)):
    raise TypeError(f"text must be a str or bytes, got {type(text).__name__}.")
  boundary, abbrev = ((_BOUNDARY_STR, _ABBREVIATION_STR) if is_str
                      else (_BOUNDARY_BYTES, _ABBREVIATION_BYTES))
  out = [0] if len(text) else []
  for m in boundary.finditer(text):
    end = m.end()
    if end >= len(text) or end == 0:
      continue
    punct = m.start(1)
    if punct >= 0 and text[punct:punct + 1] in (".", b".") and abbrev.search(
        text, max(0, punct - 6), punct):
      continue
    out.append(end)
  return out


@dataclasses.dataclass(frozen=True)
class Haystack:
  """A text as UTF-8 bytes with its sentence starts (byte offsets), computed once: pass one to
  `make_episode` when building many episodes from the same long text."""

  data: bytes
  starts: np.ndarray   # int64, sorted, byte offsets into data

  @classmethod
  def of(cls, text) -> Haystack:
    """From a str, bytes, a uint8 array (e.g. `data.TextBytes.region`) or a Haystack."""
    if isinstance(text, Haystack):
      return text
    if isinstance(text, str):
      data = text.encode("utf-8")
    elif isinstance(text, (bytes, bytearray)):
      data = bytes(text)
    elif isinstance(text, np.ndarray) and text.dtype == np.uint8 and text.ndim == 1:
      data = text.tobytes()
    else:
      raise TypeError(f"text must be a str, bytes, a 1-D uint8 array or a Haystack, got "
                      f"{type(text).__name__}.")
    return cls(data, np.asarray(sentence_starts(data), np.int64))


@dataclasses.dataclass(frozen=True)
class Episode:
  """One needle-in-a-haystack prompt and its answer.

  `prompt` is exactly the requested length in bytes and ends where the answer begins; `answer`
  is what a perfect model writes next (``values joined by ", "``). Per needle i (in the order the
  needles were drawn, not their order in the prompt): `keys[i]`, `values[i]`, the requested
  `depths[i]`, `haystack_offsets[i]` (the sentence start in the haystack it was inserted at) and
  `needle_offsets[i]` (where its text begins in the prompt). For a control (``needles=False``)
  the last two are empty. `queried`: the keys the question asks for, in its order;
  `answer_values`: the values the answer lists, in its order. `start`: the haystack's byte
  offset in the source text; `haystack_len`: its length in bytes (without needles).
  """

  prompt: bytes
  answer: bytes
  variant: str
  depths: tuple[float, ...]
  needle_offsets: tuple[int, ...]
  haystack_offsets: tuple[int, ...]
  keys: tuple[str, ...]
  values: tuple[str, ...]
  queried: tuple[str, ...]
  answer_values: tuple[str, ...]
  start: int
  haystack_len: int
  needles: bool = True
  template: str = TEMPLATE
  question: str = ""


def _check_variant(variant) -> str:
  if variant not in VARIANTS:
    raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}.")
  return variant


def _check_int(name: str, value, lo: int, hi: int | None = None) -> int:
  if (isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo
      or (hi is not None and value > hi)):
    bound = f"an integer >= {lo}" if hi is None else f"an integer in [{lo}, {hi}]"
    raise ValueError(f"{name} must be {bound}, got {value!r}.")
  return int(value)


def _check_depth(d) -> float:
  if isinstance(d, bool) or not isinstance(d, (int, float, np.floating, np.integer)) or not (
      0.0 <= float(d) <= 1.0):
    raise ValueError(f"depth must be a number in [0, 1] (or one per needle), got {d!r}.")
  return float(d)


def _join_keys(keys: Sequence[str]) -> str:
  """"A", "A and B", "A, B and C": the keys as the multi-query question names them."""
  return keys[0] if len(keys) == 1 else ", ".join(keys[:-1]) + " and " + keys[-1]


def _draw_values(rng: np.random.Generator, n: int, digits: int) -> list[str]:
  """n distinct `digits`-digit numbers without a leading zero (so every value has exactly
  `digits` characters and a distractor never equals the answer)."""
  out: list[str] = []
  while len(out) < n:
    v = str(int(rng.integers(10 ** (digits - 1), 10 ** digits)))
    if v not in out:
      out.append(v)
  return out


def make_episode(text, length: int, depth: float | Sequence[float], rng: np.random.Generator,
                 *, variant: str = "single", num_needles: int | None = None,
                 keys: Sequence[str] = CITIES, value_digits: int = 7,
                 template: str = TEMPLATE, question: str | None = None,
                 start: int | None = None, needles: bool = True) -> Episode:
  """One episode (see the module docstring) whose prompt is exactly `length` UTF-8 bytes.

  Args:
    text: the haystack source: real text as a str, bytes, a uint8 array or a `Haystack`; it
      must hold at least ``length - len(question)`` bytes from the haystack's start on.
    length: prompt length in bytes (haystack + needles + question).
    depth: where the needle goes, as a fraction of the haystack in [0, 1]: one number (needle 0
      goes there; the other needles of a multi-needle variant at depths drawn uniformly from
      `rng`) or one number per needle.
    rng: draws the text start (unless `start`), keys, values, the other depths and the
      multi-query order.
    variant: one of `VARIANTS`.
    num_needles: needles of a multi-needle variant (default 4, RULER's); ignored for "single".
    keys: the key pool; each episode draws its keys without replacement.
    value_digits: digits of each value (1..18).
    template: the needle, with ``{key}`` and ``{value}``.
    question: the question, with ``{key}`` (``{keys}`` for "multiquery": "A, B, C and D");
      default `QUESTIONS[variant]`. It should end where the answer begins.
    start: byte offset of the haystack in the text (default: a sentence start drawn from `rng`
      among those leaving room for the whole haystack).
    needles: False builds the control: the same draws, no needle, a longer haystack.

  Raises:
    ValueError: one sentence naming the bad argument (too short a text or length included).
  """
  variant = _check_variant(variant)
  length = _check_int("length", length, 1)
  value_digits = _check_int("value_digits", value_digits, 1, 18)
  n = 1 if variant == "single" else _check_int(
      "num_needles", DEFAULT_NUM_NEEDLES[variant] if num_needles is None else num_needles, 1)
  if "{key}" not in template or "{value}" not in template:
    raise ValueError(f"template must contain {{key}} and {{value}}, got {template!r}.")
  question = QUESTIONS[variant] if question is None else question
  slot = "{keys}" if variant == "multiquery" else "{key}"
  if not isinstance(question, str) or slot not in question:
    raise ValueError(f"question for variant {variant!r} must contain {slot}, got {question!r}.")
  keys = list(keys)
  if len(set(keys)) != len(keys):
    raise ValueError("keys must be distinct.")
  distinct_keys = 1 if variant == "multivalue" else n
  if distinct_keys > len(keys):
    raise ValueError(f"keys holds {len(keys)} keys, fewer than the {distinct_keys} distinct keys "
                     f"a {variant!r} episode with num_needles={n} needs.")
  if isinstance(depth, (int, float, np.floating, np.integer)) and not isinstance(depth, bool):
    first = _check_depth(depth)
    depths = None
  else:
    depths = [_check_depth(d) for d in depth]
    if len(depths) != n:
      raise ValueError(f"depth must be one number or {n} numbers (one per needle of a {variant!r} "
                       f"episode), got {len(depths)}.")
  hay = Haystack.of(text)

  # Draws, in a fixed order, before any length is known: the control with the same rng state
  # gets the same keys, values and question.
  picked = [str(keys[i]) for i in rng.choice(len(keys), size=distinct_keys, replace=False)]
  needle_keys = picked * n if variant == "multivalue" else picked
  values = _draw_values(rng, n, value_digits)
  if depths is None:
    depths = [first] + [float(x) for x in rng.random(n - 1)]
  if variant == "multiquery":
    order = [int(i) for i in rng.permutation(n)]
    queried = [needle_keys[i] for i in order]
    q_text = question.replace("{keys}", _join_keys(queried))
  else:
    order = [0]
    queried = [needle_keys[0]]
    q_text = question.replace("{key}", needle_keys[0])
  q_bytes = q_text.encode("utf-8")
  needle_bytes = [(template.replace("{key}", k).replace("{value}", v) + " ").encode("utf-8")
                  for k, v in zip(needle_keys, values)]
  room = length - len(q_bytes)   # haystack bytes of the control: the needle-free prompt
  if room - sum(map(len, needle_bytes)) < 1:
    raise ValueError(f"length={length} is too short for a {variant!r} episode: its question and "
                     f"{n} needle(s) alone take {len(q_bytes) + sum(map(len, needle_bytes))} "
                     f"bytes.")
  start = _pick_start(hay, room, rng, start)
  episode = _assemble(hay, start, room, q_bytes, needle_bytes, variant, depths, needle_keys,
                      values, order, queried, template, q_text, True)
  # The control is derived from the episode itself, so its answer (a multi-value answer's order
  # comes from the needles' positions) is the episode's.
  return episode if needles else remove_needles(episode, hay)


def min_length(variant: str = "single", num_needles: int | None = None, *,
               keys: Sequence[str] = CITIES, value_digits: int = 7, template: str = TEMPLATE,
               question: str | None = None) -> int:
  """The shortest `length` `make_episode` accepts with these arguments whatever keys it draws:
  the question and needles with the longest keys, plus one byte of haystack. A training-data
  pipeline drawing episode lengths should draw them at or above this (with `CITIES` and 7-digit
  values: 136 bytes for one needle, 282 for 4 multi-key needles, 291 multi-value, 370
  multi-query)."""
  variant = _check_variant(variant)
  n = 1 if variant == "single" else _check_int(
      "num_needles", DEFAULT_NUM_NEEDLES[variant] if num_needles is None else num_needles, 1)
  question = QUESTIONS[variant] if question is None else question
  longest = sorted((str(k) for k in keys), key=lambda k: len(k.encode("utf-8")), reverse=True)
  if len(longest) < (1 if variant == "multivalue" else n):
    raise ValueError(f"keys holds {len(longest)} keys, fewer than a {variant!r} episode with "
                     f"num_needles={n} needs.")
  needle_keys = longest[:1] * n if variant == "multivalue" else longest[:n]
  value = "9" * _check_int("value_digits", value_digits, 1, 18)
  needles = sum(len((template.replace("{key}", k).replace("{value}", value) + " ").encode())
                for k in needle_keys)
  if variant == "multiquery":
    q = question.replace("{keys}", _join_keys(longest[:n]))
  else:
    q = question.replace("{key}", longest[0])
  return len(q.encode("utf-8")) + needles + 1


def _pick_start(hay: Haystack, room: int, rng: np.random.Generator, start: int | None) -> int:
  """The haystack's start: `start`, or a sentence start drawn uniformly among those that leave
  `room` bytes of text (room for the control's longer haystack, so both fit)."""
  total = len(hay.data)
  if start is not None:
    start = _check_int("start", start, 0)
    if start + room > total:
      raise ValueError(f"text holds {total} bytes, but a haystack of {room} bytes from start="
                       f"{start} needs {start + room}; pass a longer text or a smaller start.")
    return start
  fits = hay.starts[hay.starts + room <= total]
  if len(fits) == 0:
    raise ValueError(f"text holds {total} bytes, fewer than the {room} bytes of haystack this "
                     f"prompt needs; pass a longer text.")
  return int(fits[rng.integers(len(fits))])


def _assemble(hay: Haystack, start: int, room: int, q_bytes: bytes, needle_bytes: list[bytes],
              variant: str, depths, needle_keys, values, order, queried, template, q_text,
              needles: bool) -> Episode:
  size = room - sum(map(len, needle_bytes))
  cut = start + size
  # Never split a UTF-8 character at the haystack's end: back off to a character boundary and
  # pad with spaces, so the prompt stays valid text and still has the exact length.
  while cut > start and cut < len(hay.data) and (hay.data[cut] & 0xC0) == 0x80:
    cut -= 1
  body = hay.data[start:cut] + b" " * (start + size - cut)
  lo, hi = np.searchsorted(hay.starts, [start, cut])
  local = hay.starts[lo:hi] - start
  if len(local) == 0 or local[0] != 0:   # the haystack's own first byte always counts
    local = np.concatenate([[0], local])
  offsets: list[int] = []
  if needle_bytes:
    for d in depths:
      # The last sentence start at or before depth * size ("snapped back").
      offsets.append(int(local[np.searchsorted(local, d * size, side="right") - 1]))
  pieces, needle_offsets, prev, shift = [], [0] * len(needle_bytes), 0, 0
  for i in sorted(range(len(needle_bytes)), key=lambda i: (offsets[i], i)):
    pieces.append(body[prev:offsets[i]])
    needle_offsets[i] = offsets[i] + shift
    pieces.append(needle_bytes[i])
    shift += len(needle_bytes[i])
    prev = offsets[i]
  pieces.append(body[prev:])
  prompt = b"".join(pieces) + q_bytes
  assert len(prompt) == room + len(q_bytes), (len(prompt), room, len(q_bytes))
  if variant == "multivalue":   # in the order the needles appear in the prompt
    answer_values = [values[i] for i in sorted(range(len(values)),
                                               key=lambda i: (offsets[i] if offsets else 0, i))]
  else:
    answer_values = [values[i] for i in order]
  return Episode(
      prompt=prompt, answer=SEPARATOR.join(answer_values).encode("utf-8"), variant=variant,
      depths=tuple(float(d) for d in depths), needle_offsets=tuple(needle_offsets),
      haystack_offsets=tuple(offsets), keys=tuple(needle_keys), values=tuple(values),
      queried=tuple(queried), answer_values=tuple(answer_values), start=start,
      haystack_len=size, needles=needles, template=template, question=q_text)


def remove_needles(episode: Episode, text) -> Episode:
  """The control of `episode`: the same text start, keys, values, question and answer, no
  needle, the haystack filled to the same prompt length. `text` is the episode's source text."""
  if not episode.needles:
    return episode
  hay = Haystack.of(text)
  q_bytes = episode.question.encode("utf-8")
  room = len(episode.prompt) - len(q_bytes)
  if episode.start + room > len(hay.data):
    raise ValueError(f"text holds {len(hay.data)} bytes, too few for this episode's control "
                     f"(it needs {episode.start + room}); pass the episode's own source text.")
  ctrl = _assemble(hay, episode.start, room, q_bytes, [], episode.variant, episode.depths,
                   episode.keys, episode.values, [0], episode.queried, episode.template,
                   episode.question, False)
  # The answer stays the episode's (the multi-value order came from its needle positions).
  return dataclasses.replace(ctrl, answer=episode.answer, answer_values=episode.answer_values)


# ----------------------------------------------------------------------------------------------
# Scoring.
# ----------------------------------------------------------------------------------------------
def _as_text(output) -> str:
  if isinstance(output, (bytes, bytearray)):
    return bytes(output).decode("utf-8", "replace")
  if isinstance(output, str):
    return output
  raise TypeError(f"output must be bytes or str, got {type(output).__name__}.")


def _answer_values(answer) -> list[str]:
  if isinstance(answer, Episode):
    return list(answer.answer_values)
  if isinstance(answer, (bytes, bytearray, str)):
    return [v.strip() for v in _as_text(answer).split(SEPARATOR.strip())]
  return [str(v) for v in answer]


def _whole(value: str, text: str, *, anchored: bool) -> bool:
  """`value` occurs in `text` (at its start when `anchored`) not glued to a letter or digit:
  "12345678" does not contain the value 1234567."""
  pattern = ("^" if anchored else "(?<![0-9A-Za-z])") + re.escape(value) + "(?![0-9A-Za-z])"
  return re.search(pattern, text) is not None


def exact(output, answer) -> float:
  """1.0 iff the generated `output` (leading spaces stripped) starts with the whole answer, not
  followed by a letter or digit; else 0.0. `answer`: an Episode, its answer bytes/str, or the
  list of values (joined by ", ")."""
  values = _answer_values(answer)
  return float(_whole(SEPARATOR.join(values), _as_text(output).lstrip(" "), anchored=True))


def score(output, answer) -> float:
  """Recall of one generation. One value: `exact` (the output, leading spaces stripped, starts
  with the value and no digit or letter follows). Several values (multi-value, multi-query):
  the fraction of the expected values that occur anywhere in the output as whole numbers, in
  any order (RULER's "all" string match), e.g. ``"1234567, 9999999"`` against
  ``"1234567, 7654321"`` scores 0.5."""
  values = _answer_values(answer)
  if len(values) == 1:
    return exact(output, values)
  text = _as_text(output)
  return sum(_whole(v, text, anchored=False) for v in values) / len(values)


def wrong_needle(output, episode: Episode) -> float:
  """1.0 iff the generation is a miss that `exact`ly gives another needle's value instead: the
  model found a needle but not the one asked for (a multi-key distractor, or a multi-value
  needle out of order); 0.0 for a hit or any other miss (garbled digits, haystack text)."""
  if exact(output, episode):
    return 0.0
  asked = set(episode.answer_values)
  return float(any(exact(output, [v]) for v in episode.values if v not in asked))
