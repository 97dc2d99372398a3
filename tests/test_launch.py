"""Launchers (--dry-run prints the exact commands) and how a process finds its group."""

import pathlib
import shlex
import subprocess
import sys

import pytest

from diloco_jax import distributed

REPO = pathlib.Path(__file__).resolve().parents[1]
FLAGS = ["--config=experiments/configs/streaming.py:paper", "--workdir=/mnt/shared/runs/sd",
         "--config.data.paths=('/mnt/c4 text/*.txt',)"]   # a space and quotes survive


def dry(script, *opts):
  out = subprocess.run(["bash", f"launch/{script}", "--dry-run", *opts, "--", *FLAGS], cwd=REPO,
                       capture_output=True, text=True, timeout=60)
  assert out.returncode == 0, out.stderr
  return [shlex.split(line) for line in out.stdout.strip().splitlines()]


def train_cmd(command: str) -> list[str]:
  """The diloco_jax.main invocation inside a remote shell command string."""
  words = shlex.split(command.split(" && ")[-1])
  assert words[:3] == [".venv/bin/python", "-m", "diloco_jax.main"] or \
         words[:4] == ["srun", ".venv/bin/python", "-m", "diloco_jax.main"], words
  return words[words.index("diloco_jax.main") + 1:]


def test_tpu_vm_creates_ships_and_runs_on_every_host():
  cmds = dry("tpu_vm.sh", "--create", "--name=dl", "--zone=us-west4-a",
             "--accelerator=v5litepod-16", "--version=v2-alpha-tpuv5-lite", "--project=p")
  assert cmds[0] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "dl", "--zone=us-west4-a",
                     "--accelerator-type=v5litepod-16", "--version=v2-alpha-tpuv5-lite",
                     "--project=p"]
  assert cmds[1][:3] == ["git", "-C", str(REPO)] and cmds[1][3:5] == ["archive", "--format=tar.gz"]
  assert cmds[2][:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]
  assert "--worker=all" in cmds[2] and "--worker=all" in cmds[3]
  command = next(w for w in cmds[3] if w.startswith("--command="))[len("--command="):]
  assert "JAX_EXTRA=tpu bash launch/setup_venv.sh" in command
  assert train_cmd(command) == FLAGS


def test_multislice_queues_one_node_per_slice_then_runs_on_all_nodes():
  opts = ["--name=ms", "--zone=us-east5-b", "--accelerator=v5litepod-16",
          "--version=v2-alpha-tpuv5-lite", "--slices=4"]
  create = dry("tpu_multislice.sh", "--create", *opts)
  assert create == [["gcloud", "compute", "tpus", "queued-resources", "create", "ms",
                     "--node-count=4", "--node-prefix=ms", "--accelerator-type=v5litepod-16",
                     "--runtime-version=v2-alpha-tpuv5-lite", "--zone=us-east5-b"]]
  cmds = dry("tpu_multislice.sh", *opts)
  assert cmds[1][:5] == ["gcloud", "compute", "tpus", "queued-resources", "scp"]
  ssh = cmds[2]
  assert ssh[:6] == ["gcloud", "compute", "tpus", "queued-resources", "ssh", "ms"]
  assert "--node=all" in ssh and "--worker=all" in ssh
  assert train_cmd(next(w for w in ssh if w.startswith("--command="))[10:]) == FLAGS


def test_gke_xpk_submits_one_workload_over_the_slices():
  (cmd,) = dry("gke_xpk.sh", "--cluster=c1", "--workload=sd-1b", "--tpu_type=v5litepod-256",
               "--slices=2")
  assert cmd[:3] == ["xpk", "workload", "create"]
  assert {"--cluster=c1", "--workload=sd-1b", "--tpu-type=v5litepod-256", "--num-slices=2",
          f"--script-dir={REPO}"} <= set(cmd)
  assert train_cmd(next(w for w in cmd if w.startswith("--command="))[10:]) == FLAGS


def test_slurm_batch_script_has_one_task_per_node():
  out = subprocess.run(["bash", "launch/slurm.sh", "--dry-run", "--nodes=4", "--gpus_per_node=8",
                        "--partition=gpu", "--", *FLAGS], cwd=REPO, capture_output=True,
                       text=True, timeout=60)
  assert out.returncode == 0, out.stderr
  lines = out.stdout.strip().splitlines()
  for want in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
               "#SBATCH --partition=gpu", "JAX_EXTRA=cuda12 bash launch/setup_venv.sh   # once, "
               "on the shared filesystem"):
    assert want in lines
  srun = next(line for line in lines if line.startswith("srun "))
  assert train_cmd(srun) == FLAGS
  assert lines[-1].startswith("sbatch ") and lines[-1].endswith(".sbatch")


def test_slurm_restart_runs_srun_again_and_allow_fewer_on_the_nodes_still_up():
  out = subprocess.run(["bash", "launch/slurm.sh", "--dry-run", "--nodes=4", "--gpus_per_node=8",
                        "--restart=2", "--allow_fewer=1", "--", *FLAGS], cwd=REPO,
                       capture_output=True, text=True, timeout=60)
  assert out.returncode == 0, out.stderr
  script = out.stdout[:out.stdout.rindex("sbatch ")]
  assert "#SBATCH --no-kill" in script.splitlines()
  subprocess.run(["bash", "-n"], input=script, check=True, text=True)   # it parses
  srun = next(line.strip() for line in script.splitlines() if "srun " in line)
  words = shlex.split(srun.split("|| rc=")[0].split("; ", 1)[1])
  assert words[:3] == ["srun", "--nodes=$NODES", "--ntasks=$NODES"]
  assert words[6:] == [*FLAGS, "$EXTRA"]
  assert "for attempt in $(seq 0 2); do" in script
  assert "EXTRA=--original_num_processes=4" in script
  plain = subprocess.run(["bash", "launch/slurm.sh", "--dry-run", "--nodes=4", "--gpus_per_node=8",
                          "--restart=1", "--", *FLAGS], cwd=REPO, capture_output=True, text=True,
                         timeout=60).stdout
  assert "--no-kill" not in plain and "original_num_processes" not in plain


def test_local_dry_run_gives_each_process_its_id():
  out = subprocess.run(["bash", "launch/local.sh", "3", "--dry-run", *FLAGS], cwd=REPO,
                       capture_output=True, text=True, timeout=60,
                       env={"LOCAL_PORT": "4321", "PATH": "/usr/bin:/bin"})
  assert out.returncode == 0, out.stderr
  cmds = [shlex.split(line) for line in out.stdout.strip().splitlines()]
  assert len(cmds) == 3
  for i, cmd in enumerate(cmds):
    assert cmd[cmd.index("diloco_jax.main") + 1:] == [
        "--coordinator_address=127.0.0.1:4321", "--num_processes=3", f"--process_id={i}",
        "--heartbeat_timeout_s=10", *FLAGS]


# A stand-in for python that acts out a failure: process 1 is killed (SIGKILL) the first time it
# runs; process 0 then fails the way JAX ends it when a peer dies; afterwards every process
# succeeds, or with FAKE_RC every one exits with that status. Each start is logged with its
# arguments.
FAKE_PYTHON = """#!/usr/bin/env bash
[ "$1" = -c ] && exec python3 "$@"
line=$(printf '%q ' "$@"); echo "$line" >> "$FAKE_DIR/starts"   # one write: no interleaving
id=$(printf '%s\\n' "$@" | sed -n 's/^--process_id=//p')
[ -n "${FAKE_RC:-}" ] && exit "$FAKE_RC"
if [ "$id" = 1 ] && [ ! -e "$FAKE_DIR/killed" ]; then touch "$FAKE_DIR/killed"; kill -9 $$; fi
if [ "$id" = 0 ] && [ ! -e "$FAKE_DIR/p0_failed" ]; then
  sleep 1; touch "$FAKE_DIR/p0_failed"; echo "another task died"; exit 1
fi
exit 0
"""


def _local_with_fake_python(tmp_path, *opts, rc=None):
  fake = tmp_path / "python"
  fake.write_text(FAKE_PYTHON)
  fake.chmod(0o755)
  env = {"PATH": "/usr/bin:/bin", "PYTHON": str(fake), "FAKE_DIR": str(tmp_path),
         **({"FAKE_RC": str(rc)} if rc is not None else {})}
  out = subprocess.run(["bash", "launch/local.sh", "2", *opts, *FLAGS], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=60)
  starts = [shlex.split(line) for line in (tmp_path / "starts").read_text().splitlines()]
  return out, [s[s.index("diloco_jax.main") + 1:] for s in starts]


def _flag(words, name):
  return next((w.split("=", 1)[1] for w in words if w.startswith(f"--{name}=")), None)


def test_local_restart_starts_every_process_again_after_one_is_killed(tmp_path):
  out, starts = _local_with_fake_python(tmp_path, "--restart=2")
  assert out.returncode == 0, out.stderr
  assert "local.sh: process 1 was ended by signal 9 (KILL)" in out.stderr
  assert "local.sh: restart 1 of 2 on 2 processes, from the last checkpoint" in out.stderr
  assert "restart 2" not in out.stderr
  assert sorted((_flag(s, "num_processes"), _flag(s, "process_id")) for s in starts) == [
      ("2", "0"), ("2", "0"), ("2", "1"), ("2", "1")]
  assert all(_flag(s, "original_num_processes") is None and s[-len(FLAGS):] == FLAGS
             for s in starts)
  # A new coordinator port for the new attempt (the old one may still be held).
  assert len({_flag(s, "coordinator_address") for s in starts}) == 2


def test_local_allow_fewer_goes_on_with_the_survivors(tmp_path):
  out, starts = _local_with_fake_python(tmp_path, "--restart=2", "--allow_fewer")
  assert out.returncode == 0, out.stderr
  assert "local.sh: restart 1 of 2 on 1 processes, from the last checkpoint" in out.stderr
  assert len(starts) == 3
  last = starts[-1]
  assert (_flag(last, "num_processes"), _flag(last, "process_id"),
          _flag(last, "original_num_processes")) == ("1", "0", "2")
  assert last[-len(FLAGS):] == FLAGS


@pytest.mark.parametrize("opts,rc,said", [
    (["--restart=3"], 2, "local.sh: not restarting: a process exited with 2 (bad input)"),
    (["--restart=0"], None, "local.sh: FAILED: process 1 was ended by signal 9 (KILL) first"),
])
def test_local_does_not_restart_bad_input_or_past_its_count(tmp_path, opts, rc, said):
  out, starts = _local_with_fake_python(tmp_path, *opts, rc=rc)
  assert out.returncode == (2 if rc == 2 else 137)
  assert said in out.stderr and "restart 1" not in out.stderr
  assert len(starts) == 2


def test_survivors_keep_the_workers_per_process():
  from diloco_jax import config as config_lib  # noqa: PLC0415
  from tests.test_train import small_config  # noqa: PLC0415
  c = small_config(**{"diloco.num_workers": 4})
  config_lib.for_survivors(c, 1, 2)
  assert (c.diloco.num_workers, c.train.allow_fewer_workers) == (2, True)
  c.mesh.num_cpu_devices = 8
  config_lib.for_survivors(c, 1, 2)
  assert (c.diloco.num_workers, c.mesh.num_cpu_devices) == (1, 4)
  for n, original, message in [(1, 3, "does not leave a whole number of workers on 1 process"),
                               (3, 2, "it only shrinks a run"),
                               (None, 2, "needs the process count before JAX starts")]:
    with pytest.raises(ValueError, match=message):
      config_lib.for_survivors(c, n, original)
  assert distributed.process_count(distributed.ProcessGroup(auto=True),
                                   env={"SLURM_NTASKS": "3"}) == 3
  assert distributed.process_count(None) == 1


@pytest.mark.parametrize("script,opts,message", [
    ("tpu_vm.sh", ["--zone=z", "--accelerator=a", "--version=v"], "--name is required"),
    ("tpu_multislice.sh", ["--name=n", "--zone=z", "--accelerator=a", "--version=v",
                           "--slices=two"], "--slices must be a positive integer, got 'two'"),
    ("slurm.sh", ["--nodes=2", "--gpus_per_node=8", "--gpus=8"], "unknown option --gpus"),
    ("gke_xpk.sh", ["--cluster=c", "--workload=w", "--tpu_type=t", "--slices=1", "oops"],
     "expected --key=value options"),
])
def test_launchers_reject_bad_options_in_one_line(script, opts, message):
  out = subprocess.run(["bash", f"launch/{script}", "--dry-run", *opts, "--", *FLAGS], cwd=REPO,
                       capture_output=True, text=True, timeout=60)
  assert out.returncode == 2 and out.stdout == ""
  assert message in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_launchers_need_the_training_flags():
  out = subprocess.run(["bash", "launch/slurm.sh", "--nodes=2", "--gpus_per_node=8"], cwd=REPO,
                       capture_output=True, text=True, timeout=60)
  assert out.returncode == 2 and "give the training flags after --" in out.stderr


# ------------------------------------------------------------------------ process groups
def test_one_process_needs_nothing():
  assert distributed.resolve(env={}) is None
  assert distributed.resolve("127.0.0.1:1234", 1, 0, env={}) is None


def test_flags_win_over_the_environment():
  env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:99", "JAX_NUM_PROCESSES": "8",
         "JAX_PROCESS_ID": "3"}
  assert distributed.resolve("127.0.0.1:5000", 2, 1, env=env) == \
      distributed.ProcessGroup("127.0.0.1:5000", 2, 1)
  assert distributed.resolve(env=env) == distributed.ProcessGroup("10.0.0.1:99", 8, 3)


@pytest.mark.parametrize("env,auto", [
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}, True),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}, False),
    ({"OMPI_COMM_WORLD_SIZE": "2"}, True),
    ({"TPU_WORKER_HOSTNAMES": "h0,h1"}, True),
    ({"TPU_WORKER_HOSTNAMES": "h0"}, False),
    ({"MEGASCALE_COORDINATOR_ADDRESS": "h0:8080"}, True),
])
def test_clusters_are_left_to_jax_detection(env, auto):
  group = distributed.resolve(env=env)
  assert (group == distributed.ProcessGroup(auto=True)) if auto else group is None


@pytest.mark.parametrize("args,message", [
    (("127.0.0.1:5000", 2, None), "must be given together"),
    (("127.0.0.1", 2, 0), "coordinator address must be host:port, got '127.0.0.1'"),
    (("127.0.0.1:5000", 2, 2), "0 <= process_id < num_processes, got 2 and 2"),
    (("127.0.0.1:5000", 0, 0), "need num_processes >= 1"),
])
def test_bad_process_flags(args, message):
  with pytest.raises(ValueError, match=message):
    distributed.resolve(*args, env={})


def test_main_reports_bad_process_flags_before_starting_jax():
  out = subprocess.run([sys.executable, "-m", "diloco_jax.main", *FLAGS[:2],
                        "--num_processes=2", "--process_id=0"], cwd=REPO, capture_output=True,
                       text=True, timeout=120)
  assert out.returncode == 2
  assert out.stderr.strip().splitlines()[-1] == (
      "flag error: the flags --coordinator_address, --num_processes and --process_id must be "
      "given together (got (None, 2, 0))")
