"""Tests for diloco_jax.data: synthetic entropy, worker shards, splits, determinism, resume."""

import json
import math
import pathlib

import numpy as np
import pytest

from diloco_jax import data

ENGLISH_PD = pathlib.Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "english-pd"


def _take(it, n):
  return [next(it) for _ in range(n)]


# ----------------------------------------------------------------------------------------------
# SyntheticLanguage.
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lang():
  return data.SyntheticLanguage(vocab_size=256, num_classes=16, seed=0)


def test_entropy_rate_golden_and_bounds(lang):
  h = lang.entropy_rate()
  # Golden value: pins the default data distribution, so losses stay comparable across versions.
  assert h == pytest.approx(3.7492126507594334, rel=1e-12)
  assert 0.0 < h < math.log(256) - 1.0  # learnable: well below the uniform-guess loss
  assert data.entropy_floor(lang) == h
  assert data.bytes_per_token(lang) is None   # no bytes behind the synthetic tokens


def test_entropy_rate_matches_monte_carlo(lang):
  x = lang.sample(np.random.default_rng(123), 200_001)
  nll = -lang.transition_logprob(x[:-1], x[1:])  # exact -log p(x_t | x_{t-1}) = -log p(x_t | past)
  estimate = nll.mean()
  # Standard error from 100 batch means (robust to the chain's short-range correlation). The
  # per-token NLL has std ~1.5 nats, so SE ~ 1.5 / sqrt(2e5) ~ 0.0034 nats ~ 0.09% of h. A 1%
  # tolerance is ~11 SE: it fails for a wrong formula or a biased sampler, never by bad luck.
  batch_means = nll[: 100 * (len(nll) // 100)].reshape(100, -1).mean(axis=1)
  se = batch_means.std(ddof=1) / math.sqrt(100)
  h = lang.entropy_rate()
  assert abs(estimate - h) < 0.01 * h
  assert abs(estimate - h) < 6 * se


@pytest.mark.parametrize("vocab_size,num_classes,seed", [(256, 16, 0), (64, 64, 3), (50, 7, 9)])
def test_entropy_rate_equals_token_chain_entropy(vocab_size, num_classes, seed):
  # Independent route: the entropy rate of the token Markov chain, -sum_x p(x) sum_x' P log P.
  src = data.SyntheticLanguage(vocab_size, num_classes, seed)
  p_tok = src.transition_matrix()
  stationary = src.stationary_distribution()
  np.testing.assert_allclose(p_tok.sum(axis=1), 1.0, rtol=1e-12)
  assert (p_tok > 0).all()  # ergodic and aperiodic
  np.testing.assert_allclose(stationary @ p_tok, stationary, atol=1e-14)
  expected = -np.sum(stationary[:, None] * p_tok * np.log(p_tok))
  assert src.entropy_rate() == pytest.approx(expected, rel=1e-10)


def test_one_class_entropy_is_zipf_entropy():
  # One class: T = [[1]], tokens drawn i.i.d. from Zipf(1.1) over the 4 tokens.
  src = data.SyntheticLanguage(vocab_size=4, num_classes=1, seed=5)
  w = np.array([1.0, 2.0**-1.1, 3.0**-1.1, 4.0**-1.1])
  p = w / w.sum()
  np.testing.assert_allclose(np.sort(src.emission), np.sort(p), rtol=1e-14)
  assert src.entropy_rate() == pytest.approx(-np.sum(p * np.log(p)), rel=1e-12)
  assert src.entropy_rate() == pytest.approx(1.2133072297308, rel=1e-12)


def test_two_token_chain_entropy_by_hand():
  # Two classes of one token each: a two-state Markov chain with flip probabilities a = T[0,1],
  # b = T[1,0], stationary (b, a) / (a + b), so h = (b H2(a) + a H2(b)) / (a + b).
  src = data.SyntheticLanguage(vocab_size=2, num_classes=2, seed=1)
  a, b = src.class_transitions[0, 1], src.class_transitions[1, 0]

  def h2(q):
    return -q * math.log(q) - (1 - q) * math.log(1 - q)

  assert src.entropy_rate() == pytest.approx((b * h2(a) + a * h2(b)) / (a + b), rel=1e-12)
  np.testing.assert_allclose(src.class_stationary, np.array([b, a]) / (a + b), rtol=1e-12)


def test_single_token_language_has_zero_entropy():
  src = data.SyntheticLanguage(vocab_size=1, num_classes=1)
  assert src.entropy_rate() == 0.0
  np.testing.assert_array_equal(src.sample(np.random.default_rng(0), 5), np.zeros(5, np.int32))


def test_first_token_follows_stationary_distribution(lang):
  # 5,000 independent length-1 samples: each class frequency within 5 binomial std of pi.
  n = 5_000
  firsts = np.array([lang.sample(np.random.default_rng([7, i]), 1)[0] for i in range(n)])
  counts = np.bincount(lang.token_class[firsts], minlength=lang.num_classes)
  pi = lang.class_stationary
  assert np.all(np.abs(counts - n * pi) < 5 * np.sqrt(n * pi * (1 - pi)) + 1)


def test_sample_is_deterministic_and_in_range(lang):
  a = lang.sample(np.random.default_rng(42), 1000)
  b = lang.sample(np.random.default_rng(42), 1000)
  assert a.dtype == np.int32 and a.shape == (1000,)
  np.testing.assert_array_equal(a, b)
  assert a.min() >= 0 and a.max() < 256
  assert not np.array_equal(a, lang.sample(np.random.default_rng(43), 1000))
  # The same seed gives the same language; another seed another one.
  again = data.SyntheticLanguage(seed=0)
  np.testing.assert_array_equal(again.class_transitions, lang.class_transitions)
  assert not np.allclose(data.SyntheticLanguage(seed=1).class_transitions, lang.class_transitions)


# ----------------------------------------------------------------------------------------------
# Synthetic pipelines.
# ----------------------------------------------------------------------------------------------


def test_synthetic_batches_shape_and_exact_worker_partition(lang):
  m, b, seq_len, seed = 3, 2, 16, 11
  it = data.make_batches(lang, num_workers=m, batch_size=b, seq_len=seq_len, seed=seed)
  batches = _take(it, 3)
  seen = set()
  for step, batch in enumerate(batches):
    assert batch.shape == (m, b, seq_len + 1) and batch.dtype == np.int32
    assert batch.min() >= 0 and batch.max() < lang.vocab_size
    for w in range(m):
      for row in range(b):
        # Worker w, row `row` of step `step` is global stream element g, with g % M == w.
        g = step * m * b + row * m + w
        assert g % m == w
        expected = lang.sample(np.random.default_rng([seed, 0, g]), seq_len + 1)
        np.testing.assert_array_equal(batch[w, row], expected)
        seen.add(batch[w, row].tobytes())
  assert len(seen) == 3 * m * b  # no sequence served twice, within or across workers
  it.close()


def test_synthetic_eval_differs_from_train(lang):
  kwargs = dict(num_workers=2, batch_size=4, seq_len=32, seed=0)
  train = np.concatenate(_take(data.make_batches(lang, **kwargs), 2))
  evals = np.concatenate(_take(data.make_batches(lang, split="eval", **kwargs), 2))
  train_rows = {r.tobytes() for r in train.reshape(-1, 33)}
  eval_rows = {r.tobytes() for r in evals.reshape(-1, 33)}
  assert not train_rows & eval_rows
  np.testing.assert_array_equal(
    evals[0, 0], lang.sample(np.random.default_rng([0, 1, 0]), 33)
  )  # eval uses split_id 1


def test_synthetic_determinism_and_resume(lang):
  kwargs = dict(num_workers=2, batch_size=3, seq_len=8, seed=5)
  ref = _take(data.make_batches(lang, **kwargs), 6)
  it1 = data.make_batches(lang, **kwargs)
  first = _take(it1, 3)
  for a, b in zip(first, ref[:3]):
    np.testing.assert_array_equal(a, b)
  state = json.loads(json.dumps(it1.get_state()))
  assert state["next_index"] == 3
  it2 = data.make_batches(lang, num_threads=0, **kwargs)  # synchronous reader, same stream
  it2.set_state(state)
  for step in range(3):
    x1, x2 = next(it1), next(it2)
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(x1, ref[3 + step])
  # A different seed is a different stream.
  other = next(data.make_batches(lang, **{**kwargs, "seed": 6}))
  assert not np.array_equal(other, ref[0])


def test_set_state_rejects_other_pipeline(lang):
  it = data.make_batches(lang, num_workers=2, batch_size=3, seq_len=8, seed=5)
  next(it)
  state = it.get_state()
  other = data.make_batches(lang, num_workers=4, batch_size=3, seq_len=8, seed=5)
  with pytest.raises(ValueError, match="saved for pipeline"):
    other.set_state(state)
  with pytest.raises(ValueError, match="must be a dict with format"):
    other.set_state({"next_index": 1})


def test_eval_batches_is_a_fixed_set(lang):
  kwargs = dict(num_workers=2, batch_size=2, seq_len=8, seed=3)
  a = data.eval_batches(lang, num_batches=2, **kwargs)
  b = data.eval_batches(lang, num_batches=2, **kwargs)
  ref = _take(data.make_batches(lang, split="eval", **kwargs), 2)
  assert len(a) == 2
  for x, y, z in zip(a, b, ref):
    np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(x, z)


# ----------------------------------------------------------------------------------------------
# Text.
# ----------------------------------------------------------------------------------------------

SEQ_LEN = 7  # chunks of 8 bytes


@pytest.fixture
def numbered_file(tmp_path):
  """100 chunks of 8 bytes, chunk j = "%03dabcd\\n" % j, so every chunk names itself."""
  path = tmp_path / "numbered.txt"
  path.write_bytes(b"".join(b"%03dabcd\n" % j for j in range(100)))
  return path


def _chunk_ids(x):
  """Chunk ids of every row of int32[..., 8] arrays of the numbered file."""
  rows = x.reshape(-1, SEQ_LEN + 1)
  return [int(bytes(r[:3].astype(np.uint8))) for r in rows]


def test_text_chunks_and_heldout_split(numbered_file):
  train = data.TextBytes([str(numbered_file)], SEQ_LEN, heldout_fraction=0.1)
  evals = data.TextBytes(str(numbered_file), SEQ_LEN, split="eval", heldout_fraction=0.1)
  # 800 bytes: the last floor(0.1 * 800) = 80 bytes are eval (chunks 90..99), the rest train.
  assert len(train) == 90 and len(evals) == 10
  assert train[5].dtype == np.int32 and train[5].shape == (SEQ_LEN + 1,)
  assert bytes(train[5].astype(np.uint8)) == b"005abcd\n"
  assert bytes(evals[0].astype(np.uint8)) == b"090abcd\n"
  assert train.chunk_span(89) == (str(numbered_file), 712, 720)
  assert evals.chunk_span(0) == (str(numbered_file), 720, 728)
  train_bytes = {i for k in range(len(train)) for i in range(*train.chunk_span(k)[1:])}
  eval_bytes = {i for k in range(len(evals)) for i in range(*evals.chunk_span(k)[1:])}
  assert not train_bytes & eval_bytes
  assert train_bytes | eval_bytes == set(range(800))
  assert data.entropy_floor(train) is None
  assert data.bytes_per_token(train) == 1.0   # one token per byte
  with pytest.raises(IndexError, match="out of range"):
    train[90]


def test_text_workers_read_disjoint_shards_of_a_shuffled_epoch(numbered_file):
  src = data.TextBytes(str(numbered_file), SEQ_LEN, heldout_fraction=0.1)
  m, b = 3, 5  # 15 chunks per step, 90 per epoch -> 6 steps per epoch
  it = data.make_batches(src, num_workers=m, batch_size=b, seq_len=SEQ_LEN, seed=0)
  epoch1 = np.stack(_take(it, 6))  # [6, M, B, L+1]
  assert epoch1.shape == (6, m, b, SEQ_LEN + 1) and epoch1.dtype == np.int32
  per_worker = [set(_chunk_ids(epoch1[:, w])) for w in range(m)]
  for w in range(m):
    assert len(per_worker[w]) == 30  # no repeats within a worker
    for v in range(w + 1, m):
      assert not per_worker[w] & per_worker[v]  # disjoint shards
  order1 = _chunk_ids(epoch1.transpose(0, 2, 1, 3))  # stream order: step, row, worker
  assert sorted(order1) == list(range(90))  # the epoch is a permutation of all train chunks
  assert order1 != list(range(90))  # ...and shuffled
  epoch2 = np.stack(_take(it, 6))
  order2 = _chunk_ids(epoch2.transpose(0, 2, 1, 3))
  assert sorted(order2) == list(range(90)) and order2 != order1  # reshuffled each epoch
  other_seed = data.make_batches(src, num_workers=m, batch_size=b, seq_len=SEQ_LEN, seed=1)
  assert _chunk_ids(next(other_seed).transpose(1, 0, 2)) != order1[:15]


def test_text_eval_split_via_make_batches(numbered_file):
  src = data.TextBytes(str(numbered_file), SEQ_LEN, heldout_fraction=0.1)  # a train source
  kw = dict(num_workers=2, batch_size=5, seq_len=SEQ_LEN, seed=0)
  eval_ids = _chunk_ids(np.stack(_take(data.make_batches(src, split="eval", **kw), 3)))
  train_ids = _chunk_ids(np.stack(_take(data.make_batches(src, **kw), 3)))
  assert set(eval_ids) == set(range(90, 100))
  assert max(train_ids) < 90
  # The same files re-cut to another sequence length.
  longer = next(data.make_batches(src, num_workers=1, batch_size=2, seq_len=15, seed=0))
  assert longer.shape == (1, 2, 16)


def test_text_determinism_and_resume(numbered_file):
  src = data.TextBytes(str(numbered_file), SEQ_LEN, heldout_fraction=0.1)
  kw = dict(num_workers=2, batch_size=4, seq_len=SEQ_LEN, seed=9)
  ref = _take(data.make_batches(src, **kw), 16)  # crosses the 90-chunk epoch boundary
  it1 = data.make_batches(src, **kw)
  _take(it1, 10)
  state = json.loads(json.dumps(it1.get_state()))
  it2 = data.make_batches(data.TextBytes(str(numbered_file), SEQ_LEN, heldout_fraction=0.1), **kw)
  it2.set_state(state)
  for step in range(10, 16):
    x1, x2 = next(it1), next(it2)
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(x1, ref[step])


def test_text_paths_globs_and_directories(tmp_path):
  (tmp_path / "a.txt").write_bytes(b"a" * 40)
  (tmp_path / "b.txt").write_bytes(b"b" * 40)
  (tmp_path / "c.md").write_bytes(b"c" * 40)
  by_dir = data.TextBytes(str(tmp_path), 7, heldout_fraction=0.0)
  by_glob = data.TextBytes(str(tmp_path / "*.txt"), 7, heldout_fraction=0.0)
  assert by_dir.paths == by_glob.paths == [str(tmp_path / "a.txt"), str(tmp_path / "b.txt")]
  assert len(by_dir) == 10
  both = data.TextBytes([str(tmp_path / "a.txt"), str(tmp_path / "*.txt")], 7, heldout_fraction=0)
  assert len(both.paths) == 2  # a file named twice is read once


@pytest.mark.skipif(not ENGLISH_PD.is_dir(), reason=f"{ENGLISH_PD} is absent (CI has it)")
def test_english_pd_smoke():
  train = data.TextBytes(str(ENGLISH_PD), 256)
  evals = train.respec(split="eval")
  assert len(train.paths) == 3
  total = sum(pathlib.Path(p).stat().st_size for p in train.paths)
  assert len(train) == sum(
    (n - math.floor(0.01 * n)) // 257 for n in (pathlib.Path(p).stat().st_size for p in train.paths)
  )
  assert 0.98 * total / 257 < len(train) + len(evals) <= total / 257
  for k in (0, len(evals) - 1):  # every eval chunk starts after every train chunk of its file
    path, start, _ = evals.chunk_span(k)
    train_stops = [s[2] for s in map(train.chunk_span, range(len(train))) if s[0] == path]
    assert max(train_stops) <= start
  batch = next(data.make_batches(train, num_workers=2, batch_size=4, seq_len=256, seed=0))
  assert batch.shape == (2, 4, 257) and batch.dtype == np.int32
  text = bytes(batch.astype(np.uint8).ravel())
  letters = sum(chr(c).isalpha() or chr(c).isspace() for c in text)
  assert letters > 0.85 * len(text)  # English prose, not noise
  assert data.entropy_floor(train) is None


# ----------------------------------------------------------------------------------------------
# Bad input: one clear sentence.
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [(0,), (1, 2), (0, 3), (3,)])
def test_worker_subset_reads_exactly_those_rows_and_resumes_like_the_full_stream(
  lang, numbered_file, workers
):
  # A process feeding some workers (multi-process runs) gets those rows of the full batch, and
  # the iterator state is interchangeable with the full iterator's (a checkpoint written by one
  # process layout restores onto another).
  for src in (lang, data.TextBytes(str(numbered_file), SEQ_LEN, heldout_fraction=0.1)):
    kw = dict(num_workers=4, batch_size=2, seq_len=SEQ_LEN, seed=3)
    full = _take(data.make_batches(src, **kw), 3)
    part_it = data.make_batches(src, workers=workers, **kw)
    part = _take(part_it, 2)
    for f, p in zip(full, part):
      np.testing.assert_array_equal(p, f[list(workers)])
    resumed = data.make_batches(src, **kw)
    resumed.set_state(part_it.get_state())
    np.testing.assert_array_equal(next(resumed), full[2])


@pytest.mark.parametrize("workers", [(), (1, 0), (0, 4), (-1,), (2, 2)])
def test_worker_subset_must_be_valid(lang, workers):
  with pytest.raises(ValueError, match=r"workers must be distinct ascending worker indices in \[0, 4\)"):
    data.make_batches(lang, num_workers=4, batch_size=1, seq_len=4, seed=0, workers=workers)


@pytest.mark.parametrize(
  "override,match",
  [
    ({"seq_len": 0}, "seq_len must be an integer >= 1, got 0"),
    ({"batch_size": 0}, "batch_size must be an integer >= 1, got 0"),
    ({"num_workers": 0}, "num_workers must be an integer >= 1, got 0"),
    ({"num_workers": True}, "num_workers must be an integer >= 1, got True"),
    ({"seed": -1}, "seed must be an integer >= 0, got -1"),
    ({"split": "test"}, r"split must be one of \('train', 'eval'\), got 'test'"),
  ],
)
def test_make_batches_rejects_bad_arguments(lang, override, match):
  kwargs = dict(num_workers=2, batch_size=2, seq_len=8, seed=0) | override
  with pytest.raises(ValueError, match=match):
    data.make_batches(lang, **kwargs)


def test_bad_sources_are_rejected(tmp_path, numbered_file):
  short = tmp_path / "short.txt"
  short.write_bytes(b"tiny")
  with pytest.raises(ValueError, match=r"short.txt' has 4 bytes, fewer than one sequence"):
    data.TextBytes(str(short), 7)
  with pytest.raises(FileNotFoundError, match="nope.txt' does not exist"):
    data.TextBytes(str(tmp_path / "nope.txt"), 7)
  with pytest.raises(FileNotFoundError, match=r"pattern .*\*.bin' matches no files"):
    data.TextBytes(str(tmp_path / "*.bin"), 7)
  with pytest.raises(ValueError, match="split must be one of"):
    data.TextBytes(str(numbered_file), 7, split="validation")
  with pytest.raises(ValueError, match=r"heldout_fraction must be in \[0, 1\)"):
    data.TextBytes(str(numbered_file), 7, heldout_fraction=1.0)
  with pytest.raises(ValueError, match="split 'eval' holds no complete sequence"):
    data.TextBytes(str(numbered_file), 7, split="eval", heldout_fraction=0.0)
  with pytest.raises(ValueError, match="num_classes must be <= vocab_size"):
    data.SyntheticLanguage(vocab_size=4, num_classes=5)
  with pytest.raises(TypeError, match="source must be a SyntheticLanguage, TextBytes or a source with elements"):
    data.make_batches([1, 2, 3], num_workers=1, batch_size=1, seq_len=1, seed=0)
