"""Multi-process runs on one machine: `python -m parallel.launch` over loopback.

Two processes with 4 CPU devices each must train exactly like one process with 8: the same
global batches, the same losses, the same checkpoints. The runs share the machine's cores, so
they start together and each test reads the results.
"""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import pytest

from parallel import launch

REPO = pathlib.Path(__file__).resolve().parents[1]
TRAIN = [
  *(sys.executable, "-m", "experiments.train", "--config", "experiments/configs/lm.py:tiny"),
  *("--config.train.steps=10", "--config.train.checkpoint_every=5"),
  *("--config.train.log_every=2", "--config.eval.every=5", "--config.eval.batch_size=64"),
  "--config.eval.steps=2",
  "--config.model.scan_layers=True",  # the stacked layers, which pipeline stages split
]
LAUNCH = [sys.executable, "-m", "parallel.launch", "-n", "2"]
# name -> (data, fsdp, tensor[, stage]); every mesh is compared with the 1-process
# data-parallel run. With devices in process-major order, data8 and 2x2x2 split the batch
# across the processes; fsdp2_tensor4 also shards the parameters (and so the checkpoint) across
# them; stage2_data4 puts pipeline stage 0 on process 0 and stage 1 on process 1 (the
# activations cross between the processes every iteration; both feed the whole batch).
MESHES = {
  "data8": (8, 1, 1),
  "stage2_data4": (4, 1, 1, 2),
  "data2_fsdp2_tensor2": (2, 2, 2),
  "fsdp2_tensor4": (1, 2, 4),
}
# Each run compiles for ~40 CPU-seconds: on 2 cores the default (reference, data8 and
# stage2_data4) takes ~2 minutes; TRIMFORMER_TEST_SLOW=1 adds the other meshes (~1 minute each).
SLOW = bool(os.environ.get("TRIMFORMER_TEST_SLOW"))
RUN = [m for m in MESHES if SLOW or m in ("data8", "stage2_data4")]
RUN_TIMEOUT = 600  # seconds, for all runs together


def clean_env(**extra) -> dict:
  """Our environment without multi-process variables (a developer shell may have them)."""
  env = {k: v for k, v in os.environ.items() if not k.startswith("TRIMFORMER_")}
  env.update(JAX_PLATFORMS="cpu", **extra)
  return env


def mesh_flags(data, fsdp, tensor, stage=1):
  return [
    f"--config.mesh.data={data}",
    f"--config.mesh.fsdp={fsdp}",
    f"--config.mesh.tensor={tensor}",
    f"--config.mesh.stage={stage}",
    f"--config.train.microbatches={2 if stage > 1 else 1}",
  ]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """workdir per run: "ref" (1 process, 8 devices) and each MESHES entry (2 processes x 4)."""
  root = tmp_path_factory.mktemp("launch")
  commands = {"ref": TRAIN + mesh_flags(8, 1, 1)}  # conftest gives this process 8 devices
  two = [*LAUNCH, "--devices-per-process", "4", "--timeout", str(RUN_TIMEOUT), "--"]
  for name in RUN:
    commands[name] = [*two, *TRAIN, *mesh_flags(*MESHES[name])]
  procs = {}
  for name, cmd in commands.items():
    with open(root / f"{name}.log", "wb") as log:  # the child keeps its own descriptor
      cmd = [*cmd, "--workdir", str(root / name)]
      procs[name] = subprocess.Popen(cmd, cwd=REPO, env=clean_env(), stdout=log, stderr=log)
  deadline = time.monotonic() + RUN_TIMEOUT + 30
  for p in procs.values():
    try:
      p.wait(timeout=max(1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      p.terminate()  # SIGTERM, which a launcher forwards to its children
      p.wait()
  codes = {name: p.returncode for name, p in procs.items()}
  return root, codes


def rows(root, name, code):
  log = (root / f"{name}.log").read_text(errors="replace")
  assert code == 0, f"{name} exited with {code}:\n{log[-4000:]}"
  with open(root / name / "metrics.jsonl") as f:
    return [json.loads(line) for line in f if line.strip()]


@pytest.mark.parametrize("mesh", list(MESHES))
def test_two_processes_train_like_one(runs, mesh):
  if mesh not in RUN:
    pytest.skip("slow: set TRIMFORMER_TEST_SLOW=1")
  root, codes = runs
  ref, multi = rows(root, "ref", codes["ref"]), rows(root, mesh, codes[mesh])
  assert [(r["step"], "loss" in r) for r in multi] == [(r["step"], "loss" in r) for r in ref]
  assert [r["step"] for r in ref if "loss" in r] == [2, 4, 6, 8, 10]
  assert [r["step"] for r in ref if "eval_loss" in r] == [5, 10]
  for a, b in zip(ref, multi):
    for k in ("loss", "eval_loss"):
      if k in a:
        assert b[k] == pytest.approx(a[k], abs=1e-5), (mesh, a["step"], k)
  # Every process saved its shards; process 0 alone wrote the run's files.
  assert sorted(os.listdir(root / mesh / "checkpoints"), key=int) == ["5", "10"]
  config = json.loads((root / mesh / "config.json").read_text())
  assert config["mesh"]["tensor"] == MESHES[mesh][2]
  log = (root / f"{mesh}.log").read_text(errors="replace")
  assert "[0] " in log and "[1] " in log


def test_process_batch_slice_feeds_each_row_once():
  # 2 processes x 2 devices. The batch is split over data*fsdp; with tensor parallelism across
  # the processes (1, 1, 4) both hold all rows and must feed the same, whole batch.
  child = """
import json
import numpy as np
from parallel import launch
launch.initialize_from_env()
import jax, jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import parallel
from parallel.sharding import process_batch_slice
out = {}
for mesh in [(4, 1, 1), (2, 1, 2), (1, 2, 2), (1, 1, 4)]:
  sharding = parallel.batch_sharding(parallel.make_mesh(*mesh), parallel.get_rules("fsdp_tp"))
  index, count = process_batch_slice(sharding)
  rows = np.arange(16, dtype=np.int32).reshape(count, -1)[index]
  x = jax.make_array_from_process_local_data(sharding, rows)
  total = jax.jit(lambda x: jnp.sum(x * x), out_shardings=NamedSharding(sharding.mesh, P()))(x)
  out[str(mesh)] = [index, count, x.shape[0], int(total)]
print("RESULT", json.dumps(out), flush=True)
"""
  p = subprocess.run(
    [*LAUNCH, "--devices-per-process", "2", "--timeout", "120", "--", sys.executable, "-c", child],
    cwd=REPO,
    env=clean_env(),
    check=False,
    capture_output=True,
    text=True,
    timeout=180,
  )
  assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
  got = {
    line.split()[0]: json.loads(line.split(" RESULT ", 1)[1])
    for line in p.stdout.splitlines()
    if " RESULT " in line
  }
  full = sum(i * i for i in range(16))
  for i in (0, 1):
    assert got[f"[{i}]"] == {
      "(4, 1, 1)": [i, 2, 16, full],
      "(2, 1, 2)": [i, 2, 16, full],
      "(1, 2, 2)": [i, 2, 16, full],
      "(1, 1, 4)": [0, 1, 16, full],
    }


def test_failing_child_stops_the_job(tmp_path):
  # Process 0 blocks in jax.distributed.initialize waiting for process 1, which dies first.
  child = f"""
import os, sys, time
from parallel import launch
i, out = os.environ["TRIMFORMER_PROCESS_ID"], {str(tmp_path)!r}
open(os.path.join(out, i), "w").write(str(os.getpid()))
if i == "1":
  while not os.path.exists(os.path.join(out, "0")):
    time.sleep(0.05)
  time.sleep(1)  # process 0 is now waiting for us in initialize
  print("dying", flush=True)
  sys.exit(3)
launch.initialize_from_env()
"""
  start = time.monotonic()
  p = subprocess.run(
    [*LAUNCH, "--", sys.executable, "-c", child],
    cwd=REPO,
    env=clean_env(),
    check=False,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert p.returncode == 3, p.stderr
  assert time.monotonic() - start < 60
  assert "process 1 failed (exit code 3)" in p.stderr
  assert "[1] dying" in p.stdout
  with pytest.raises(ProcessLookupError):  # the waiting process 0 was stopped, not orphaned
    os.kill(int((tmp_path / "0").read_text()), 0)


def test_sigterm_reaches_the_children(tmp_path):
  child = f"""
import os, time
open(os.path.join({str(tmp_path)!r}, os.environ["TRIMFORMER_PROCESS_ID"]), "w").write(str(os.getpid()))
time.sleep(60)
"""
  p = subprocess.Popen(
    [*LAUNCH, "--", sys.executable, "-c", child], cwd=REPO, env=clean_env(), stderr=subprocess.PIPE
  )
  pids = [tmp_path / "0", tmp_path / "1"]
  deadline = time.monotonic() + 60
  while not all(f.exists() and f.read_text() for f in pids) and time.monotonic() < deadline:
    time.sleep(0.1)
  p.send_signal(signal.SIGTERM)
  _, err = p.communicate(timeout=30)
  assert p.returncode == 128 + signal.SIGTERM, err
  for f in pids:
    with pytest.raises(ProcessLookupError):
      os.kill(int(f.read_text()), 0)


@pytest.mark.skipif(not SLOW, reason="slow (3 two-process runs): set TRIMFORMER_TEST_SLOW=1")
def test_sigterm_saves_on_every_process_at_one_step_and_resumes_bit_for_bit(tmp_path):
  """SIGTERM to a two-process run (each process gets it, as on a TPU pod): JAX's preemption
  sync picks one step, both processes save it and exit 143; the rerun ends bit for bit where
  an uninterrupted two-process run ends."""
  from experiments import chaos

  train = [*TRAIN, "--config.train.steps=30", "--config.train.checkpoint_every=15"]
  two = [*LAUNCH, "--devices-per-process", "4", "--timeout", "300", "--", *train]
  run = lambda name: [*two, "--workdir", str(tmp_path / name)]  # noqa: E731
  log = open(tmp_path / "preempted.log", "w+")
  p = subprocess.Popen(run("run"), cwd=REPO, env=clean_env(), stdout=log, stderr=log, text=True)
  deadline = time.monotonic() + 300
  while "First step" not in (tmp_path / "preempted.log").read_text():
    assert p.poll() is None and time.monotonic() < deadline, "no first step"
    time.sleep(0.1)
  p.send_signal(signal.SIGTERM)
  assert p.wait(timeout=300) == 128 + signal.SIGTERM
  text = (tmp_path / "preempted.log").read_text()
  saved = {
    line.split("step ")[-1].split(";")[0] for line in text.splitlines() if "Preempted:" in line
  }
  assert len(saved) == 1 and text.count("Preempted: saved") == 2, text[-3000:]
  assert max(os.listdir(tmp_path / "run" / "checkpoints"), key=int) == saved.pop()
  for name in ("run", "reference"):
    done = subprocess.run(run(name), cwd=REPO, env=clean_env(), capture_output=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
  assert chaos.compare(str(tmp_path / "reference"), str(tmp_path / "run")) == []


def test_timeout_stops_the_job():
  p = subprocess.run(
    [*LAUNCH, "--timeout", "1", "--", sys.executable, "-c", "import time; time.sleep(60)"],
    cwd=REPO,
    env=clean_env(),
    check=False,
    capture_output=True,
    text=True,
    timeout=60,
  )
  assert p.returncode == 124 and "timed out" in p.stderr, p.stderr


def test_initialize_from_env_is_a_noop_without_env(monkeypatch):
  for k in list(os.environ):
    if k.startswith(("TRIMFORMER_", "SLURM_", "OMPI_", "TPU_", "MEGASCALE_")):
      monkeypatch.delenv(k)
  assert launch.initialize_from_env() is False
  monkeypatch.setenv("SLURM_JOB_ID", "1")
  monkeypatch.setenv("SLURM_NTASKS", "1")  # a single-task allocation is not multi-process
  assert launch.initialize_from_env() is False
  monkeypatch.setenv("SLURM_NTASKS", "4")
  monkeypatch.setenv(launch.DISTRIBUTED, "off")
  assert launch.initialize_from_env() is False
  assert not jax.distributed.is_initialized()


def test_initialize_from_env_wants_all_three_variables(monkeypatch):
  monkeypatch.setenv(launch.COORDINATOR, "127.0.0.1:1234")
  monkeypatch.delenv(launch.NUM_PROCESSES, raising=False)
  with pytest.raises(ValueError, match="TRIMFORMER_NUM_PROCESSES"):
    launch.initialize_from_env()


def test_child_env_replaces_the_device_count(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_foo=1 --xla_force_host_platform_device_count=8")
  monkeypatch.delenv("JAX_PLATFORMS", raising=False)
  env = launch.child_env(1, 2, 1234, devices_per_process=4)
  assert env["XLA_FLAGS"].split() == ["--xla_foo=1", "--xla_force_host_platform_device_count=4"]
  assert env["JAX_PLATFORMS"] == "cpu"
  assert (env["TRIMFORMER_COORDINATOR"], env["TRIMFORMER_PROCESS_ID"]) == ("127.0.0.1:1234", "1")
  assert "JAX_PLATFORMS" not in launch.child_env(0, 2, 1234, devices_per_process=None)


def test_a_checkpoint_one_process_cannot_read_is_set_aside_by_all(tmp_path):
  """Two processes restore a checkpoint sharded across them; process 1 cannot read the newest
  (step 2) while process 0 can. Both go on from step 1, the one every process read, and step
  2 is moved aside once: no process resumes from a step another did not. (orbax's restore is
  itself a collective: the failure is injected after it, where a process-local check fails.)"""
  child = f"""
import jax, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from parallel import checkpoint, launch
launch.initialize_from_env()
sharding = NamedSharding(Mesh(np.array(jax.devices()), ("d",)), P("d"))
def state(v):
  return {{"w": jax.make_array_from_callback((16,), sharding, lambda i: np.arange(16.0)[i] * v)}}
d = {str(tmp_path / "ckpt")!r}
with checkpoint.Checkpointer(d) as c:
  c.save(1, state(1.0))
  c.wait()
  c.save(2, state(2.0))
if jax.process_index() == 1:
  read = checkpoint.Checkpointer._read
  def fails_at_2(self, step, target):
    out = read(self, step, target)  # orbax's restore is itself collective: fail after it
    if step == 2:
      raise OSError("process 1 cannot read step 2")
    return out
  checkpoint.Checkpointer._read = fails_at_2
abstract = {{"w": jax.ShapeDtypeStruct((16,), np.float32, sharding=sharding)}}
with checkpoint.Checkpointer(d) as c:
  restored, step = c.restore_latest(abstract)
ok = all(np.array_equal(s.data, np.arange(16.0)[s.index]) for s in restored["w"].addressable_shards)
print(f"RESULT process={{jax.process_index()}} step={{step}} values_of_step_1={{ok}}", flush=True)
"""
  p = subprocess.run(
    [*LAUNCH, "--devices-per-process", "4", "--timeout", "300", "--", sys.executable, "-c", child],
    cwd=REPO,
    env=clean_env(),
    capture_output=True,
    text=True,
    timeout=400,
  )
  assert p.returncode == 0, p.stderr[-3000:]
  results = sorted(line.split("RESULT ")[1] for line in p.stdout.splitlines() if "RESULT" in line)
  assert results == [
    "process=0 step=1 values_of_step_1=True",
    "process=1 step=1 values_of_step_1=True",
  ], p.stdout[-2000:]
  assert sorted(os.listdir(tmp_path / "ckpt")) == ["1"]
  assert os.listdir(tmp_path / "ckpt.unreadable") == ["2"]
