"""Multi-process runs: a local launcher, and the one call every entry point makes first.

    python -m parallel.launch -n 2 --devices-per-process 4 -- \
        python -m experiments.train --config experiments/configs/lm.py:tiny --workdir /tmp/lm2

starts 2 processes on this machine that find each other over loopback, each with 4 fake CPU
devices: the same code path as a TPU pod or GPU cluster (several processes, each feeding its
own slice of the batch), testable on a laptop. On a real cluster, do not use the launcher:
start one process per host as the cluster does, and `initialize_from_env` auto-detects it.

Environment read by `initialize_from_env`:
  TRIMFORMER_COORDINATOR, TRIMFORMER_NUM_PROCESSES, TRIMFORMER_PROCESS_ID
      explicit coordinates (what the launcher sets): "host:port", N, i.
  TRIMFORMER_DISTRIBUTED=auto | off
      auto: let `jax.distributed.initialize()` detect the cluster (Cloud TPU, SLURM, Open MPI,
      Kubernetes). off: stay single-process even inside a detected multi-process cluster.
      Unset: auto when SLURM or Open MPI report more than one task, or Cloud TPU names
      more than one worker; otherwise single-process.
"""

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import jax

COORDINATOR = "TRIMFORMER_COORDINATOR"
NUM_PROCESSES = "TRIMFORMER_NUM_PROCESSES"
PROCESS_ID = "TRIMFORMER_PROCESS_ID"
DISTRIBUTED = "TRIMFORMER_DISTRIBUTED"
_EXPLICIT = (COORDINATOR, NUM_PROCESSES, PROCESS_ID)
# Seconds the processes get, after a forwarded SIGTERM, to save their checkpoint and exit.
SAVE_GRACE = 120.0


def _int_env(name: str) -> int:
  try:
    return int(os.environ.get(name, ""))
  except ValueError:
    return 0


def _cluster_detected() -> bool:
  """Whether a standard multi-process cluster environment is present (single task: no)."""
  env = os.environ
  if "SLURM_JOB_ID" in env and _int_env("SLURM_NTASKS") > 1:
    return True
  if "OMPI_MCA_orte_hnp_uri" in env and _int_env("OMPI_COMM_WORLD_SIZE") > 1:
    return True
  hosts = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES") or ""
  return "," in hosts or "MEGASCALE_COORDINATOR_ADDRESS" in env


def initialize_from_env() -> bool:
  """Joins a multi-process run if the environment describes one; returns whether it did.

  Call it first, before anything touches JAX devices (jax.devices(), any computation). With
  none of the variables above set (an ordinary single-process run) it does nothing.
  """
  mode = os.environ.get(DISTRIBUTED, "").strip().lower()
  given = [k for k in _EXPLICIT if os.environ.get(k)]
  if mode in ("off", "0", "false", "no"):
    return False
  if not given and mode != "auto" and not _cluster_detected():
    return False  # an ordinary single-process run
  missing = [k for k in _EXPLICIT if k not in given]
  if given and missing:
    raise ValueError(
      f"{', '.join(given)} set but {', '.join(missing)} not: set all three "
      "(python -m parallel.launch does), or none."
    )
  if jax.distributed.is_initialized():  # e.g. main() called twice in one process
    return True
  # CPU collectives across processes need a transport; gloo ships with jaxlib. It only
  # affects the CPU backend, so it is harmless on TPU/GPU hosts.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if given:
    jax.distributed.initialize(
      coordinator_address=os.environ[COORDINATOR],
      num_processes=int(os.environ[NUM_PROCESSES]),
      process_id=int(os.environ[PROCESS_ID]),
    )
  else:
    jax.distributed.initialize()  # Cloud TPU, SLURM, Open MPI, k8s: auto-detected
  return True


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def child_env(i: int, n: int, port: int, devices_per_process: int | None) -> dict:
  env = dict(os.environ, **{COORDINATOR: f"127.0.0.1:{port}", NUM_PROCESSES: str(n)})
  env[PROCESS_ID] = str(i)
  env.pop(DISTRIBUTED, None)
  if devices_per_process:
    # Replace (not duplicate) an inherited device count, e.g. the test suite's 8.
    flags = re.sub(r"--xla_force_host_platform_device_count=\S*", "", env.get("XLA_FLAGS", ""))
    flag = f"--xla_force_host_platform_device_count={devices_per_process}"
    env["XLA_FLAGS"] = f"{flags} {flag}".strip()
    env.setdefault("JAX_PLATFORMS", "cpu")
  return env


def _pump(i: int, stream, lock: threading.Lock):
  """Copies a child's output to ours, each line prefixed with `[i] `, whole lines at a time."""
  prefix, out, pending = f"[{i}] ".encode(), sys.stdout.buffer, b""
  while True:
    chunk = os.read(stream.fileno(), 65536)
    # Split after every \n or \r (progress bars redraw with \r); keep the unfinished tail.
    *parts, pending = re.split(rb"(?<=[\r\n])", pending + chunk)
    if not chunk and pending:  # the child exited mid-line
      parts, pending = parts + [pending + b"\n"], b""
    text = b"".join(p if p == b"\r" else prefix + p for p in parts if p)
    if text:
      with lock:
        try:
          out.write(text)
          out.flush()
        except OSError:  # our stdout is gone (e.g. `| head`): keep draining, or the child blocks
          pass
    if not chunk:
      return


def _signal_all(procs, sig):
  for p in procs:
    if p.poll() is None:
      try:
        os.killpg(p.pid, sig)  # the child's own group: its subprocesses too
      except ProcessLookupError:
        pass


def _stop_all(procs, grace: float = 10.0):
  """SIGTERM the children still running, then SIGKILL those that outlive `grace` seconds."""
  _signal_all(procs, signal.SIGTERM)
  deadline = time.monotonic() + grace
  while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
    time.sleep(0.05)
  _signal_all(procs, signal.SIGKILL)
  for p in procs:
    p.wait()


def launch(
  command: list[str], n: int, devices_per_process: int | None = None, timeout: float | None = None
) -> int:
  """Runs `n` copies of `command` as one multi-process job; returns the exit code to use."""
  port, lock = free_port(), threading.Lock()
  procs, pumps = [], []
  received = []  # signals forwarded to the children

  def log(msg):
    print(f"[launch] {msg}", file=sys.stderr, flush=True)

  def forward(sig, _):
    if received:  # a second Ctrl-C: stop waiting
      _signal_all(procs, signal.SIGKILL)
    received.append(sig)
    _signal_all(procs, sig)

  old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
  try:
    for i in range(n):
      # A new session per child: Ctrl-C reaches only us, and we decide what the children get.
      p = subprocess.Popen(
        command,
        env=child_env(i, n, port, devices_per_process),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
      )
      procs.append(p)
      pumps.append(threading.Thread(target=_pump, args=(i, p.stdout, lock), daemon=True))
      pumps[-1].start()
    start, code = time.monotonic(), 0
    while True:
      codes = [p.poll() for p in procs]
      failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
      if received:
        log(f"got signal {received[0]}; forwarded it to the processes")
        _stop_all(procs, grace=SAVE_GRACE)  # a preempted train run saves before it exits
        code = 128 + received[0]
        break
      if failed:
        i, c = failed[0]
        how = f"signal {-c}" if c < 0 else f"exit code {c}"
        log(f"process {i} failed ({how}); stopping the others")
        _stop_all(procs)
        code = c if c > 0 else 128 - c
        break
      if all(c == 0 for c in codes):
        break
      if timeout and time.monotonic() - start > timeout:
        running = [i for i, c in enumerate(codes) if c is None]
        log(f"timed out after {timeout:g}s; stopping processes {running}")
        _stop_all(procs)
        code = 124
        break
      time.sleep(0.05)
  finally:
    _stop_all(procs, grace=0)  # whatever happened, no child outlives the launcher
    for t in pumps:
      t.join(timeout=5)
    for s, h in old.items():
      signal.signal(s, h)
  return code


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
    prog="python -m parallel.launch",
    description="Run N local processes of a command as one multi-process JAX job (loopback).",
  )
  parser.add_argument("-n", "--num-processes", type=int, required=True)
  parser.add_argument(
    "--devices-per-process", type=int, default=None, help="fake CPU devices per process"
  )
  parser.add_argument("--timeout", type=float, default=None, help="seconds; then stop all")
  parser.add_argument("command", nargs=argparse.REMAINDER, help="-- command ...")
  args = parser.parse_args(argv)
  command = args.command[1:] if args.command[:1] == ["--"] else args.command
  if not command:
    parser.error("no command given: python -m parallel.launch -n N -- <command ...>")
  if args.num_processes < 1:
    parser.error("-n must be at least 1")
  try:
    return launch(command, args.num_processes, args.devices_per_process, args.timeout)
  except FileNotFoundError as e:  # the command itself does not exist
    print(f"[launch] cannot start {command[0]!r}: {e.strerror}", file=sys.stderr)
    return 127


if __name__ == "__main__":
  sys.exit(main())
