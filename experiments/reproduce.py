"""Reproduce a paper's table: every arm through the one train loop, then the table and a plot.

    python -m experiments.reproduce nm --workdir runs/repro                 # 2:4 vs 50% (Mishra)
    python -m experiments.reproduce gmp --workdir runs/repro --seeds 5
    python -m experiments.reproduce qat --workdir gs://bucket/repro --scale full

Tables (experiments/tables/): gmp, qat, kd, nm, deep-compression, parallel, lora, lowrank,
oneshot, squad. An arm is a run config from experiments/configs with a few fields changed; each
(arm, seed) trains with `train.train_and_evaluate` in `DIR/TABLE/<arm>/seed<k>` and leaves
`result.json` there, so a rerun skips what finished (and resumes what was interrupted, from its
checkpoint). Arms that start from another arm's model (`init_from`) or distill from it
(`teacher`) wait for it. The table lands in `DIR/TABLE.md`, `DIR/TABLE.json` and
`DIR/TABLE.png`, with each paper claim checked: does the ordering hold, and is it beyond the
seed-to-seed noise (a paired t-test over seeds, one-sided, 95%)?

Scales: `tiny` (the synthetic source, CPU, minutes; seeds vary the initialization), `small`
(qat, kd and deep-compression: the synthetic source with models trained to where their
claims can show, about 20 minutes per table on 2 CPU cores, 5 seeds), `full` (real data: TFDS
and HF checkpoints, for TPU/GPU; see each table's docstring for what it expects) and `test`
(seconds: the tests' smoke version; its numbers mean nothing).

On CPU the arms run in parallel worker processes, one per core, each pinned to its core (a
tiny model's step does not use two cores well); on accelerators they run one after another in
this process.
"""

import dataclasses
import importlib
import json
import multiprocessing
import os
import signal
import sys
import time
from concurrent import futures

from absl import app, flags, logging
import ml_collections

import parallel
from experiments import metrics, progress
from experiments import train  # noqa: F401 (defines --workdir, which the tables' runs share)
from experiments.configs import common
from experiments.tables import Arm, Report, Results

TABLES = (
  "gmp",
  "qat",
  "kd",
  "nm",
  "deep-compression",
  "parallel",
  "lora",
  "lowrank",
  "oneshot",
  "squad",
)
SCALES = ("tiny", "small", "full", "test")
SEEDS = {"tiny": 3, "small": 5}  # the default seeds per arm; other scales: 1


def table_module(name: str):
  if name not in TABLES:
    raise ValueError(f"Unknown table {name!r}: choose one of {', '.join(TABLES)}.")
  return importlib.import_module("experiments.tables." + name.replace("-", "_"))


def run_dir(workdir: str, table: str, arm: Arm, seed: int) -> str:
  return os.path.join(workdir, table, arm.name, f"seed{0 if arm.shared else seed}")


def _jobs(table: str, arms: list[Arm], workdir: str, seeds: int) -> list[dict]:
  """(arm, seed) runs with their final configs and the runs they wait for, in arm order."""
  by_name = {a.name: a for a in arms}
  seed_data = getattr(table_module(table), "SEED_DATA", False)
  jobs, seen = [], set()
  for arm in arms:
    for dep in (arm.init_from, arm.teacher, arm.reference):
      if dep and dep not in by_name:
        raise ValueError(f"Arm {arm.name!r} depends on {dep!r}, which the table lacks.")
    for seed in range(1 if arm.shared else seeds):
      path = run_dir(workdir, table, arm, seed)
      if path in seen:
        continue
      seen.add(path)
      config = ml_collections.ConfigDict(arm.config.to_dict())
      config.seed = config.seed + seed
      if seed_data and config.data.source == "markov":
        config.data.stream = seed  # also another sample of the training data
      waits = []
      if arm.init_from:
        waits.append(run_dir(workdir, table, by_name[arm.init_from], seed))
        config.init_from = waits[-1]
      if arm.teacher:
        teacher = by_name[arm.teacher]
        waits.append(run_dir(workdir, table, teacher, seed))
        config.teacher = ml_collections.ConfigDict(teacher.config.to_dict())
        config.teacher.seed = config.teacher.seed + (0 if teacher.shared else seed)
        if seed_data and not teacher.shared and config.teacher.data.source == "markov":
          config.teacher.data.stream = seed
        config.distill.teacher_workdir = waits[-1]
      if arm.reference:
        waits.append(run_dir(workdir, table, by_name[arm.reference], seed))
        config.eval.agreement_with = waits[-1]
      jobs.append(dict(arm=arm.name, seed=seed, path=path, config=config, waits=waits, run=arm.run))
  return jobs


def _validate(job: dict):
  """The checks of the compression sections that need no model or data."""
  from experiments import methods

  try:
    methods.make(job["config"])
  except ValueError as e:
    raise ValueError(f"Arm {job['arm']} (seed {job['seed']}): {e}") from e


def _flat(d, prefix=""):
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[prefix + k] = v
  return out


def _done(job: dict) -> dict | None:
  """The finished run's result, None if it has not finished; an error if it ran another config."""
  try:
    with open(os.path.join(job["path"], "result.json")) as f:
      result = json.load(f)
  except FileNotFoundError:
    return None
  now = _flat(json.loads(json.dumps(job["config"].to_dict(), default=str)))
  then = _flat(result["config"])
  default = common.defaults(job["config"])  # a field added since: left off, or its default
  new_off = lambda k: k not in then and (not now[k] or now[k] == default.get(k))  # noqa: E731
  diff = sorted(k for k in now.keys() | then.keys() if now.get(k) != then.get(k) and not new_off(k))
  if diff:
    changes = ", ".join(f"{k}: {then.get(k)!r} -> {now.get(k)!r}" for k in diff[:5])
    raise ValueError(
      f"{job['path']} holds a finished run of another config ({changes}). Use another "
      "--workdir, or delete that directory to rerun it."
    )
  return result


_CORE = None


def _init_worker(cores, counter, cache_dir):
  """A worker process: pinned to one core, sharing the compilation cache."""
  global _CORE
  with counter.get_lock():
    _CORE = cores[counter.value % len(cores)]
    counter.value += 1
  if hasattr(os, "sched_setaffinity"):
    os.sched_setaffinity(0, {_CORE})
  _setup_jax(cache_dir)


def _setup_jax(cache_dir):
  import jax

  if cache_dir and not jax.config.jax_compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def _run_job(job: dict, quiet: bool, verbose: bool = False) -> dict:
  """Trains one (arm, seed) and writes its result.json. `quiet` (a worker): the run's log and
  progress lines go to its run.log, the libraries' INFO logs only if `verbose`."""
  os.makedirs(job["path"], exist_ok=True)
  saved = None
  if quiet:  # a worker: its logs and progress bars to the run's own file
    log = open(os.path.join(job["path"], "run.log"), "a")
    saved = os.dup(1), os.dup(2)
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    logging.set_verbosity(logging.INFO)
    progress.quiet_libraries(verbose)
  try:
    t0 = time.perf_counter()
    if job["run"]:
      module, fn = job["run"].split(":")
      row = getattr(importlib.import_module(module), fn)(job["config"], job["path"])
    else:
      row = train.train_and_evaluate(job["config"], job["path"])
    result = dict(
      arm=job["arm"],
      seed=job["seed"],
      row={k: v for k, v in row.items() if isinstance(v, (int, float, str, bool))},
      wall_s=time.perf_counter() - t0,
      config=job["config"].to_dict(),
      versions=metrics.versions(),
    )
    tmp = os.path.join(job["path"], "result.json.tmp")
    with open(tmp, "w") as f:
      json.dump(result, f, indent=1, default=str)
    os.replace(tmp, os.path.join(job["path"], "result.json"))
    return result
  finally:
    if saved is not None:
      sys.stdout.flush()
      sys.stderr.flush()
      os.dup2(saved[0], 1)
      os.dup2(saved[1], 2)
      log.close()


def _summary(result: dict) -> str:
  row = result["row"]
  keys = [k for k in row if "excess_loss" in k or k in ("accuracy", "tokens_per_sec")][:3]
  return ", ".join(f"{k}={progress.number(row[k])}" for k in keys)


def run(
  table: str,
  workdir: str,
  scale: str = "tiny",
  seeds: int | None = None,
  workers: int | None = None,
  only: list[str] | None = None,
  verbose: bool = False,
) -> dict:
  """Runs (or skips, when finished) every arm of `table` and writes DIR/TABLE.{md,json,png}.

  `only`: these arms (and the arms they wait for); the table is then written from them.
  `verbose`: the workers' run.log also gets the libraries' INFO logs. Returns the table's JSON.
  """
  if scale not in SCALES:
    raise ValueError(f"--scale={scale!r}: choose one of {', '.join(SCALES)}.")
  module = table_module(table)
  if scale not in module.STEPS:
    raise ValueError(
      f"--scale={scale}: table {table} has no {scale} scale; choose one of "
      f"{', '.join(k for k in SCALES if k in module.STEPS)}."
    )
  arms = module.arms(scale)
  if only:
    by_name, keep, todo = {a.name: a for a in arms}, set(), list(only)
    unknown = [a for a in only if a not in by_name]
    if unknown:
      raise ValueError(f"--only: no arm {unknown} in table {table}; it has {list(by_name)}.")
    while todo:
      a = by_name[todo.pop()]
      keep.add(a.name)
      todo += [d for d in (a.init_from, a.teacher, a.reference) if d]
    complete = len(keep) == len(arms)
    arms = [a for a in arms if a.name in keep]
  else:
    complete = True
  seeds = seeds or SEEDS.get(scale, 1)
  if workers is None:
    workers = (
      len(os.sched_getaffinity(0)) if scale != "full" and hasattr(os, "sched_getaffinity") else 1
    )
  workers = max(1, min(workers, getattr(module, "MAX_WORKERS", workers)))
  jobs = _jobs(table, arms, workdir, seeds)
  os.makedirs(workdir, exist_ok=True)
  cache_dir = os.path.join(workdir, ".jax_cache")

  for job in jobs:  # a config the loop would refuse fails now, not after hours of other runs
    _validate(job)
  results = {j["path"]: _done(j) for j in jobs}
  todo = [j for j in jobs if results[j["path"]] is None]
  skipped = len(jobs) - len(todo)
  print(
    f"{table} ({scale}): {len(arms)} arms x {seeds} seeds -> {len(jobs)} runs"
    f"{f', {skipped} already finished' if skipped else ''}; {workers} worker(s); logs in "
    f"{os.path.join(workdir, table)}/<arm>/seed<k>/run.log",
    flush=True,
  )
  t0 = time.perf_counter()
  bar = progress.Progress(len(jobs), skipped, unit="run", file=sys.stdout, warmup=False)

  def finished(job, result):
    results[job["path"]] = result
    bar.update(1)
    elapsed, eta = time.perf_counter() - t0, bar.eta()
    left = f", ETA {progress.duration(eta)}" if eta is not None else ""
    bar.line(
      f"[{sum(r is not None for r in results.values())}/{len(jobs)}] {job['arm']} seed "
      f"{job['seed']}: {_summary(result)} ({result['wall_s']:.0f}s; "
      f"{progress.duration(elapsed)} in{left})"
    )

  if workers == 1:
    _setup_jax(cache_dir)
    for job in todo:
      bar.show(f"{job['arm']} seed {job['seed']}")
      finished(job, _run_job(job, quiet=False))
  else:
    ctx = multiprocessing.get_context("spawn")
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else [0]
    counter = ctx.Value("i", 0)

    # SIGTERM (preemption) to this process reaches the workers: each saves its run and stops.
    def forward(*_):
      for child in multiprocessing.active_children():
        os.kill(child.pid, signal.SIGTERM)

    previous = signal.signal(signal.SIGTERM, forward)
    with futures.ProcessPoolExecutor(
      workers, mp_context=ctx, initializer=_init_worker, initargs=(cores, counter, cache_dir)
    ) as pool:
      running, pending = {}, list(todo)
      while pending or running:
        for job in list(pending):
          if len(running) >= workers:
            break
          if all(results.get(w) is not None for w in job["waits"]):
            pending.remove(job)
            running[pool.submit(_run_job, job, True, verbose)] = job
        if not running:
          raise RuntimeError(f"Runs wait for runs that cannot start: {pending}")
        bar.show(", ".join(f"{j['arm']}/{j['seed']}" for j in running.values()))
        done, _ = futures.wait(running, return_when=futures.FIRST_COMPLETED)
        for fut in done:
          job = running.pop(fut)
          try:
            finished(job, fut.result())
          except parallel.Preempted:
            bar.close()
            raise
          except Exception as e:
            bar.close()
            raise RuntimeError(
              f"{table}: arm {job['arm']} seed {job['seed']} failed; see "
              f"{os.path.join(job['path'], 'run.log')}"
            ) from e
    signal.signal(signal.SIGTERM, previous)
  bar.close()
  wall = time.perf_counter() - t0
  return write(table, module, arms, jobs, results, workdir, scale, seeds, wall, skipped, complete)


def partial_report(res: Results) -> Report:
  """Some arms only (--only): each run's final numbers, no claims."""
  keys = sorted(
    {
      k
      for rs in res.rows.values()
      for r in rs
      for k, v in r["row"].items()
      if isinstance(v, (int, float)) and "loss" in k
    }
  )
  rows = [
    [arm, str(len(rs))] + [res.fmt(arm, k) if k in rs[0]["row"] else "" for k in keys]
    for arm, rs in res.rows.items()
  ]

  def plot(fig, res):
    ax = fig.add_subplot(1, 1, 1)
    names = list(res.rows)
    ax.bar(names, [res.mean_std(a, keys[0])[0] if keys else 0 for a in names])
    ax.set_ylabel(keys[0] if keys else "")

  return Report(["arm", "seeds"] + keys, rows, [], plot, notes="Only some arms ran (--only).")


def write(table, module, arms, jobs, results, workdir, scale, seeds, wall, skipped, complete=True):
  """DIR/TABLE.md, .json and .png from the finished runs (all of them: the table's report;
  some: each arm's numbers)."""
  import matplotlib

  matplotlib.use("Agg")
  from matplotlib import pyplot as plt

  by_arm = {a.name: [] for a in arms}
  for job in jobs:
    by_arm[job["arm"]].append(results[job["path"]])
  res = Results(by_arm)
  n_seeds = max(len(rs) for rs in by_arm.values())  # shared arms (a teacher) run once
  rep = module.report(res) if complete else partial_report(res)
  run_s = sum(r["wall_s"] for r in results.values())
  previous = os.path.join(workdir, f"{table}.json")
  if skipped == len(jobs) and os.path.exists(previous):  # nothing ran: keep the time it took
    with open(previous) as f:
      old = json.load(f)
    if old.get("runs_total") == len(jobs):
      wall, skipped = old["wall_s"], old.get("runs_reused", 0)
  command = f"python -m experiments.reproduce {table} --workdir {workdir} --scale {scale}"
  timing = (
    f"{len(jobs)} runs ({n_seeds} seed{'s' if n_seeds > 1 else ''}), {wall / 60:.1f} min wall "
    f"({run_s / 60:.1f} run-minutes)" + (f", {skipped} runs reused" if skipped else "")
  )
  seen = {json.dumps(r["versions"], sort_keys=True) for r in results.values() if "versions" in r}
  libs = " | ".join(metrics.versions_line(json.loads(v)) for v in sorted(seen)) or "not recorded"
  lines = [f"# {module.TITLE}", "", f"`{command}`: {timing}.", "", f"Libraries: {libs}.", ""]
  lines += ["| " + " | ".join(rep.columns) + " |", "|" + "---|" * len(rep.columns)]
  lines += ["| " + " | ".join(map(str, r)) + " |" for r in rep.rows]
  if rep.checks:
    lines += ["", "Claims (paired over seeds; beyond noise: one-sided t-test at 95%):", ""]
    lines += [f"- {c.claim}: **{c.mark}** ({c.detail})" for c in rep.checks]
  if rep.notes:
    lines += ["", rep.notes.strip()]
  lines += ["", "The paper:", "", module.PAPER.strip(), ""]
  with open(os.path.join(workdir, f"{table}.md"), "w") as f:
    f.write("\n".join(lines))
  out = dict(
    table=table,
    scale=scale,
    seeds=seeds,
    wall_s=wall,
    runs_total=len(jobs),
    runs_reused=skipped,
    versions=[json.loads(v) for v in sorted(seen)],
    columns=rep.columns,
    rows=rep.rows,
    checks=[dataclasses.asdict(c) for c in rep.checks],
    runs={
      name: [{k: r[k] for k in ("seed", "row", "wall_s")} for r in rs]
      for name, rs in by_arm.items()
    },
  )
  with open(os.path.join(workdir, f"{table}.json"), "w") as f:
    json.dump(out, f, indent=1)
  fig = plt.figure(figsize=(10, 4.5))
  rep.plot(fig, res)
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, f"{table}.png"), dpi=120)
  plt.close(fig)
  print("\n".join(lines[4:]), flush=True)
  print(f"Wrote {os.path.join(workdir, table)}.md, .json and .png", flush=True)
  return out


_SCALE = flags.DEFINE_enum(
  "scale",
  "tiny",
  SCALES,
  "tiny / small: synthetic, CPU (small: qat, kd, deep-compression); full: real data.",
)
_SEEDS = flags.DEFINE_integer("seeds", None, "Seeds per arm (default: tiny 3, small 5, else 1).")
_WORKERS = flags.DEFINE_integer("workers", None, "Parallel runs (default: CPU cores; full: 1).")
_ONLY = flags.DEFINE_list("only", None, "Run only these arms (and what they need).")


def main(argv):
  if len(argv) != 2:
    raise app.UsageError(f"Name one table: {', '.join(TABLES)} (got {argv[1:]}).")
  names = TABLES if argv[1] == "all" else [argv[1]]
  for name in names:
    table_module(name)  # an unknown name fails before anything runs
  verbose = flags.FLAGS.verbose  # experiments.train's flag
  progress.quiet_libraries(verbose)
  try:
    for name in names:
      run(
        name, flags.FLAGS.workdir, _SCALE.value, _SEEDS.value, _WORKERS.value, _ONLY.value, verbose
      )
  except parallel.Preempted as e:  # the runs saved where they were: rerun the command to go on
    print(f"{e} Finished runs are kept; the same command resumes the rest.", flush=True)
    sys.exit(143)


if __name__ == "__main__":
  flags.mark_flags_as_required(["workdir"])
  app.run(main)
