"""Trimformer's train step against nanodo's (google-deepmind/nanodo): one CPU device, one shape.

    git clone https://github.com/google-deepmind/nanodo /tmp/nanodo
    PYTHONPATH=/tmp/nanodo python -m experiments.bench.nanodo --threads 1 --pairs 200
    PYTHONPATH=/tmp/nanodo python -m experiments.bench.nanodo --vocab 32100 --pairs 30 --cost

The shape: D=128, H=4, 2 layers, F=512, sequences of 128, batch 16, float32, AdamW, learned
positions, tied embeddings, and one vocabulary for both: 256 by default (nanodo's model test;
the synthetic language's byte ids fit), or `--vocab 32100`, the SentencePiece vocabulary its
default config trains with (then the output layer is most of the step). Each side runs the step
its own train loop jits. Trimformer's is `experiments.train`'s (experiment.build -> init_state ->
Run.jit_steps on `lm.py:tiny` with those overrides: clipping at 1.0, warmup + cosine, the
non-finite skip, the state donated). nanodo's is train.py's `_train_step` with its default
`opt` config (AdamW, warmup + cosine, no clipping) and its per-step metrics.get_metrics, the
state donated; "nanodo-bare" is that step without get_metrics. nanodo's train.py and loss.py
import grain and sentencepiece (through data.py), so its step is rebuilt here from its
model.py, optimizer.py and metrics.py the way train.py builds it; its loss is loss.py's.

Timing: the arms alternate, A B C A B C ..., each call blocked with `jax.block_until_ready`,
so a load that comes and goes (other jobs on the machine) hits every arm alike; the medians and
their ratios are reported. The process sees one CPU device (set before jax starts) and
`--threads` cores (sched_setaffinity: XLA's CPU thread pool is as large as the cores the
process may use). `--cost` adds XLA's cost analysis (FLOPs, bytes accessed) of each compiled
step, `--hlo DIR` writes their StableHLO and optimized HLO. Without nanodo importable the
script says so and exits 0.
"""

import argparse
from collections.abc import Callable
import dataclasses
import functools
import json
import os
import re
import statistics
import sys
import time
import types

ARMS = ("trimformer", "nanodo", "nanodo-bare")


def pin(threads: int) -> int:
  """One CPU device and `threads` cores (0: all this process may use), before jax starts.
  Returns the number of cores the process may use."""
  flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", os.environ.get("XLA_FLAGS", ""))
  os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count=1".strip()
  os.environ["JAX_PLATFORMS"] = "cpu"
  if threads:
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:threads])
  return len(os.sched_getaffinity(0))


@dataclasses.dataclass
class Arm:
  step: Callable[[], dict]  # one step, blocked; returns its metrics
  lower: Callable[[], object]  # the step's jax.stages.Lowered
  loss: str  # the metric that holds the loss


def trimformer_config(vocab: int, seq_len: int, batch: int, **overrides):
  """`lm.py:tiny` at the shape, and `overrides` ({"optim.grad_clip": 0.0, ...})."""
  from experiments.configs import lm

  c = lm.get_config("tiny")
  c.model.update(vocab_size=vocab, d_model=128, n_heads=4, n_layers=2, d_ff=512, max_len=seq_len)
  c.train.update(seq_len=seq_len, batch_size=batch)
  c.dtype = "float32"
  for key, value in overrides.items():
    section, name = key.rsplit(".", 1)
    c[section][name] = value
  return c


def trimformer_arm(config) -> tuple[Arm, object]:
  """(experiments.train's step on the config's first batch, that batch's inputs BxL)."""
  import jax

  from experiments import experiment

  exp = experiment.build(config, devices=jax.devices()[:1])
  state, shardings = exp.init_state()
  train_step, _ = experiment.Run(exp, "", shardings).jit_steps()
  batch = exp.batch(0)
  held = {"state": state}

  def step():
    held["state"], metrics = jax.block_until_ready(train_step(held["state"], batch, {}))
    return metrics

  return Arm(step, lambda: train_step.lower(held["state"], batch, {}), "loss"), batch["inputs"]


def nanodo_arm(inputs_BxL, vocab: int, metrics: bool = True) -> Arm:
  """nanodo's train step (train.py's `_train_step`, jitted as its Trainer does) on the tokens
  `inputs_BxL`; `metrics=False`: without metrics.get_metrics."""
  import flax.linen as nn
  from flax.training.train_state import TrainState
  import jax
  import jax.numpy as jnp
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  from nanodo import metrics as metrics_lib, model, optimizer
  from nanodo.configs import default
  import optax

  c = default.get_config()
  B, L = inputs_BxL.shape
  c.batch_size = B
  c.model.update(D=128, H=4, L=L, N=2, F=512, dtype="float32")
  module = model.TransformerDo(model.DoConfig(**c.model, V=vocab))
  mesh = Mesh(jax.devices()[:1], ("data",))

  def loss_fn(params, in_BxL):  # loss.get_default_loss_fn, with data.get_in_out (PAD_ID 0)
    y_BxL = jnp.pad(in_BxL[:, 1:], ((0, 0), (0, 1)), mode="constant", constant_values=0)
    weights_BxL = jnp.where(y_BxL != 0, 1, 0).astype(jnp.float32)
    mutable = ("intermediate_acts",) if c.get("log_internal_metrics", False) else ()
    logits_BxLxV, state = module.apply({"params": params}, in_BxL, mutable=mutable)
    losses_BxL = optax.losses.softmax_cross_entropy_with_integer_labels(logits_BxLxV, y_BxL)
    ntokens = weights_BxL.sum()
    mean_loss = jnp.sum(losses_BxL * weights_BxL) / ntokens
    return mean_loss, dict(ntokens=ntokens, state=state, log_perplexity=mean_loss)

  def train_step(state, in_BxL):  # train._train_step
    in_BxL = jax.lax.with_sharding_constraint(in_BxL, NamedSharding(mesh, P("data")))
    grad_fn = jax.value_and_grad(functools.partial(loss_fn, in_BxL=in_BxL), has_aux=True)
    (loss, aux_data), grads = grad_fn(state.params)
    updates, new_opt_state = state.tx.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    new_state = state.replace(
      step=state.opt_state.gradient_step + 1, params=new_params, opt_state=new_opt_state
    )
    if not metrics:
      return new_state, {"train_loss": loss}
    aux_data = types.SimpleNamespace(**aux_data)  # loss.LossAuxData
    return new_state, metrics_lib.get_metrics(aux_data, c, loss, state, grads, updates)

  def init(rng, inputs):  # train._init_train_state
    params = module.init(rng, inputs)
    return TrainState.create(
      apply_fn=module.apply, params=params["params"], tx=optimizer.get_optimizer(c.opt)
    )

  inputs = jax.ShapeDtypeStruct(shape=(1, L), dtype=jnp.int32)
  rng = jax.random.PRNGKey(c.seed)
  shardings = nn.get_sharding(jax.eval_shape(init, rng, inputs), mesh)
  state = jax.jit(init, out_shardings=shardings)(rng, inputs)
  # Trainer.step_fn. nanodo donates the batch too; no output can reuse an int32 BxL buffer, so
  # that only deletes it. Here the one batch is fed every step, as trimformer's is.
  step_fn = jax.jit(
    train_step,
    in_shardings=(shardings, NamedSharding(mesh, P())),
    out_shardings=(shardings, NamedSharding(mesh, P())),
    donate_argnames=("state",),
  )
  batch = jax.device_put(jnp.asarray(inputs_BxL, jnp.int32), NamedSharding(mesh, P()))
  held = {"state": state}

  def step():
    held["state"], out = jax.block_until_ready(step_fn(held["state"], batch))
    return out

  # Its init makes TrainState.step a weakly typed int, its step an int32: the second call
  # compiles again (in nanodo's own loop too). Both compile here.
  step()
  step()
  return Arm(step, lambda: step_fn.lower(held["state"], batch), "train_loss")


def interleaved(steps: dict, rounds: int, warmup: int = 3) -> tuple[dict, dict]:
  """({name: [seconds per call]}, {name: the last call's output}): `warmup` untimed rounds,
  then `rounds` rounds of one blocked call of every step in turn."""
  last = {}
  for _ in range(warmup):
    for name, step in steps.items():
      last[name] = step()
  times = {name: [] for name in steps}
  for _ in range(rounds):
    for name, step in steps.items():
      start = time.perf_counter()
      last[name] = step()
      times[name].append(time.perf_counter() - start)
  return times, last


def cost(arm: Arm, hlo_dir: str = "", name: str = "") -> dict:
  """XLA's cost analysis of the arm's compiled step; its StableHLO and HLO into `hlo_dir`."""
  lowered = arm.lower()
  compiled = lowered.compile()
  if hlo_dir:
    os.makedirs(hlo_dir, exist_ok=True)
    for suffix, text in (("stablehlo", lowered.as_text()), ("hlo", compiled.as_text())):
      with open(os.path.join(hlo_dir, f"{name}.{suffix}.txt"), "w") as f:
        f.write(text)
  analysis = compiled.cost_analysis() or {}
  return {k: analysis.get(k) for k in ("flops", "bytes accessed", "transcendentals")}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--pairs", type=int, default=200, help="timed rounds (one call per arm)")
  parser.add_argument("--warmup", type=int, default=3, help="untimed rounds after compiling")
  parser.add_argument("--threads", type=int, default=0, help="cores to use (0: all allowed)")
  parser.add_argument("--vocab", type=int, default=256)
  parser.add_argument("--seq_len", type=int, default=128)
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--cost", action="store_true", help="XLA's cost analysis of each step")
  parser.add_argument("--hlo", default="", help="write each step's StableHLO and HLO here")
  parser.add_argument("--out", default="", help="also write the JSON result here")
  args = parser.parse_args(argv)
  threads = pin(args.threads)
  try:
    import nanodo.model  # noqa: F401
  except ImportError as e:
    print(
      f"SKIP: nanodo is not importable ({e}). It is not on the package index: clone "
      "https://github.com/google-deepmind/nanodo and put the clone on PYTHONPATH."
    )
    return 0
  import jax

  from experiments import metrics as metrics_lib

  ours, inputs = trimformer_arm(trimformer_config(args.vocab, args.seq_len, args.batch))
  arms = {
    "trimformer": ours,
    "nanodo": nanodo_arm(inputs, args.vocab),
    "nanodo-bare": nanodo_arm(inputs, args.vocab, metrics=False),
  }
  times, last = interleaved({k: a.step for k, a in arms.items()}, args.pairs, args.warmup)
  median = {k: statistics.median(v) for k, v in times.items()}
  result = {
    "shape": dict(D=128, H=4, layers=2, F=512, vocab=args.vocab, seq_len=args.seq_len),
    "batch": args.batch,
    "dtype": "float32",
    "devices": [str(d) for d in jax.devices()],
    "threads": threads,
    "pairs": args.pairs,
    "timing": "interleaved rounds, each call blocked with jax.block_until_ready; medians",
    "median_s": median,
    "ratio": {k: median["trimformer"] / median[k] for k in ARMS[1:]},
    "final_loss": {k: float(last[k][a.loss]) for k, a in arms.items()},
    "times_s": times,
    "versions": metrics_lib.versions(),
  }
  if args.cost or args.hlo:
    result["cost"] = {k: cost(a, args.hlo, k) for k, a in arms.items()}
  print(
    f"1 CPU device ({jax.devices()[0].device_kind}), {threads} thread(s); vocab {args.vocab}, "
    f"batch {args.batch} x {args.seq_len}; {args.pairs} interleaved rounds after "
    f"{args.warmup} warm-up"
  )
  for name, t in times.items():
    q = statistics.quantiles(t, n=4) if len(t) > 1 else [t[0]] * 3
    line = (
      f"{name:12s} median {median[name] * 1e3:8.2f} ms (quartiles {q[0] * 1e3:.2f}-"
      f"{q[2] * 1e3:.2f}), loss {result['final_loss'][name]:.4f}"
    )
    c = result.get("cost", {}).get(name)
    if c:
      line += f"; XLA: {c['flops']:.4g} FLOPs, {c['bytes accessed']:.4g} bytes"
    print(line)
  for name, r in result["ratio"].items():
    print(f"ratio trimformer / {name}: {r:.3f}")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(result, f, indent=2)
    print(f"wrote {os.path.abspath(args.out)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
