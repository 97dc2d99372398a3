"""Needle in a haystack: episode construction (exact length, needles at the asked depth snapped
back to a sentence start, question last, answers per variant, the control), scoring of
hand-written outputs, bad input; then the evaluation loop: an oracle that writes the right
answer recalls everything and nothing on the control, a tiny random transformer runs the
command end to end (JSON + PNG), and RULER's effective length on a hand-written result."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diloco_jax import model as model_lib
from diloco_jax import train
from diloco_jax.evals import haystack as hs
from diloco_jax.evals import heldout, needle

# Real-looking text: sentences of varied length, paragraphs, quotes, an abbreviation, a
# non-ASCII character (byte offsets differ from character offsets).
_SENTENCES = [
    "It was a bright cold day in April.", "Mr. Brown walked slowly to the station.",
    "The clocks were striking thirteen!", "Was anyone listening?",
    "\u201cNobody knows,\u201d she said.", "A caf\u00e9 stood on the corner of the square.",
    "Rain fell all afternoon and into the evening.", "He did not mind.",
]


def _text(n_bytes: int = 20000, seed: int = 0) -> str:
  rng = np.random.default_rng(seed)
  parts, size = [], 0
  while size < n_bytes:
    s = _SENTENCES[rng.integers(len(_SENTENCES))]
    sep = "\n\n" if rng.random() < 0.1 else ("\n" if rng.random() < 0.2 else " ")
    parts.append(s + sep)
    size += len((s + sep).encode())
  return "".join(parts)


TEXT = _text()
HAY = hs.Haystack.of(TEXT)


# ----------------------------------------------------------------------------------------------
# Sentence starts.
# ----------------------------------------------------------------------------------------------
def test_sentence_starts_rule():
  text = "Mr. Darcy came. He said \u201cHi.\u201d Then\n\nNew para! ok? x  y.\nwrapped line"
  starts = hs.sentence_starts(text)
  words = [text[i:i + 4] for i in starts]
  # "Mr." is an abbreviation; a quote may close a sentence; a paragraph break starts one; a
  # single newline inside a paragraph (hard-wrapped text) does not, unless a sentence ended.
  assert words == ["Mr. ", "He s", "Then", "New ", "ok? ", "x  y", "wrap"]
  assert hs.sentence_starts("") == []
  # bytes give byte offsets, the same boundaries
  b = text.encode()
  assert [b[i:i + 4].decode("utf-8", "replace") for i in hs.sentence_starts(b)] == words


def test_sentence_starts_bad_input():
  with pytest.raises(TypeError, match="text must be a str or bytes"):
    hs.sentence_starts(123)


# ----------------------------------------------------------------------------------------------
# Episodes.
# ----------------------------------------------------------------------------------------------
def _haystack_of(ep: hs.Episode) -> bytes:
  """The episode's haystack (its prompt without needles and question)."""
  body = ep.prompt[:len(ep.prompt) - len(ep.question.encode())]
  cuts = sorted(zip(ep.needle_offsets, ep.keys, ep.values))
  out, prev = [], 0
  for off, k, v in cuts:
    out.append(body[prev:off])
    needle = (ep.template.replace("{key}", k).replace("{value}", v) + " ").encode()
    assert body[off:off + len(needle)] == needle
    prev = off + len(needle)
  out.append(body[prev:])
  return b"".join(out)


@pytest.mark.parametrize("length", [200, 512, 1001])
@pytest.mark.parametrize("depth", [0.0, 0.1, 0.37, 0.5, 0.9, 1.0])
def test_single_needle_at_depth_on_sentence_start(length, depth):
  ep = hs.make_episode(HAY, length, depth, np.random.default_rng(7), variant="single")
  assert len(ep.prompt) == length
  ep.prompt.decode("utf-8")   # never a split character
  hay = _haystack_of(ep)
  assert len(hay) == ep.haystack_len
  assert hay == HAY.data[ep.start:ep.start + ep.haystack_len]
  starts = [0] + [s for s in hs.sentence_starts(hay) if s > 0]
  (off,) = ep.haystack_offsets
  assert off in starts
  assert off == max(s for s in starts if s <= depth * len(hay))
  assert ep.needle_offsets == (off,)   # nothing was inserted before it
  # the needle follows a whitespace (or is first), the question is last, the answer is the value
  assert off == 0 or ep.prompt[off - 1:off].isspace()
  key, value = ep.keys[0], ep.values[0]
  assert ep.prompt.endswith(
      f"\nWhat is the special magic {key} number? The special magic {key} number is: ".encode())
  assert ep.answer == value.encode() and len(value) == 7 and value[0] != "0"
  assert ep.prompt.count(value.encode()) == 1 and ep.queried == (key,)


def test_start_is_a_sentence_start_and_varies():
  rng = np.random.default_rng(0)
  starts = {hs.make_episode(HAY, 300, 0.5, rng).start for _ in range(20)}
  assert len(starts) > 10 and starts <= set(HAY.starts.tolist())
  ep = hs.make_episode(TEXT, 300, 0.5, rng, start=5)
  assert ep.start == 5 and len(ep.prompt) == 300


def test_multikey():
  rng = np.random.default_rng(1)
  ep = hs.make_episode(HAY, 1500, [0.8, 0.1, 0.4, 0.6], rng, variant="multikey")
  assert len(ep.prompt) == 1500 and len(ep.keys) == 4 and len(set(ep.keys)) == 4
  assert set(ep.keys) <= set(hs.CITIES) and len(set(ep.values)) == 4
  assert ep.queried == (ep.keys[0],) and ep.answer == ep.values[0].encode()
  assert ep.prompt.endswith(f"The special magic {ep.keys[0]} number is: ".encode())
  for k in ep.keys[1:]:   # distractors are in the prompt but not asked for
    assert f"The special magic {k} number is:".encode() in ep.prompt
    assert f"magic {k} number?".encode() not in ep.prompt
  hay = _haystack_of(ep)
  starts = [0] + [s for s in hs.sentence_starts(hay) if s > 0]
  for d, off in zip(ep.depths, ep.haystack_offsets):
    assert off == max(s for s in starts if s <= d * len(hay))
  # needles in prompt order follow their depths
  order = np.argsort(ep.needle_offsets)
  assert list(order) == [1, 2, 3, 0]


def test_multikey_one_depth_places_needle_zero_and_draws_the_rest():
  ep = hs.make_episode(HAY, 1500, 0.25, np.random.default_rng(2), variant="multikey",
                       num_needles=3)
  assert ep.depths[0] == 0.25 and len(ep.depths) == 3 and len(ep.keys) == 3
  assert all(0 <= d <= 1 for d in ep.depths[1:])


def test_multivalue_answer_lists_values_in_prompt_order():
  ep = hs.make_episode(HAY, 1500, [0.9, 0.2, 0.5, 0.0], np.random.default_rng(3),
                       variant="multivalue")
  assert len(set(ep.keys)) == 1 and len(set(ep.values)) == 4 and len(ep.prompt) == 1500
  in_prompt = [ep.values[i] for i in np.argsort(ep.needle_offsets)]
  assert ep.answer == ", ".join(in_prompt).encode()
  assert ep.answer_values == tuple(in_prompt) and in_prompt[0] == ep.values[3]
  key = ep.keys[0]
  assert ep.prompt.endswith(f"The special magic {key} numbers are: ".encode())


def test_multiquery_answer_follows_question_order():
  ep = hs.make_episode(HAY, 1500, [0.1, 0.3, 0.5, 0.7], np.random.default_rng(4),
                       variant="multiquery")
  assert len(set(ep.keys)) == 4 and sorted(ep.queried) == sorted(ep.keys)
  q = ep.queried
  assert ep.prompt.endswith(
      f"The special magic numbers for {q[0]}, {q[1]}, {q[2]} and {q[3]} are: ".encode())
  value_of = dict(zip(ep.keys, ep.values))
  assert ep.answer == ", ".join(value_of[k] for k in q).encode()


def test_custom_keys_template_question_digits():
  ep = hs.make_episode(HAY, 400, 0.5, np.random.default_rng(5), keys=["apple", "pear"],
                       value_digits=3, template="The {key} code is {value}.",
                       question="\nThe {key} code is ")
  assert ep.keys[0] in ("apple", "pear") and len(ep.values[0]) == 3
  assert f"The {ep.keys[0]} code is {ep.values[0]}. ".encode() in ep.prompt
  assert ep.prompt.endswith(f"\nThe {ep.keys[0]} code is ".encode()) and len(ep.prompt) == 400


def test_non_ascii_cut_keeps_valid_utf8_and_exact_length():
  text = ("\u00e9t\u00e9 \u00e0 Paris. " * 200)
  for length in range(150, 170):
    ep = hs.make_episode(text, length, 0.5, np.random.default_rng(length))
    assert len(ep.prompt) == length
    ep.prompt.decode("utf-8")


def test_wrong_needle_hand_written():
  """A multi-key miss that gives a distractor's value counts as the wrong needle; a hit, a
  garbled number and a single needle's miss do not."""
  ep = hs.make_episode(HAY, 900, 0.5, np.random.default_rng(1), variant="multikey")
  asked = ep.answer_values[0]
  others = [v for v in ep.values if v != asked]
  assert len(others) == 3 and ep.answer == asked.encode()
  assert hs.wrong_needle(" " + others[1] + ".", ep) == 1.0
  assert hs.wrong_needle(asked + ".", ep) == 0.0                 # a hit
  garbled = next(x for x in ("1111111", "2222222", "3333333") if x not in ep.values)
  assert hs.wrong_needle(garbled, ep) == 0.0
  assert hs.wrong_needle(others[0] + "9", ep) == 0.0             # glued digits: another number
  single = hs.make_episode(HAY, 300, 0.5, np.random.default_rng(2), variant="single")
  assert hs.wrong_needle("1234", single) == 0.0


@pytest.mark.parametrize("variant", hs.VARIANTS)
def test_control_same_question_answer_length_no_needle(variant):
  ep = hs.make_episode(HAY, 800, 0.5, np.random.default_rng(6), variant=variant)
  ctrl = hs.remove_needles(ep, HAY)
  made = hs.make_episode(HAY, 800, 0.5, np.random.default_rng(6), variant=variant,
                         needles=False)
  assert ctrl == made
  assert len(ctrl.prompt) == 800 and not ctrl.needles and ctrl.needle_offsets == ()
  assert ctrl.answer == ep.answer and ctrl.question == ep.question and ctrl.start == ep.start
  assert ctrl.prompt.endswith(ep.question.encode())
  assert b"special magic" not in ctrl.prompt[:-len(ep.question.encode())]
  for v in ep.values:
    assert v.encode() not in ctrl.prompt
  assert ctrl.prompt[:-len(ep.question.encode())] == HAY.data[ep.start:ep.start + 800 - len(
      ep.question.encode())]


def test_deterministic_given_rng():
  a = hs.make_episode(TEXT, 700, 0.3, np.random.default_rng(9), variant="multikey")
  b = hs.make_episode(TEXT, 700, 0.3, np.random.default_rng(9), variant="multikey")
  assert a == b


def test_bad_input():
  rng = np.random.default_rng(0)
  with pytest.raises(ValueError, match="fewer than the .* bytes of haystack"):
    hs.make_episode("Too short. Really.", 300, 0.5, rng)
  with pytest.raises(ValueError, match="length=60 is too short"):
    hs.make_episode(HAY, 60, 0.5, rng, variant="multikey")
  with pytest.raises(ValueError, match="variant must be one of"):
    hs.make_episode(HAY, 300, 0.5, rng, variant="variable_tracking")
  with pytest.raises(ValueError, match="depth must be a number in"):
    hs.make_episode(HAY, 300, 1.5, rng)
  with pytest.raises(ValueError, match="depth must be one number or 4 numbers"):
    hs.make_episode(HAY, 900, [0.1, 0.2], rng, variant="multikey")
  with pytest.raises(ValueError, match="keys holds 2 keys, fewer than the 4"):
    hs.make_episode(HAY, 900, 0.5, rng, variant="multiquery", keys=["a", "b"])
  with pytest.raises(ValueError, match="keys must be distinct"):
    hs.make_episode(HAY, 900, 0.5, rng, keys=["a", "a"])
  with pytest.raises(ValueError, match="template must contain"):
    hs.make_episode(HAY, 300, 0.5, rng, template="no slots")
  with pytest.raises(ValueError, match="must contain {keys}"):
    hs.make_episode(HAY, 900, 0.5, rng, variant="multiquery", question="{key}?")
  with pytest.raises(ValueError, match="value_digits must be an integer in"):
    hs.make_episode(HAY, 300, 0.5, rng, value_digits=0)
  with pytest.raises(ValueError, match="length must be an integer"):
    hs.make_episode(HAY, 0, 0.5, rng)
  with pytest.raises(ValueError, match="from start=.* needs"):
    hs.make_episode(HAY, 300, 0.5, rng, start=len(HAY.data) - 10)
  with pytest.raises(TypeError, match="text must be"):
    hs.make_episode(12, 300, 0.5, rng)


# ----------------------------------------------------------------------------------------------
# Scoring.
# ----------------------------------------------------------------------------------------------
def test_score_single_hand_written():
  assert hs.score(" 1234567.", b"1234567") == 1.0
  assert hs.score("1234567", "1234567") == 1.0
  assert hs.score(b"  1234567\nWhat", "1234567") == 1.0
  assert hs.score("1234568", "1234567") == 0.0
  assert hs.score("12345678", "1234567") == 0.0      # a different, longer number
  assert hs.score("x 1234567", "1234567") == 0.0      # must start the generation
  assert hs.score("123456", "1234567") == 0.0
  assert hs.exact(" 1234567.", "1234567") == 1.0


def test_score_multi_hand_written():
  ans = b"1234567, 7654321"
  assert hs.score("1234567, 7654321.", ans) == 1.0
  assert hs.score("7654321, 1234567", ans) == 1.0      # any order
  assert hs.score("1234567, 9999999", ans) == 0.5
  assert hs.score("12345678, 7654321", ans) == 0.5     # glued digits do not count
  assert hs.score("nothing", ans) == 0.0
  assert hs.exact(" 1234567, 7654321\n", ans) == 1.0
  assert hs.exact("7654321, 1234567", ans) == 0.0      # exact: the whole answer, in order
  assert hs.exact("1234567, 9999999", ans) == 0.0
  ep = hs.make_episode(HAY, 900, 0.5, np.random.default_rng(0), variant="multivalue")
  assert hs.score(ep.answer, ep) == 1.0 and hs.exact(ep.answer + b".", ep) == 1.0
  half = ", ".join(ep.answer_values[:2]) + ", 1, 2"
  assert hs.score(half, ep) == 0.5
  with pytest.raises(TypeError, match="output must be bytes or str"):
    hs.score(5, ans)


@pytest.mark.parametrize("variant", hs.VARIANTS)
def test_min_length_is_the_shortest_accepted(variant):
  n = hs.min_length(variant)
  for seed in range(20):
    assert len(hs.make_episode(HAY, n, 0.5, np.random.default_rng(seed),
                               variant=variant).prompt) == n
  # keys of one length: every draw is the longest, so one byte less leaves no haystack
  keys = ["Aaaa", "Bbbb", "Cccc", "Dddd"]
  n = hs.min_length(variant, keys=keys)
  assert len(hs.make_episode(HAY, n, 0.5, np.random.default_rng(0), variant=variant,
                             keys=keys).prompt) == n
  with pytest.raises(ValueError, match="too short"):
    hs.make_episode(HAY, n - 1, 0.5, np.random.default_rng(0), variant=variant, keys=keys)


# ----------------------------------------------------------------------------------------------
# The evaluation loop.
# ----------------------------------------------------------------------------------------------
_MATCH = 24   # bytes of context the oracle matches: "magic Paris number is: " and a bit


def oracle_apply(params, tokens_BxW, match_bytes=_MATCH):
  """An induction-head oracle: at every position, predict the byte that followed the latest
  earlier occurrence of the last `match_bytes` bytes (a NUL byte if there is none). On a needle
  prompt the question's tail "...magic Paris number is: " occurs once before, in Paris's
  needle, so it copies the value; on the control there is nothing to copy."""
  del params
  _, w = tokens_BxW.shape
  p = jnp.arange(w)[:, None]
  j = jnp.arange(w)[None, :]
  match = (j < p) & (j >= match_bytes - 1)
  eq = tokens_BxW[:, :, None] == tokens_BxW[:, None, :]
  for k in range(match_bytes):
    match = match & jnp.roll(eq, (k, k), axis=(1, 2))
  last_BxW = jnp.max(jnp.where(match, j, -1), axis=-1)
  nxt = jnp.take_along_axis(tokens_BxW, jnp.clip(last_BxW + 1, 0, w - 1), axis=1)
  nxt = jnp.where(last_BxW >= 0, nxt, 0)
  return jax.nn.one_hot(nxt, 256) * 10.0


def test_oracle_recalls_everything_and_nothing_on_the_control():
  result = needle.evaluate(oracle_apply, None, [TEXT, _text(8000, seed=1)], [300, 400],
                           [0.0, 0.5, 1.0], ["single", "multikey"], trials=3, rng_seed=0,
                           train_length=300, batch_size=8)
  assert len(result["cells"]) == 2 * 2 * 3
  for c in result["cells"]:
    assert c["recall"] == 1.0 and c["exact"] == 1.0 and c["trials"] == 3
    assert c["extrapolation"] == (c["length"] > 300)
  assert [c["recall"] for c in result["control"]] == [0.0] * 4
  for v in ("single", "multikey", "all"):
    assert [r["recall"] for r in result["per_length"][v]] == [1.0, 1.0]
    assert result["effective_length"][v] == 400
  assert result["per_length"]["single"][0]["control"] == 0.0
  assert [r["wrong_needle"] for r in result["per_length"]["multikey"]] == [0.0, 0.0]


def test_wrong_needle_share_of_an_oracle_that_ignores_the_key():
  """Matching only " number is: " (12 bytes, no key), the oracle copies the needle that comes
  last in the prompt: every single needle is right, and every multi-key miss is another
  needle's value, so recall + wrong-needle share = 1 exactly."""
  result = needle.evaluate(lambda p, t: oracle_apply(p, t, match_bytes=12), None,
                           [TEXT, _text(8000, seed=1)], [300, 400], [0.0, 0.5, 1.0],
                           ["single", "multikey"], trials=3, rng_seed=0, control=False,
                           batch_size=8)
  for r in result["per_length"]["single"]:
    assert (r["recall"], r["wrong_needle"]) == (1.0, 0.0)
  mk = result["per_length"]["multikey"]
  assert all(r["recall"] + r["wrong_needle"] == pytest.approx(1.0) for r in mk)
  assert min(r["wrong_needle"] for r in mk) > 0   # the queried needle is not always last


def test_decode_equals_unpadded_step_by_step_forward():
  """The jitted buffer decoder = one unpadded forward per generated byte (right padding and
  the blockwise tile padding change nothing)."""
  cfg = model_lib.ModelConfig(vocab_size=256, num_layers=1, d_model=32, num_heads=2, ffn_dim=64,
                              attention="blockwise", attention_block=16)
  params = model_lib.init_params(cfg, jax.random.PRNGKey(0))
  apply_fn = heldout.model_apply(cfg)
  prompts = [TEXT.encode()[i:i + 37] for i in (0, 50, 100)]
  got = needle.decode(apply_fn, params, prompts, 3, batch_size=2, pad_multiple=16)
  assert len(got) == 3 and all(len(o) == 3 for o in got)
  dense = jax.jit(heldout.model_apply(dataclasses.replace(cfg, attention="dense")))
  for prompt, out in zip(prompts, got):
    toks = list(prompt)
    for _ in range(3):   # 3 lengths, 3 compiles, shared by the 3 prompts
      logits = dense(params, jnp.asarray([toks], jnp.int32))[0, -1]
      toks.append(int(jnp.argmax(logits[:256])))
    assert bytes(toks[len(prompt):]) == out


def test_effective_length_on_a_hand_written_result():
  rows = [{"length": 256, "recall": 1.0}, {"length": 512, "recall": 0.856},
          {"length": 1024, "recall": 0.8559}, {"length": 2048, "recall": 0.2}]
  assert needle.effective_length(rows) == 512
  assert needle.effective_length(rows[2:]) is None
  assert needle.effective_length(rows, threshold=0.1) == 2048


def test_random_model_end_to_end_writes_json_and_png(tmp_path):
  cfg = model_lib.ModelConfig(vocab_size=256, num_layers=1, d_model=32, num_heads=2, ffn_dim=64)
  params = model_lib.init_params(cfg, jax.random.PRNGKey(1))
  result = needle.evaluate(heldout.model_apply(cfg), params, TEXT, [150, 200], [0.0, 1.0],
                           ["single"], trials=2, train_length=160)
  paths = needle.write(result, str(tmp_path / "out"))
  with open(paths["json"]) as f:
    saved = json.load(f)
  assert saved == json.loads(json.dumps(result))
  assert [(c["length"], c["depth"], c["extrapolation"]) for c in saved["cells"]] == [
      (150, 0.0, False), (150, 1.0, False), (200, 0.0, True), (200, 1.0, True)]
  assert all(0.0 <= c["recall"] <= 1.0 for c in saved["cells"])
  with open(paths["single"], "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  # a length too short for a variant is skipped for it, the rest of the grid still runs
  short = needle.evaluate(oracle_apply, None, TEXT, [150, 300], [0.5], ["single", "multikey"],
                          trials=1)
  assert [(c["variant"], c["length"]) for c in short["cells"]] == [
      ("single", 150), ("single", 300), ("multikey", 300)]
  mk = short["per_length"]["multikey"][0]
  assert mk["recall"] is None and mk["skipped"].startswith("shorter than the 282 bytes")
  assert short["per_length"]["all"][0]["recall"] is None
  assert short["effective_length"] == {"single": 300, "multikey": 300, "all": 300}
  needle.heatmap(short, str(tmp_path / "mk.png"), "multikey")
  with pytest.raises(needle.NeedleError, match="no haystack document holds"):
    needle.evaluate(oracle_apply, None, "Short. Text.", [200], [0.5])
  with pytest.raises(needle.NeedleError, match="variant must be one of"):
    needle.evaluate(oracle_apply, None, TEXT, [200], [0.5], ["nope"])


# ----------------------------------------------------------------------------------------------
# The command on a tiny trained run.
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A tiny 2-step byte-level run whose held-out split (1 % of 40 kB) holds 400-byte documents."""
  import sys  # noqa: PLC0415
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                  "experiments", "configs"))
  import diloco as diloco_configs  # noqa: PLC0415

  d = tmp_path_factory.mktemp("needle_run")
  (d / "a.txt").write_text(_text(40000, seed=3))
  c = diloco_configs.get_config("tiny")
  for key, value in {
      "diloco.num_workers": 2, "diloco.inner_steps": 2, "train.num_steps": 2,
      "train.batch_size": 2, "train.warmup_steps": 1, "train.log_every": 2,
      "model.num_layers": 1, "data.source": "text", "data.paths": (str(d / "a.txt"),),
      "data.seq_len": 16, "eval.every_steps": 0, "eval.num_batches": 1, "eval.batch_size": 2,
      "checkpoint.every_steps": 0}.items():
    section, name = key.split(".")
    c[section][name] = value
  wd = str(d / "workdir")
  train.run(c, wd)
  return wd


def test_command_end_to_end(run, tmp_path, capsys):
  out = tmp_path / "needle"
  argv = ["needle", f"--workdir={run}", "--lengths=140,200", "--depths=2", "--trials=2",
          "--variants=single", f"--out={out}", "--which=outer"]
  assert needle.main(argv) == 0
  text = capsys.readouterr().out
  assert "single" in text and "140*:" in text and "effective length" in text
  with open(out / "needle.json") as f:
    result = json.load(f)
  assert (result["step"], result["params"], result["train_length"]) == (2, "outer", 16)
  assert result["haystack"] == "held-out split" and result["value_digits"] == 7
  assert len(result["cells"]) == 4 and all(c["extrapolation"] for c in result["cells"])
  assert [c["depth"] for c in result["cells"]] == [0.0, 1.0, 0.0, 1.0]
  assert len(result["control"]) == 2
  assert os.path.getsize(out / "needle_single.png") > 1000


def test_command_errors_are_one_sentence_and_exit_2(run, tmp_path, capsys):
  cases = [
      (["--workdir=/nonexistent"], "flag error: --workdir '/nonexistent' is not a directory"),
      ([f"--workdir={run}", "--lengths=a,b"], "flag error: --lengths must be comma-separated"),
      ([f"--workdir={run}", "--variants=single,nope"], "flag error: --variants must be a list"),
      ([f"--workdir={run}", "--haystack=/nonexistent"],
       "flag error: --haystack '/nonexistent' is not a file"),
      ([f"--workdir={tmp_path}"], "config error: workdir"),
      ([f"--workdir={run}", "--lengths=1000", f"--out={tmp_path}/o"],
       "error: no haystack document holds the 1000 bytes"),
  ]
  for args, message in cases:
    assert needle.main(["needle"] + args) == 2, args
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith(message), err
