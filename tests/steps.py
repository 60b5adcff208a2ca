"""Running the first steps of a config's experiment, shared by the sharded-vs-one-device tests."""

from experiments import experiment


def run_steps(c, steps: int = 3, devices=None):
  """Losses of the first `steps` train steps, the methods prepared as in the train loop (the
  teacher loaded and the student initialized from it when the config distills, calibration
  when static quantization ranges need it), the final state and the experiment."""
  exp = experiment.build(c, devices=devices)
  state, shardings = exp.init_state()
  run = experiment.Run(exp, "", shardings, devices)
  for m in exp.methods:
    m.setup(run)
  for m in exp.methods:
    state = m.prepare(run, state, fresh=True)
  train_step, _ = run.jit_steps()
  losses = []
  for s in range(steps):
    state, metrics = train_step(state, exp.batch(s), run.frozen)
    losses.append(float(metrics["loss"]))
  return losses, state, exp
