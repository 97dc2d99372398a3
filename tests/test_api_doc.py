"""docs/api.md's example runs as written and learns.

The example sets its own simulated device count (4), while tests/conftest.py has already fixed 8
for this process; so it runs in a fresh interpreter, from the repository root, as a user would.
"""

import os
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "api.md"


def _first_python_block(text: str) -> str:
  match = re.search(r"^```python\n(.*?)^```", text, re.S | re.M)
  assert match, f"{DOC} has no ```python block"
  return match.group(1)


def _printed(label: str, stdout: str) -> float:
  match = re.search(rf"^{re.escape(label)}:\s*([-+0-9.eE]+|nan|inf)\s*$", stdout, re.M)
  assert match, f"the example did not print '{label}: <number>'; stdout:\n{stdout}"
  return float(match.group(1))


def test_api_doc_example_runs_and_learns():
  code = _first_python_block(DOC.read_text())
  # conftest's XLA flags are inherited; the example's mesh.set_cpu_device_count replaces the
  # device count in them with its own.
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"
  initial = _printed("initial held-out loss", proc.stdout)
  final = _printed("final held-out loss", proc.stdout)
  assert final < initial, proc.stdout
