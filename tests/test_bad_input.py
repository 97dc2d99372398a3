"""Bad input ends with one sentence naming what is wrong: on the command line with exit code 2,
no traceback and nothing built (issue 13); in the public API with a ValueError, before anything
is traced."""

import os
import pathlib
import re
import subprocess
import sys

import jax.numpy as jnp
import optax
import pytest

from diloco_jax import algorithm, data, inner, mesh

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = "--config=experiments/configs/diloco.py:tiny"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  d = tmp_path_factory.mktemp("bad")
  (d / "a_file").write_text("not a directory")
  (d / "binary.txt").write_bytes(b"plain start " + bytes(range(128, 256)) * 40)
  (d / "config.bin").write_bytes(b"\x00\x01\x02 not python")
  return d


def _cli_cases(d):
  """(arguments, the last line of stderr as a regex); every case exits 2 without a traceback."""
  return [
      (["--config=/nonexistent/cfg.py", f"--workdir={d}/w1"],
       r"flag error: --config: cannot load the config file: \[Errno 2\] No such file or "
       r"directory: '/nonexistent/cfg.py'"),
      ([f"--config={d}/config.bin", f"--workdir={d}/w2"],
       r"flag error: --config: cannot load the config file: source code string cannot contain "
       r"null bytes"),
      ([f"--config={d}", f"--workdir={d}/w3"],
       rf"flag error: --config: cannot load the config file: \[Errno 21\] Is a directory: "
       rf"'{d}'"),
      ([TINY, f"--workdir={d}/a_file"],
       rf"input error: --workdir={d}/a_file is an existing file, not a directory; name a "
       r"directory \(it is created if missing\)"),
      ([TINY, f"--workdir={d}/a_file/run"],
       rf"input error: --workdir={d}/a_file/run cannot be created: {d}/a_file is a file, not a "
       r"directory"),
      ([TINY, "--workdir=/proc/no_such_process/run"],
       r"input error: --workdir=/proc/no_such_process/run cannot be created: No such file or "
       r"directory"),
      ([TINY, f"--workdir={d}/w4", "--config.data.source=text",
        f"--config.data.paths=('{d}/binary.txt',)"],
       rf"config error: data.paths: text file '{d}/binary.txt' is not UTF-8 text: byte 0x80 at "
       r"offset 12 \(invalid start byte\); set data.check_utf8=False to read its raw bytes "
       r"anyway\."),
      ([TINY, f"--workdir={d}/w5", "--config.train.num_steps=1.5"],
       r"flag error: flag --config.train.num_steps=1.5: invalid literal for int\(\) with base "
       r"10: '1.5'"),
      ([TINY, f"--workdir={d}/w6", "--config.diloco.inner_steps=0"],
       r"config error: diloco.inner_steps must be an integer >= 1, got 0"),
      ([TINY, f"--workdir={d}/w7", "--config.diloco.no_such_key=3"],
       r"config error: the config has no key .*no_such_key"),
  ]


def test_every_bad_command_line_ends_with_one_sentence_and_exit_code_2(files):
  cases = _cli_cases(files)
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  # All at once: each is a fresh interpreter that stops at its first check.
  procs = [subprocess.Popen([sys.executable, "-m", "diloco_jax.main", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for args, _ in cases]
  for (args, pattern), proc in zip(cases, procs):
    out, err = proc.communicate(timeout=180)
    lines = [line for line in err.splitlines() if line.strip()]
    assert proc.returncode == 2, (args, out, err)
    assert "Traceback" not in err, (args, err)
    assert lines and re.fullmatch(pattern, lines[-1]), (args, lines[-1:])
    assert "final eval loss" not in out
  for w in ("w1", "w2", "w3", "w4", "w5", "w6", "w7"):   # nothing was built
    assert not (files / w / "checkpoints").exists(), w


def test_the_utf8_check_names_the_first_bad_byte_across_read_chunks(tmp_path, monkeypatch):
  monkeypatch.setattr(data, "_UTF8_CHUNK", 5)   # characters split over reads are fine
  good = "héllo, wörld ✓ ünïcode".encode()
  cases = {b"": None, good: None,
           good + b"\xff" + good: len(good),                 # invalid start byte
           good[:14] + b"\xe2\x9c" + b"x": 14,               # a character cut short mid-file
           good + b"\xe2\x9c": len(good)}                    # ... and at the end of the file
  for i, (content, offset) in enumerate(cases.items()):
    path = tmp_path / f"f{i}.txt"
    path.write_bytes(content)
    if offset is None:
      data.check_utf8_file(str(path))
      continue
    with pytest.raises(ValueError, match=rf"text file '.*f{i}.txt' is not UTF-8 text: byte "
                                         rf"0x{content[offset]:02x} at offset {offset} "):
      data.check_utf8_file(str(path))
  path = tmp_path / "bin.txt"
  path.write_bytes(bytes(range(256)) * 4)
  with pytest.raises(ValueError, match="offset 128"):
    data.TextBytes([str(path)], seq_len=8)
  assert len(data.TextBytes([str(path)], seq_len=8, check_utf8=False)) > 0   # opted out


def _loss(params, batch):
  return jnp.sum(params["w"]) * jnp.mean(batch), {}


_OPT = optax.sgd(0.1)
API = [
    (lambda: algorithm.StreamingDiLoCo(_loss, _OPT, _OPT, num_workers=1, inner_steps=4,
                                       overlap_steps=1.5), r"overlap_steps \(τ\) must be an "
     r"integer, or one per worker \(M=1\), each with 0 <= τ < H=4; got 1.5"),
    (lambda: algorithm.StreamingDiLoCo(_loss, _OPT, _OPT, num_workers=1, inner_steps=4,
                                       overlap_steps=True), r"overlap_steps .* got True"),
    (lambda: algorithm.StreamingDiLoCo(_loss, _OPT, _OPT, num_workers=2, inner_steps=4,
                                       overlap_steps=(1, True)), r"overlap_steps .* got \(1, True\)"),
    (lambda: algorithm.DiLoCo(_loss, _OPT, _OPT, num_workers=2.0, inner_steps=4),
     r"num_workers \(M\) must be an integer >= 1, got 2.0"),
    (lambda: algorithm.DiLoCo(_loss, _OPT, _OPT, num_workers=1, inner_steps=True),
     r"inner_steps \(H\) must be an integer >= 1, got True"),
    (lambda: algorithm.DiLoCo(_loss, _OPT, _OPT, num_workers=1, inner_steps=4.0),
     r"inner_steps \(H\) must be an integer >= 1, got 4.0"),
    (lambda: algorithm.StreamingDiLoCo(_loss, _OPT, _OPT, num_workers=1, inner_steps=4,
                                       merge_alpha=True), r"merge_alpha \(α\) must be a number in "
     r"\[0.0, 1.0\], got True"),
    (lambda: algorithm.DiLoCo(_loss, _OPT, _OPT, num_workers=1, inner_steps=4,
                              max_steps_in_flight=1.5),
     r"max_steps_in_flight must be an integer >= 0, got 1.5"),
    (lambda: algorithm.DataParallel(_loss, _OPT, num_workers=True),
     r"num_workers \(M\) must be an integer >= 1, got True"),
    (lambda: inner.inner_optimizer(1e-3, num_steps=10.5),
     r"num_steps must be an integer >= 1, got 10.5"),
    (lambda: inner.inner_optimizer(1e-3, num_steps=10, warmup_steps=False),
     r"warmup_steps must be an integer >= 0, got False"),
    (lambda: mesh.make_mesh(1.5), r"num_workers \(M\) must be an integer >= 1, got 1.5"),
    (lambda: mesh.make_mesh(1, data=True), r"mesh.data must be an integer >= 1, got True"),
]


@pytest.mark.parametrize("make,message", API)
def test_non_integer_and_boolean_arguments_of_the_public_api_are_one_sentence(make, message):
  with pytest.raises(ValueError, match=message) as info:
    make()
  assert "\n" not in str(info.value)
