"""Subword tokenization (`data.tokenizer`): a SentencePiece model trained on local text, and the
text pre-tokenized once into ArrayRecord shards that grain reads with a resumable iterator.

  python -m diloco_jax.tokenizer train --paths='../shared/data/english-pd/*.txt' \
      --vocab_size=4096 --out=runs/spm/english          # writes runs/spm/english.model
  python -m diloco_jax.tokenizer prepare --paths='../shared/data/english-pd/*.txt' \
      --tokenizer=runs/spm/english.model --out=runs/tokens/english

`data.tokenizer="bytes"` (the default) keeps the byte-level pipeline (`data.TextBytes`). A path
to a `.model` file makes a text run read `TokenShards` instead: the trainer prepares the shards
on first use under `data.token_cache` (or `prepare` does it ahead), keyed by a hash of the
tokenizer and the files, so later runs reuse them. The split is TextBytes' (the last
`heldout_fraction` of every file's bytes is held out; the model is trained on the train split
only). Each split's token stream is every file's region encoded and concatenated, stored in
records of `RECORD_TOKENS` int32 tokens; a training window is `seq_len + 1` consecutive tokens
of that stream, so one set of shards serves every sequence length. `bytes_per_token` is the
split's UTF-8 bytes over its tokens: losses convert to bits per byte and compare with byte runs.
"""

from __future__ import annotations

import glob as glob_lib
import hashlib
import json
import os
import sys

import numpy as np

BYTES = "bytes"
RECORD_TOKENS = 4096   # tokens per ArrayRecord record
_SPLITS = ("train", "eval")
_META = "meta.json"
_FORMAT = "diloco_jax.tokens/1"


def _sentencepiece():
  try:
    import sentencepiece  # noqa: PLC0415  (only subword runs need it)
  except ImportError:   # pragma: no cover - pinned in pyproject
    raise ValueError("data.tokenizer names a SentencePiece model, but the sentencepiece "
                     "package is not installed (pip install sentencepiece)") from None
  return sentencepiece


def check_model(path: str) -> None:
  """Raises ValueError (one sentence) unless `path` is a readable SentencePiece model."""
  if not os.path.isfile(path):
    raise ValueError(f"data.tokenizer={path!r} is neither 'bytes' nor an existing SentencePiece "
                     f"model file (train one with python -m diloco_jax.tokenizer train)")
  try:
    _sentencepiece().SentencePieceProcessor(model_file=path)
  except (RuntimeError, OSError) as e:
    raise ValueError(f"data.tokenizer={path!r} is not a SentencePiece model: "
                     f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def vocab_size(path: str) -> int:
  return int(_sentencepiece().SentencePieceProcessor(model_file=path).vocab_size())


def _split_texts(files: list[str], split: str, heldout_fraction: float) -> list[str]:
  """Each file's region of `split` (TextBytes' cut) as text; a UTF-8 character cut by the
  train/held-out boundary is dropped from both sides."""
  from diloco_jax import data  # noqa: PLC0415
  text = data.TextBytes(files, seq_len=1, split=split, heldout_fraction=heldout_fraction)
  return [bytes(text.region(f)).decode("utf-8", errors="ignore") for f in range(len(files))]


def train(files: list[str], out_prefix: str, vocab: int, *, heldout_fraction: float = 0.01,
          model_type: str = "bpe") -> str:
  """Trains a SentencePiece model on the train split of `files`; returns the .model path."""
  spm = _sentencepiece()
  texts = _split_texts(files, "train", heldout_fraction)
  os.makedirs(os.path.dirname(os.path.abspath(out_prefix)), exist_ok=True)
  lines = (line for t in texts for line in t.splitlines() if line.strip())
  # Lossless, so bits per byte count the real bytes: no normalization, whitespace kept, no
  # dummy leading space (the files' encodings concatenate), and
  # byte_fallback encodes whatever the pieces miss (newlines included) byte by byte.
  spm.SentencePieceTrainer.train(sentence_iterator=lines, model_prefix=out_prefix,
                                 vocab_size=vocab, model_type=model_type, byte_fallback=True,
                                 character_coverage=1.0, normalization_rule_name="identity",
                                 remove_extra_whitespaces=False, add_dummy_prefix=False,
                                 num_threads=1,
                                 minloglevel=2, hard_vocab_limit=True)
  return out_prefix + ".model"


def _fingerprint(files: list[str], model: str, heldout_fraction: float) -> str:
  h = hashlib.sha256()
  with open(model, "rb") as f:
    h.update(f.read())
  for path in files:
    st = os.stat(path)
    h.update(f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}".encode())
  h.update(repr(heldout_fraction).encode())
  return h.hexdigest()[:16]


def prepare(files: list[str], model: str, out_dir: str, *,
            heldout_fraction: float = 0.01) -> str:
  """Tokenizes both splits of `files` into ArrayRecord shards under `out_dir` (skipped when a
  finished preparation of the same inputs is there); returns `out_dir`."""
  from array_record.python import array_record_module as ar  # noqa: PLC0415
  fp = _fingerprint(files, model, heldout_fraction)
  meta_path = os.path.join(out_dir, _META)
  if os.path.exists(meta_path):
    with open(meta_path, encoding="utf-8") as f:
      if json.load(f).get("fingerprint") == fp:
        return out_dir
  os.makedirs(out_dir, exist_ok=True)
  sp = _sentencepiece().SentencePieceProcessor(model_file=model)
  meta = {"format": _FORMAT, "fingerprint": fp, "tokenizer": os.path.abspath(model),
          "vocab_size": int(sp.vocab_size()), "files": [os.path.abspath(p) for p in files],
          "heldout_fraction": heldout_fraction, "record_tokens": RECORD_TOKENS, "splits": {}}
  for split in _SPLITS:
    texts = _split_texts(files, split, heldout_fraction)
    ids = np.concatenate([np.asarray(sp.encode(t), np.int32) for t in texts])
    path = os.path.join(out_dir, f"{split}.array_record")
    writer = ar.ArrayRecordWriter(path, "group_size:1")
    for start in range(0, len(ids), RECORD_TOKENS):
      writer.write(ids[start:start + RECORD_TOKENS].astype("<i4").tobytes())
    writer.close()
    meta["splits"][split] = {"tokens": int(len(ids)),
                             "bytes": int(sum(len(t.encode("utf-8")) for t in texts))}
  with open(meta_path + ".tmp", "w", encoding="utf-8") as f:   # written last: marks it done
    json.dump(meta, f, indent=2)
  os.replace(meta_path + ".tmp", meta_path)
  return out_dir


def cache_dir(files: list[str], model: str, root: str, heldout_fraction: float = 0.01) -> str:
  """Where a run's shards live: `root` (default ~/.cache/diloco_jax/tokens) / the fingerprint."""
  root = root or os.path.join(os.path.expanduser("~"), ".cache", "diloco_jax", "tokens")
  return os.path.join(root, _fingerprint(files, model, heldout_fraction))


class TokenShards:
  """A split of prepared shards as a token source: `elements(length, seed, split)` gives
  random-access windows of `length` consecutive tokens, in an order shuffled per epoch by
  (seed, split, epoch); element k is a pure function of k, so the grain iterator resumes
  exactly (data.make_batches)."""

  def __init__(self, directory: str, split: str = "train"):
    with open(os.path.join(directory, _META), encoding="utf-8") as f:
      self.meta = json.load(f)
    if self.meta.get("format") != _FORMAT:
      raise ValueError(f"{directory!r} holds no prepared token shards of format {_FORMAT!r}")
    self.directory, self.split = directory, split
    self.vocab_size = int(self.meta["vocab_size"])
    counts = self.meta["splits"][split]
    self.num_tokens, self.num_bytes = int(counts["tokens"]), int(counts["bytes"])

  @property
  def bytes_per_token(self) -> float:
    return self.num_bytes / max(self.num_tokens, 1)

  def elements(self, length: int, seed: int, split: str):
    source = TokenShards(self.directory, split) if split != self.split else self
    windows = _Windows(source, length, seed, 0 if split == "train" else 1)
    return windows, (f"TokenShards({self.meta['fingerprint']},split={split},"
                     f"tokens={source.num_tokens})")

  def __repr__(self) -> str:
    return f"TokenShards({self.directory!r}, split={self.split!r})"


class _Windows:
  """Element k: window perm_e[k mod n] of the split's stream, e = k // n (n whole windows)."""

  def __init__(self, shards: TokenShards, length: int, seed: int, split_id: int):
    import grain  # noqa: PLC0415
    self._records = grain.sources.ArrayRecordDataSource(
        [os.path.join(shards.directory, f"{shards.split}.array_record")])
    self._length, self._key = length, (seed, split_id)
    self._n = shards.num_tokens // length
    if self._n < 1:
      raise ValueError(f"the {shards.split} split has {shards.num_tokens} tokens, fewer than "
                       f"one window of {length} (data.seq_len + 1)")
    self._perm_epoch, self._perm = None, None

  def __len__(self) -> int:
    return 2**40   # effectively infinite: epochs repeat with fresh orders

  def _order(self, epoch: int) -> np.ndarray:
    if epoch != self._perm_epoch:
      self._perm = np.random.default_rng([*self._key, epoch]).permutation(self._n)
      self._perm_epoch = epoch
    return self._perm

  def tokens(self, start: int, stop: int) -> np.ndarray:
    """Tokens [start, stop) of the split's stream (across records)."""
    first, last = start // RECORD_TOKENS, (stop - 1) // RECORD_TOKENS
    chunk = np.concatenate([np.frombuffer(self._records[r], "<i4")
                            for r in range(first, last + 1)])
    off = start - first * RECORD_TOKENS
    return chunk[off:off + stop - start].astype(np.int32)

  def __getitem__(self, index: int) -> np.ndarray:
    epoch, k = divmod(int(index), self._n)
    w = int(self._order(epoch)[k])
    return self.tokens(w * self._length, (w + 1) * self._length)


def _expand(patterns: list[str]) -> list[str]:
  files = []
  for p in patterns:
    files += sorted(glob_lib.glob(p)) or [p]
  return files


def main(argv: list[str]) -> int:
  """`train --paths=GLOB[,GLOB] --vocab_size=N --out=PREFIX` or `prepare --paths=GLOB
  --tokenizer=MODEL --out=DIR`; bad input ends with one sentence and exit code 2."""
  usage = ("usage: python -m diloco_jax.tokenizer train --paths=GLOB --vocab_size=N --out=PREFIX"
           " | prepare --paths=GLOB --tokenizer=MODEL --out=DIR")
  if len(argv) < 2 or argv[1] not in ("train", "prepare"):
    print(usage, file=sys.stderr)
    return 2
  opts = {}
  for a in argv[2:]:
    key, eq, value = a.lstrip("-").partition("=")
    if not a.startswith("--") or not eq:
      print(f"tokenizer: arguments are --key=value, got {a!r}; {usage}", file=sys.stderr)
      return 2
    opts[key] = value
  need = {"train": ("paths", "vocab_size", "out"), "prepare": ("paths", "tokenizer", "out")}
  missing = [k for k in need[argv[1]] if k not in opts]
  unknown = sorted(set(opts) - set(need[argv[1]]))
  if missing or unknown:
    print(f"tokenizer {argv[1]}: missing {missing} / unknown {unknown} arguments; {usage}",
          file=sys.stderr)
    return 2
  files = _expand(opts["paths"].split(","))
  bad = [f for f in files if not os.path.isfile(f)]
  if bad:
    print(f"tokenizer: --paths entry {bad[0]!r} matches no file", file=sys.stderr)
    return 2
  try:
    if argv[1] == "train":
      if not opts["vocab_size"].isdigit() or int(opts["vocab_size"]) < 2:
        raise ValueError(f"--vocab_size must be an integer >= 2, got {opts['vocab_size']!r}")
      print(train(files, opts["out"], int(opts["vocab_size"])))
    else:
      check_model(opts["tokenizer"])
      print(prepare(files, opts["tokenizer"], opts["out"]))
  except (ValueError, RuntimeError) as e:   # RuntimeError: SentencePiece's own complaints
    print(f"tokenizer: {str(e).splitlines()[0]}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
