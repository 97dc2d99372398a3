"""Subword tokenization: a SentencePiece model trained on the train split only, shards that hold
exactly the encoded splits, windows that resume exactly, bits per byte, a subword training run
and the config / command errors."""

import json
import os

import numpy as np
import pytest
import sentencepiece as spm

from diloco_jax import config as config_lib, data, tokenizer, train
from tests.test_train import small_config


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """Two small English-like files, a SentencePiece model (vocab 300) and their shards."""
  words = ("the of and to in that was he it his with as had for not but at by on this be which "
           "from all were they she her one you so said there would their them we an been "
           "café naïve").split()
  root = tmp_path_factory.mktemp("tok")
  files, state = [], 7
  for name in ("a.txt", "b.txt"):
    out = []
    for i in range(3000):
      state = (state * 1103515245 + 12345) % 2**31
      out.append(words[state % len(words)] + ("\n" if i % 17 == 16 else ""))
    (root / name).write_text(" ".join(out), encoding="utf-8")
    files.append(str(root / name))
  model = tokenizer.train(files, str(root / "spm" / "m"), 300)
  shards = tokenizer.prepare(files, model, str(root / "shards"))
  return files, model, shards, root


def test_shards_hold_the_encoded_splits_and_bytes_per_token(corpus):
  files, model, shards, _ = corpus
  sp = spm.SentencePieceProcessor(model_file=model)
  assert sp.vocab_size() == 300
  for split in ("train", "eval"):
    text = data.TextBytes(files, seq_len=1, split=split)
    regions = [bytes(text.region(f)).decode("utf-8", errors="ignore") for f in range(2)]
    want = np.concatenate([np.asarray(sp.encode(r), np.int32) for r in regions])
    src = tokenizer.TokenShards(shards, split)
    windows, _ = src.elements(8, 0, split)
    np.testing.assert_array_equal(windows.tokens(0, len(want)), want)
    assert src.num_tokens == len(want)
    assert src.num_bytes == sum(len(r.encode("utf-8")) for r in regions)
    assert data.bytes_per_token(src) == pytest.approx(src.num_bytes / src.num_tokens)
    assert 1.5 < src.bytes_per_token < 8   # subwords: several bytes per token
    assert sp.decode(want.tolist()) == "".join(regions)   # byte fallback: lossless
  # Prepared once: a second call with the same inputs rewrites nothing.
  mtime = os.path.getmtime(os.path.join(shards, "train.array_record"))
  tokenizer.prepare(files, model, shards)
  assert os.path.getmtime(os.path.join(shards, "train.array_record")) == mtime


def test_windows_cover_the_stream_in_a_seeded_order_per_epoch(corpus):
  _, _, shards, _ = corpus
  src = tokenizer.TokenShards(shards, "train")
  L = 33
  windows, _ = src.elements(L, 5, "train")
  n = src.num_tokens // L
  starts = set()
  for k in range(n):   # one epoch: every whole window exactly once
    w = windows[k]
    assert w.shape == (L,) and w.dtype == np.int32
    hits = [i for i in range(n) if np.array_equal(windows.tokens(i * L, (i + 1) * L), w)]
    starts.add(hits[0])
  assert starts == set(range(n))
  again, _ = src.elements(L, 5, "train")
  np.testing.assert_array_equal(again[n + 3], windows[n + 3])   # a pure function of k
  other, _ = src.elements(L, 6, "train")
  assert not all(np.array_equal(other[k], windows[k]) for k in range(5))


def test_iterator_resumes_exactly(corpus):
  _, _, shards, _ = corpus
  src = tokenizer.TokenShards(shards, "train")
  kw = dict(num_workers=2, batch_size=3, seq_len=16, seed=0)
  it = data.make_batches(src, **kw)
  for _ in range(4):
    next(it)
  state = it.get_state()
  want = [next(it) for _ in range(3)]
  it.close()
  it = data.make_batches(src, **kw)
  it.set_state(json.loads(json.dumps(state)))
  for w in want:
    np.testing.assert_array_equal(next(it), w)
  it.close()


def test_a_subword_run_trains_and_reports_bits_per_byte(corpus, tmp_path):
  files, model, _, root = corpus
  cfg = small_config(**{"data.source": "text", "data.paths": tuple(files),
                        "data.tokenizer": model, "data.token_cache": str(root / "cache"),
                        "train.num_steps": 8, "diloco.inner_steps": 4})
  rc = config_lib.from_config_dict(cfg)
  assert rc.data.vocab == 300 and rc.model.vocab_size == 300
  s = train.run(cfg, str(tmp_path / "run"))
  bpt = tokenizer.TokenShards(tokenizer.cache_dir(files, model, str(root / "cache")),
                              "eval").bytes_per_token
  assert s["final_eval_bits_per_byte"] == pytest.approx(
      s["final_eval_loss"] / (np.log(2.0) * bpt), rel=1e-9)
  assert s["final_eval_loss"] < np.log(300)   # learned something


BAD = [
    ({"data.source": "text", "data.tokenizer": "/nonexistent/m.model"},
     r"data.tokenizer='/nonexistent/m.model' is neither 'bytes' nor an existing SentencePiece"),
    ({"data.tokenizer": "MODEL"}, r"data.tokenizer=.* tokenizes text files; it needs "
                                  r"data.source='text'"),
    ({"data.source": "text", "data.tokenizer": "MODEL", "data.retrieval.fraction": 0.5,
      "data.seq_len": 256},
     r"data.retrieval.fraction needs data.tokenizer='bytes'"),
    ({"data.source": "text", "data.tokenizer": "NOT_A_MODEL"},
     r"is not a SentencePiece model"),
]


@pytest.mark.parametrize("overrides,message", BAD)
def test_bad_tokenizer_configs_are_one_sentence(corpus, overrides, message):
  files, model, _, root = corpus
  junk = root / "junk.model"
  junk.write_text("not a model")
  swap = {"MODEL": model, "NOT_A_MODEL": str(junk)}
  overrides = {k: swap.get(v, v) if isinstance(v, str) else v for k, v in overrides.items()}
  overrides.setdefault("data.paths", tuple(files))
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.from_config_dict(small_config(**overrides))


def test_command_errors_are_one_sentence(corpus, capsys):
  files, model, _, root = corpus
  assert tokenizer.main(["tok", "train", f"--paths={files[0]}", "--vocab_size=x",
                         f"--out={root / 'x'}"]) == 2
  assert "--vocab_size must be an integer >= 2, got 'x'" in capsys.readouterr().err
  assert tokenizer.main(["tok", "prepare", "--paths=/nonexistent/*.txt", f"--tokenizer={model}",
                         f"--out={root / 'y'}"]) == 2
  assert "matches no file" in capsys.readouterr().err
  assert tokenizer.main(["tok", "bogus"]) == 2
  assert tokenizer.main(["tok", "prepare", f"--paths={files[0]}", f"--tokenizer={model}",
                         f"--out={root / 'z'}"]) == 0
  assert capsys.readouterr().out.strip() == str(root / "z")
