"""experiments/needle.py's report from archived runs (the fresh-clone path): restored from
--archive into an empty --out, the table read from the runs' own JSON, missing runs named;
its --long_set overrides; and the recipe's two stages training, shrunk to a few steps.

The script runs in a subprocess: it defines absl flags that reproduce.py (test_reproduce)
also defines, and one process cannot hold both.
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np

from tests import overrides as overrides_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "experiments", "needle.py")
ARCHIVED = os.path.join(REPO, "docs", "results", "runs", "needle")


def test_report_from_the_archive_names_the_missing_runs(tmp_path):
  arch = tmp_path / "archive"
  shutil.copytree(os.path.join(ARCHIVED, "streaming_short"), arch / "streaming_short")
  shutil.copytree(os.path.join(ARCHIVED, "streaming"), arch / "streaming")
  # The long stage's RoPE as its own config.json says (here rewritten to YaRN).
  cfg_path = arch / "streaming" / "config.json"
  cfg = json.loads(cfg_path.read_text())
  cfg["model"].update(rope_scaling="yarn", rope_scaling_factor=4.0, rope_original_length=320)
  cfg_path.write_text(json.dumps(cfg))
  out, docs = tmp_path / "out", tmp_path / "docs"
  proc = subprocess.run([sys.executable, SCRIPT, "--report", f"--out={out}", f"--docs={docs}",
                         f"--archive={arch}"], capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  assert sorted(os.listdir(out)) == ["streaming", "streaming_short"]   # restored
  report = (docs / "needle.md").read_text()
  assert "(4×, RoPE scaled by YaRN, s = 4 from the trained 320 bytes, blockwise" in report
  assert ("**Incomplete: no finished run of dp in this report** (`python experiments/needle.py "
          "--only=dp_short,dp` adds it).") in report
  # The recipe comes from the runs' own config.json, the numbers from their JSON files.
  short = json.loads((arch / "streaming_short" / "config.json").read_text())
  assert f"Stage `short`: {short['train']['num_steps']} steps on windows of " \
         f"{short['data']['seq_len']} bytes" in report
  summary = json.loads((arch / "streaming" / "summary.json").read_text())
  nd = json.loads((arch / "streaming" / "needle" / "needle.json").read_text())
  single = " · ".join(f"{p['length']}{'*' if p['extrapolation'] else ''}: {p['recall']:.2f}"
                      for p in nd["per_length"]["single"])
  assert f"| streaming | {summary['final_eval_loss']:.4f} | single | {single} |" in report
  assert "| dp |" not in report
  for png in ("needle_streaming_single.png", "needle_streaming_multikey.png",
              "needle_streaming_loss.png"):
    assert (docs / png).stat().st_size > 1000 and f"]({png})" in report


def test_report_with_no_evaluated_run_says_so_and_writes_nothing(tmp_path):
  # Only the short stage: nothing evaluated, so no report (and no claim of one).
  arch = tmp_path / "archive"
  shutil.copytree(os.path.join(ARCHIVED, "streaming_short"), arch / "streaming_short")
  out, docs = tmp_path / "out", tmp_path / "docs"
  proc = subprocess.run([sys.executable, SCRIPT, "--report", f"--out={out}", f"--docs={docs}",
                         f"--archive={arch}"], capture_output=True, text=True, timeout=120)
  assert proc.returncode == 1, proc.stderr
  assert "no report written" in proc.stderr and "wrote" not in proc.stdout
  assert not (docs / "needle.md").exists()


def test_long_set_overrides_the_long_stages_only_and_bad_items_stop_first(tmp_path):
  # make_config in its own process (the script's absl flags): the overrides reach `streaming`
  # and `dp`, never their short stages (the config's long stage is YaRN ×4: linear ×2 shows).
  code = ("import importlib.util, sys; s = importlib.util.spec_from_file_location('n', sys.argv[1]);"
          " m = importlib.util.module_from_spec(s); s.loader.exec_module(m);"
          " sets = ['model.rope_scaling=linear', 'model.rope_scaling_factor=2',"
          " 'train.num_steps=7'];"
          " print([(n, m.make_config(n, 'x', 0, 'o', sets).model.rope_scaling,"
          " m.make_config(n, 'x', 0, 'o', sets).model.rope_scaling_factor,"
          " m.make_config(n, 'x', 0, 'o', sets).train.num_steps) for n in m.RUNS])")
  proc = subprocess.run([sys.executable, "-c", code, SCRIPT], capture_output=True, text=True,
                        timeout=120, cwd=REPO)
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.strip() == ("[('streaming_short', 'none', 1.0, 2250), ('streaming', "
                                 "'linear', 2.0, 7), ('dp_short', 'none', 1.0, 2250), ('dp', "
                                 "'linear', 2.0, 7)]")
  # An unknown key, a value of the wrong type or a config the long stage rejects: exit 2 with
  # one sentence, before anything trains (nothing is written under --out). Any text will do:
  # nothing reads it.
  text = tmp_path / "text.txt"
  text.write_text("Some text. " * 100, encoding="utf-8")
  for item, says in (("model.bogus=1", "'model.bogus' is not a config key"),
                     ("model.rope_scaling_factor=abc", "has the wrong type"),
                     ("model.rope_original_length=0", "model.rope_original_length must be")):
    proc = subprocess.run([sys.executable, SCRIPT, f"--out={tmp_path / 'out'}", "--archive=",
                           f"--data={text}", "--only=streaming", f"--long_set={item}"],
                          capture_output=True, text=True, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and says in lines[0], proc.stderr
    assert not (tmp_path / "out").exists()


def _long_context(arg: str, text_glob: str, steps: int, overrides=None):
  """experiments/configs/long_context.py's stage `arg`, shrunk to a few steps of a tiny model
  (the windows, retrieval mix and attention as configured)."""
  import importlib.util  # noqa: PLC0415
  spec = importlib.util.spec_from_file_location(
      "long_context", os.path.join(REPO, "experiments", "configs", "long_context.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config(arg)
  c.data.paths = (text_glob,)
  c.model.num_layers, c.model.d_model, c.model.ffn_dim = 2, 32, 64
  c.diloco.layers_per_fragment = 1
  c.diloco.inner_steps = steps
  c.train.num_steps, c.train.batch_size, c.train.warmup_steps = steps, 2, 1
  c.train.log_every = c.eval.every_steps = c.checkpoint.every_steps = steps
  c.eval.num_batches, c.eval.batch_size = 1, 2
  return overrides_lib.apply(c, overrides or {})


def test_the_recipe_trains_short_then_continues_long_with_blockwise_attention(tmp_path):
  """Both stages of the needle recipe train on simulated workers (the long one: blockwise
  attention inside the workers' lift, YaRN, 4× the window, from the short run's outer
  parameters). The long stage stopped tracing when the inner step's lift became a shard_map,
  and no test noticed."""
  from diloco_jax import train  # noqa: PLC0415
  rng = np.random.default_rng(0)
  words = "the of and to in that was he it his with as had for not but at by on".split()
  text = " ".join(" ".join(rng.choice(words, 9)).capitalize() + "." for _ in range(9000))
  (tmp_path / "text.txt").write_text(text, encoding="utf-8")
  glob = str(tmp_path / "text.txt")
  short = train.run(_long_context("short", glob, 3), str(tmp_path / "short"))
  long_cfg = _long_context("long", glob, 3, {"train.init_from": str(tmp_path / "short")})
  assert (long_cfg.model.attention, long_cfg.data.seq_len) == ("blockwise", 1280)
  m = long_cfg.model
  assert (m.rope_scaling, m.rope_scaling_factor, m.rope_original_length) == ("yarn", 4.0, 320)
  long = train.run(long_cfg, str(tmp_path / "long"))
  assert np.isfinite(short["final_eval_loss"]) and np.isfinite(long["final_eval_loss"])
  assert long["num_steps"] == 3
