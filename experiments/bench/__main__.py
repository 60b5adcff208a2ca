"""`python -m experiments.bench`: the train-step benchmark (experiments/bench/step.py)."""

from absl import app, flags

from experiments.bench import step

if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(step.main)
