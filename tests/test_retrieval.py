"""Retrieval training data (retrieval.py): packed needle episodes mixed with text windows,
through make_batches (dict batches, resumable) and the config."""

import numpy as np
import pytest

from diloco_jax import config as config_lib
from diloco_jax import data, retrieval
from diloco_jax.evals import haystack
from tests.test_train import small_config

WORDS = ("the cat sat on a mat while rain fell over quiet hills and old roads wound far away "
         "into evening light").split()


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
  rng = np.random.default_rng(0)
  sentences = [" ".join(rng.choice(WORDS, rng.integers(4, 12))).capitalize() + "."
               for _ in range(3000)]
  path = tmp_path_factory.mktemp("text") / "t.txt"
  path.write_text(" ".join(sentences))
  return str(path)


def _windows(text_file, length=512, **kw):
  text = data.TextBytes(text_file, seq_len=length - 1)
  cfg = retrieval.RetrievalConfig(**kw)
  return retrieval.RetrievalMix(text, cfg).elements(length, 0, "train")[0], cfg


def test_episode_windows_weigh_exactly_the_answer_bytes(text_file):
  els, cfg = _windows(text_file, fraction=1.0, variants=("single", "multikey"), answer_weight=7.0)
  for i in range(20):
    w = els[i]
    tokens, seg, w_t = w["tokens"], w["segment_ids"], w["loss_weights"]
    assert seg[0] == 1 and np.all(np.diff(seg) >= 0)
    text = bytes(tokens.astype(np.uint8))
    # Every weight-7 run of targets is an answer: 7-digit values right after "number is: ".
    heavy = np.flatnonzero(w_t == 7.0) + 1   # token indices of the weighted targets
    for run in np.split(heavy, np.flatnonzero(np.diff(heavy) > 1) + 1):
      if len(run) == 0:
        continue
      assert text[run[0] - len(b"number is: "):run[0]] == b"number is: "
      digits = text[run[0]:run[-1] + 1]
      assert digits.isdigit() and (len(digits) == 7 or run[-1] == len(tokens) - 1)
    # Positions restart at every segment; nothing but answers, 1 and boundary zeros.
    starts = np.flatnonzero(np.diff(seg)) + 1
    assert np.all(w["positions"][starts] == 0)
    assert np.all(w_t[starts - 1] == 0)
    assert set(np.unique(w_t)) <= {0.0, 1.0, 7.0}


def test_the_episodes_answer_their_question(text_file):
  els, _ = _windows(text_file, fraction=1.0, variants=("multikey",))
  w = els[3]
  text = bytes(w["tokens"].astype(np.uint8)).decode()
  first = text.split("\n")[0:2]
  question = [line for line in text.split("\n") if line.startswith("What is")][0]
  key = question.split("special magic ")[1].split(" number")[0]
  value = question.split("number is: ")[1][:7]
  assert f"The special magic {key} number is: {value}." in "".join(first) + text
  assert key in haystack.CITIES


def test_text_windows_and_determinism(text_file):
  els, _ = _windows(text_file, fraction=0.0)
  w = els[5]
  np.testing.assert_array_equal(w["segment_ids"], np.ones(512))
  np.testing.assert_array_equal(w["loss_weights"], np.ones(511))
  for k in w:
    np.testing.assert_array_equal(els[5][k], w[k])
  mixed, _ = _windows(text_file, fraction=0.5)
  kinds = [mixed[i]["segment_ids"].max() > 1 for i in range(200)]
  assert 70 < sum(kinds) < 130   # about half the windows are episode packs


def test_make_batches_yields_dicts_and_resumes(text_file):
  text = data.TextBytes(text_file, seq_len=255)
  src = retrieval.RetrievalMix(text, retrieval.RetrievalConfig(fraction=1.0))
  it = data.make_batches(src, num_workers=2, batch_size=3, seq_len=255, seed=1, num_threads=0)
  first = next(it)
  assert first["tokens"].shape == (2, 3, 256) and first["loss_weights"].shape == (2, 3, 255)
  state = it.get_state()
  expected = next(it)
  again = data.make_batches(src, num_workers=2, batch_size=3, seq_len=255, seed=1,
                            num_threads=0)
  again.set_state(state)
  got = next(again)
  for k in expected:
    np.testing.assert_array_equal(got[k], expected[k])


def _run_config(text_file, **retrieval_keys):
  c = small_config()
  c.data.source = "text"
  c.data.paths = (text_file,)
  c.data.seq_len = 256
  for k, v in retrieval_keys.items():
    c.data.retrieval[k] = v
  return c


@pytest.mark.parametrize("keys,match", [
    (dict(fraction=1.5), r"data\.retrieval\.fraction must be in \[0, 1\]"),
    (dict(fraction=0.5, variants=("single", "nope")), r"data\.retrieval\.variants must be"),
    (dict(fraction=0.5, variants=("multiquery",)), r"data\.seq_len=256 is too short"),
    (dict(answer_weight=0.0), r"data\.retrieval\.answer_weight must be > 0"),
])
def test_bad_retrieval_configs_name_the_key(text_file, keys, match):
  with pytest.raises(config_lib.ConfigError, match=match):
    config_lib.from_config_dict(_run_config(text_file, **keys))


def test_retrieval_needs_text(text_file):
  c = _run_config(text_file, fraction=0.5)
  c.data.source = "synthetic"
  with pytest.raises(config_lib.ConfigError, match=r"needs data.source='text'"):
    config_lib.from_config_dict(c)
