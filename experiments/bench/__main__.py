"""`python -m experiments.bench`: the train-step benchmark (experiments/bench/step.py).

python -m experiments.bench --config experiments/configs/lm.py:tiny --steps 20 --out b.json
"""

import json
import os

from absl import app, flags
import jax

from experiments.bench import step

# --config (with its --config.x=y overrides) is defined once, by experiments.train.
_STEPS = flags.DEFINE_integer("steps", 20, "Timed steps (after the warm-up).")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.")
_OUT = flags.DEFINE_string("out", "", "Also write the JSON result to this path.")


def main(argv):
  del argv
  result = step.run(flags.FLAGS.config, _STEPS.value, _WARMUP.value)
  if jax.process_index() == 0:
    print(step.summary(result))
    if _OUT.value:
      with open(_OUT.value, "w") as f:
        json.dump(result, f, indent=2)
      print(f"wrote {os.path.abspath(_OUT.value)}")


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
