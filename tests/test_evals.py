"""Evaluations: task file formats, multiple-choice scoring (hand arithmetic, a model whose answers
are right by construction, batched = per-example), held-out and per-position loss, and the
workdir command end to end on a tiny trained run.

One tiny text run (1 layer, 2 steps) is trained once for the module; every transformer test uses
its config and shapes, so the evaluation programs compile once for the whole file.
"""

import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diloco_jax import build, train
from diloco_jax import config as config_lib
from diloco_jax import model as model_lib
from diloco_jax.evals import __main__ as cli
from diloco_jax.evals import heldout, tasks, workdir
from diloco_jax.evals import multiple_choice as mc

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "experiments", "configs"))
import diloco as diloco_configs  # noqa: E402

CORPUS = "the cat sat on the mat. a dog ran far away. "
HELLASWAG = [
    {"ctx": "the cat sat", "endings": ["on the mat.", "qzx xqz", "zzzz", "xq"], "label": 0},
    {"ctx_a": "a dog", "ctx_b": "ran", "endings": ["qqq", "far away.", "zx zx", "xxq"],
     "label": "1"},
]
PIQA = [{"goal": "the cat", "sol1": "xqz qzx", "sol2": "sat on the mat."},
        {"goal": "a dog ran", "sol1": "far away.", "sol2": "zqzq"}]
PIQA_LABELS = "1\n0\n"
ARC = [
    {"id": "a", "question": {"stem": "the cat sat", "choices": [
        {"text": "qxz", "label": "A"}, {"text": "zzq x", "label": "B"},
        {"text": "on the mat.", "label": "C"}]}, "answerKey": "C"},
    {"id": "b", "question": {"stem": "a dog", "choices": [
        {"text": "ran far away.", "label": "1"}, {"text": "xqzq", "label": "2"}]},
     "answerKey": "1"},
]


def _jsonl(path, records):
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  return str(path)


@pytest.fixture(scope="module")
def task_files(tmp_path_factory):
  d = tmp_path_factory.mktemp("tasks")
  (d / "piqa-labels.lst").write_text(PIQA_LABELS)
  return {"hellaswag": _jsonl(d / "hellaswag.jsonl", HELLASWAG),
          "piqa": _jsonl(d / "piqa.jsonl", PIQA), "piqa_labels": str(d / "piqa-labels.lst"),
          "arc_easy": _jsonl(d / "arc.jsonl", ARC)}


# ---------------------------------------------------------------------------------- formats
def test_each_format_parses_to_prompt_choices_and_label(task_files, tmp_path):
  hs = tasks.load_hellaswag(task_files["hellaswag"])
  assert hs[0] == tasks.Example("the cat sat", (" on the mat.", " qzx xqz", " zzzz", " xq"), 0)
  assert hs[1].context == "a dog ran" and hs[1].label == 1   # ctx_a + ctx_b; label as a string
  piqa = tasks.load_piqa(task_files["piqa"], task_files["piqa_labels"])
  assert piqa[0] == tasks.Example("Question: the cat\nAnswer:", (" xqz qzx", " sat on the mat."), 1)
  assert [e.label for e in piqa] == [1, 0]
  with_field = _jsonl(tmp_path / "p.jsonl", [dict(r, label=i) for i, r in enumerate(PIQA)])
  assert [e.label for e in tasks.load_piqa(with_field)] == [0, 1]   # labels in the records
  arc = tasks.load_arc(task_files["arc_easy"])
  assert arc[0] == tasks.Example("Question: the cat sat\nAnswer:",
                                 (" qxz", " zzq x", " on the mat."), 2)
  assert arc[1].label == 0                                     # a digit answerKey
  wikihow = _jsonl(tmp_path / "h.jsonl", [{
      "ctx": "[header] How to sit [title] Find a mat.", "endings": ["a", "b", "c", "d [step] e"],
      "label": 3}])
  ex = tasks.load_hellaswag(wikihow)[0]
  assert ex.context == "How to sit. Find a mat." and ex.choices[3] == " d e"


BAD_FILES = [
    (tasks.load_hellaswag, ['{"ctx": "a", "endings": ["1","2","3","4"], "label": 0}', "{oops"],
     r"hellaswag file '.*bad' line 2: not valid JSON"),
    (tasks.load_hellaswag, ['{"ctx": "a", "endings": ["1","2","3"], "label": 0}'],
     r"line 1: field 'endings' must be a list of 4 non-empty strings"),
    (tasks.load_hellaswag, ['{"ctx": "a", "endings": ["1","2","3","4"], "label": ""}'],
     r"line 1: field 'label' is missing \(HellaSwag's test split is unlabelled"),
    (tasks.load_hellaswag, ['{"ctx": "a", "endings": ["1","2","3","4"], "label": 4}'],
     r"line 1: label must be an integer in \[0, 4\), got 4"),
    (tasks.load_hellaswag, ['{"endings": ["1","2","3","4"], "label": 0}'],
     r"line 1: needs a 'ctx' field \(or 'ctx_a' and 'ctx_b'\)"),
    (tasks.load_piqa, ['{"goal": "g", "sol1": "a", "sol2": "b", "label": 0}', "",
                       '{"goal": "g", "sol1": "a"}'],
     r"piqa file '.*bad' line 3: field 'sol2' must be a non-empty string, got missing"),
    (tasks.load_piqa, ['{"goal": "g", "sol1": "a", "sol2": "b"}'],
     r"line 1: field 'label' is missing; pass the labels file \(--piqa_labels\)"),
    (tasks.load_arc, ['{"question": {"stem": "q", "choices": [{"text": "a", "label": "A"}, '
                      '{"text": "b", "label": "B"}]}, "answerKey": "E"}'],
     r"arc_easy file '.*bad' line 1: answerKey 'E' is not one of the choice labels \['A', 'B'\]"),
    (tasks.load_arc, ['["not", "an", "object"]'], r"line 1: expected a JSON object, got list"),
    (tasks.load_arc, [""], r"arc_easy file '.*bad' holds no examples"),
]


@pytest.mark.parametrize("load, lines, message", BAD_FILES)
def test_malformed_files_name_the_file_and_line(tmp_path, load, lines, message):
  path = tmp_path / "bad"
  path.write_text("\n".join(lines) + "\n")
  with pytest.raises(tasks.FormatError, match=message) as e:
    load(str(path))
  assert str(e.value).count(". ") == 0 and str(e.value).endswith(".")   # one sentence


def test_piqa_labels_file_must_match_and_hold_bits(tmp_path, task_files):
  labels = tmp_path / "labels.lst"
  labels.write_text("1\n")
  with pytest.raises(tasks.FormatError, match=r"has 1 labels but '.*piqa.jsonl' has 2 examples"):
    tasks.load_piqa(task_files["piqa"], str(labels))
  labels.write_text("1\n2\n")
  with pytest.raises(tasks.FormatError, match=r"piqa labels file '.*labels.lst' line 2: label "
                                              r"must be an integer in \[0, 2\), got 2"):
    tasks.load_piqa(task_files["piqa"], str(labels))
  with pytest.raises(tasks.FormatError, match=r"hellaswag file '/nonexistent' does not exist"):
    tasks.load_hellaswag("/nonexistent")


# ------------------------------------------------------------------ scoring: hand-built models
def bigram_apply(w_VxV, tokens_BxT):
  """A bigram model: the logits for the next byte are row `token` of w."""
  return w_VxV[tokens_BxT]


def _log_softmax(x):
  x = np.asarray(x, np.float64)
  return x - np.log(np.sum(np.exp(x - x.max(-1, keepdims=True)), -1, keepdims=True)) \
      - x.max(-1, keepdims=True)


def test_normalisation_and_argmax_by_hand():
  # A unigram model: p(" ") = p("a") = 0.4, p("b") = 0.1, the other 253 bytes share 0.1.
  q = np.full(256, 0.1 / 253)
  q[ord(" ")], q[ord("a")], q[ord("b")] = 0.4, 0.4, 0.1
  w = jnp.asarray(np.tile(np.log(q), (256, 1)), jnp.float32)
  examples = [tasks.Example("x", (" b", " aaaaaa"), 1),   # per byte picks 1, the raw sum picks 0
              tasks.Example("x", (" a", " b"), 0)]        # both pick 0
  scores = mc.score(bigram_apply, w, examples, max_len=16)
  np.testing.assert_allclose(scores.logprob[0], [np.log(0.4 * 0.1), 7 * np.log(0.4)], rtol=1e-6)
  np.testing.assert_allclose(scores.logprob[1], [2 * np.log(0.4), np.log(0.4 * 0.1)], rtol=1e-6)
  assert [list(n) for n in scores.num_bytes] == [[2, 7], [2, 2]]
  assert list(mc.predictions(scores, normalize=True)) == [1, 0]
  assert list(mc.predictions(scores, normalize=False)) == [0, 0]
  assert mc.accuracy(examples, scores) == {"acc_norm": 1.0, "acc": 0.5, "num_examples": 2}


def test_bigram_scores_match_hand_arithmetic_with_truncation():
  w = np.random.default_rng(0).normal(size=(256, 256)).astype(np.float32)
  logp = _log_softmax(w)
  max_len = 8
  examples = [
      tasks.Example("a long context, longer than L", (" yes", " a choice longer than L"), 0),
      tasks.Example("hi", (" no", " ok!", " a"), 2)]
  scores = mc.score(bigram_apply, jnp.asarray(w), examples, max_len=max_len, batch_size=2)
  for ex, got, n in zip(examples, scores.logprob, scores.num_bytes):
    for c, choice in enumerate(ex.choices):
      full = (ex.context + choice).encode()
      k = min(len(choice), max_len)   # a choice longer than L keeps its last L bytes scored
      want = sum(logp[full[i - 1], full[i]] for i in range(len(full) - k, len(full)))
      assert n[c] == k
      np.testing.assert_allclose(got[c], want, rtol=1e-5)


def test_a_model_built_from_the_answers_gets_them_all_right(task_files):
  # Bigram counts of a corpus holding every right answer; wrong answers are unseen byte pairs.
  counts = np.full((256, 256), 0.01)
  text = CORPUS.encode()
  for a, b in zip(text[:-1], text[1:]):
    counts[a, b] += 1
  w = jnp.asarray(np.log(counts / counts.sum(1, keepdims=True)), jnp.float32)
  loaded = {"hellaswag": tasks.load_hellaswag(task_files["hellaswag"]),
            "piqa": tasks.load_piqa(task_files["piqa"], task_files["piqa_labels"]),
            "arc_easy": tasks.load_arc(task_files["arc_easy"])}
  for name, examples in loaded.items():
    assert mc.evaluate(bigram_apply, w, examples, max_len=32)["acc_norm"] == 1.0, name


def test_scorer_compiles_once_per_length_bucket():
  apply_fn = lambda w, t: w[t]   # a fresh static argument: its own compilations only  # noqa: E731
  w = jnp.zeros((256, 256))
  before = mc.continuation_logprob._cache_size()
  examples = [tasks.Example("c" * n, (" a", " bb", " c"), 0) for n in (1, 5, 20, 30, 40)]
  mc.score(apply_fn, w, examples, max_len=64, batch_size=2)   # buckets 16, 32 and 64
  assert mc.continuation_logprob._cache_size() - before == 3
  assert [mc.bucket_length(n, 64) for n in (1, 16, 17, 33, 64)] == [16, 16, 32, 64, 64]
  assert mc.bucket_length(40, 24) == 24


# ---------------------------------------------------------------- the tiny run and its params
def _tiny_config(text_path):
  c = diloco_configs.get_config("tiny")
  for key, value in {
      "diloco.num_workers": 2, "diloco.inner_steps": 2, "train.num_steps": 2,
      "train.batch_size": 4, "train.warmup_steps": 1, "train.log_every": 2,
      "train.learning_rate": 1e-2, "model.num_layers": 1, "data.source": "text",
      "data.paths": (text_path,), "data.seq_len": 16, "eval.every_steps": 0,
      "eval.num_batches": 2, "eval.batch_size": 8, "checkpoint.every_steps": 0}.items():
    section, name = key.split(".")
    c[section][name] = value
  return c


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """(workdir, RunConfig, summary) of a tiny DiLoCo run on bytes, with its config.json."""
  d = tmp_path_factory.mktemp("run")
  words = np.random.default_rng(0).choice(CORPUS.split(), 800)
  (d / "text.txt").write_text(" ".join(words) + "\n")   # ~3 kB: the last 1 % is held out
  config = _tiny_config(str(d / "text.txt"))
  wd = str(d / "workdir")
  summary = train.run(config, wd)
  assert os.path.exists(os.path.join(wd, cli.CONFIG_FILE))   # written by train.run: what we read
  return wd, config_lib.from_config_dict(config), summary


@pytest.fixture(scope="module")
def params(run):
  wd, rc, _ = run
  p, step = workdir.restore_params(wd, rc, "outer")
  assert step == 2
  return p


# The slow obvious reference: one unpadded forward pass per sequence (jitted per length only to
# keep the suite fast; most sequences below have length L, so it compiles twice).
_apply_one = jax.jit(lambda cfg, p, t: model_lib.apply(cfg, p, t)[0], static_argnums=0)


def _reference_logprob(cfg, params, context, choice, max_len):
  """log p(choice | context) and the bytes it sums over, from one forward pass."""
  full = np.frombuffer((context + choice).encode(), np.uint8).astype(np.int32)[-(max_len + 1):]
  k = min(len(choice.encode()), len(full) - 1)
  logp = _log_softmax(np.asarray(_apply_one(cfg, params, jnp.asarray(full[None, :-1]))[0]))
  return sum(logp[i - 1, full[i]] for i in range(len(full) - k, len(full))), k


def test_batched_scorer_equals_per_example_reference(run, params):
  _, rc, _ = run
  # Contexts longer than L (truncated to a full window) and one short row (right-padded).
  examples = [
      tasks.Example("the cat sat on the mat and then", (" ran far away.", " sat.", " a"), 0),
      tasks.Example("a dog ran far away, the cat", (" ran", " is a very long choice"), 1),
      tasks.Example("a dog", (" ran",), 0)]
  scores = mc.score(heldout.model_apply(rc.model), params, examples, max_len=rc.data.seq_len)
  for ex, got, n in zip(examples, scores.logprob, scores.num_bytes):
    for c, choice in enumerate(ex.choices):
      want, k = _reference_logprob(rc.model, params, ex.context, choice, rc.data.seq_len)
      assert n[c] == k
      np.testing.assert_allclose(got[c], want, rtol=1e-5, atol=1e-4)


def test_heldout_and_per_position_loss_match_the_model_loss(run, params):
  _, rc, summary = run
  L = rc.data.seq_len
  batches = heldout.heldout_set(build.make_source(rc, "eval"), seq_len=L,
                                batch_size=rc.eval.batch_size, num_batches=rc.eval.num_batches,
                                seed=rc.seed)
  assert batches.shape == (2, 8, L + 1)
  loss, per_position = heldout.heldout_losses(heldout.model_apply(rc.model), params, batches)
  assert per_position.shape == (L,)
  np.testing.assert_allclose(np.mean(per_position), loss, rtol=1e-6)
  # Per position from one unpadded forward pass per held-out sequence.
  seqs = batches.reshape(-1, L + 1)
  logp = np.concatenate([_log_softmax(_apply_one(rc.model, params, jnp.asarray(s[None, :-1])))
                         for s in seqs])
  targets = seqs[:, 1:, None]
  want = -np.take_along_axis(logp, targets, -1)[..., 0].mean(0)
  np.testing.assert_allclose(per_position, want, rtol=1e-5)
  np.testing.assert_allclose(loss, summary["final_eval_loss"], rtol=1e-5)  # the run's own number
  # Byte-level text: bits per byte is the loss in bits.
  assert summary["final_eval_bits_per_byte"] == pytest.approx(
      summary["final_eval_loss"] / np.log(2.0), rel=1e-12)
  assert heldout.position_buckets(np.arange(16.0)) == [
      (0, 0, 0.0), (1, 2, 1.5), (3, 6, 4.5), (7, 14, 10.5), (15, 15, 15.0)]


# ---------------------------------------------------------------------------- the command
def test_command_evaluates_the_workdir_end_to_end(run, task_files, capsys):
  wd, rc, summary = run
  argv = ["evals", f"--workdir={wd}", "--json"] + [f"--{k}={v}" for k, v in task_files.items()]
  assert cli.main(argv) == 0
  result = json.loads(capsys.readouterr().out)
  assert (result["step"], result["params"], result["algorithm"]) == (2, "outer", "diloco")
  np.testing.assert_allclose(result["heldout_loss"], summary["final_eval_loss"], rtol=1e-5)
  assert len(result["per_position_loss"]) == rc.data.seq_len
  assert {k: v["num_examples"] for k, v in result["tasks"].items()} == {
      "hellaswag": 2, "piqa": 2, "arc_easy": 2}
  for t in result["tasks"].values():
    assert 0 <= t["acc_norm"] <= 1 and 0 <= t["acc"] <= 1
  # The report; worker 0 is a model of its own (α = 0 merges make it equal θ_g right after the
  # sync at step 2, so the numbers agree here).
  assert cli.main(["evals", f"--workdir={wd}", "--params=worker0"]) == 0
  out = capsys.readouterr().out
  assert "params=worker0" in out and f"{result['heldout_loss']:.4f}" in out
  assert "loss by position  0: " in out


def test_command_errors_are_one_sentence_and_exit_2(run, task_files, tmp_path, capsys):
  wd, _, _ = run
  bad_hs = tmp_path / "hs.jsonl"
  bad_hs.write_text('{"ctx": "a", "endings": ["1", "2", "3", "4"], "label": 0}\nnot json\n')
  no_config = tmp_path / "bare"
  no_config.mkdir()
  wrong = tmp_path / "wrong"
  wrong.mkdir()
  with open(os.path.join(wd, cli.CONFIG_FILE)) as f:
    config = json.load(f)
  config["model"]["num_layers"] = 2
  (wrong / cli.CONFIG_FILE).write_text(json.dumps(config))
  os.symlink(os.path.join(wd, "checkpoints"), wrong / "checkpoints")
  cases = [
      ([f"--workdir={wd}", "--params=best"], r"flag error: flag --params=best: value should be"),
      ([f"--workdir={wd}", f"--piqa_labels={task_files['piqa_labels']}"],
       r"flag error: --piqa_labels needs --piqa"),
      ([f"--workdir={wd}", f"--hellaswag={bad_hs}"],
       r"data error: hellaswag file '.*hs.jsonl' line 2: not valid JSON"),
      ([f"--workdir={no_config}"], r"config error: workdir '.*bare' has no saved config"),
      ([f"--workdir={wrong}"], r"error: the checkpoint at step 2 in '.*' does not match the run's "
                               r"config"),
  ]
  for args, message in cases:
    assert cli.main(["evals"] + args) == 2, args
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    assert re.match(message, err), err
  # The module entry point itself (fails before JAX starts).
  proc = subprocess.run([sys.executable, "-m", "diloco_jax.evals", "--workdir=/nonexistent"],
                        capture_output=True, text=True, cwd=REPO, timeout=60)
  assert proc.returncode == 2
  assert proc.stderr.strip() == "flag error: --workdir '/nonexistent' is not a directory"
