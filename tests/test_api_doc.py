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
  env = dict(os.environ)
  # Not conftest's 8-device flag (the example asks for its own count); its compile flags stay.
  env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                              if not f.startswith("--xla_force_host_platform_device_count"))
  env["JAX_PLATFORMS"] = "cpu"
  proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"
  initial = _printed("initial held-out loss", proc.stdout)
  final = _printed("final held-out loss", proc.stdout)
  assert final < initial, proc.stdout
