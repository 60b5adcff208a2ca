"""Running the first steps of a config's experiment, shared by the sharded-vs-one-device tests."""

from experiments import compression, experiment


def run_steps(c, steps: int = 3, devices=None):
  """Losses of the first `steps` train steps (after calibration when the config's static
  quantization ranges need it, and with the teacher loaded and the student initialized from
  it when the config distills, as in the train loop), the final state and the experiment."""
  exp = experiment.build(c, devices=devices)
  state, shardings = exp.init_state()
  frozen, teacher_shardings = (), None
  if exp.teacher is not None:
    teacher, teacher_shardings = exp.load_teacher()
    if exp.teacher.init_map:
      state["params"] = exp.init_from_teacher(state, shardings, teacher)
    frozen = (teacher,)
  if compression.needs_ranges(c):
    state = exp.calibrate(state, shardings)
  train_step, _ = exp.jit_steps(shardings, teacher_shardings)
  losses = []
  for s in range(steps):
    state, metrics = train_step(state, exp.batch(s), *frozen)
    losses.append(float(metrics["loss"]))
  return losses, state, exp
