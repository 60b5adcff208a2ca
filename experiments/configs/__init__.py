"""The experiments' config files (`--config experiments/configs/<file>.py:<arg>`)."""

import importlib.util
import os
import sys


def load(spec: str, flag: str = "config"):
  """The config of `--config path[:arg]`; a missing file (with the files beside it), a bad
  arg (an unknown preset) or a broken config file is one ValueError, not a traceback."""
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    folder = os.path.dirname(path) or "."
    if not os.path.isdir(folder):
      folder = os.path.dirname(os.path.abspath(__file__))
    files = sorted(
      f
      for f in os.listdir(folder)
      if f.endswith(".py") and "\ndef get_config" in open(os.path.join(folder, f)).read()
    )
    listing = ", ".join(os.path.join(os.path.relpath(folder), f) for f in files)
    raise ValueError(f"--{flag} {spec}: there is no file {path}. Config files: {listing}.")
  module_spec = importlib.util.spec_from_file_location("_checked_config", path)
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
    config = module.get_config(arg) if arg else module.get_config()
  except (ValueError, KeyError, TypeError) as e:
    raise ValueError(f"--{flag} {spec}: {e}") from None
  if not arg and "model" in config and "preset" in config.model:
    print(
      f"--{flag} {spec}: no ':<arg>' given, so {path}'s default: the "
      f"{config.model.preset!r} model preset ({path}:{config.model.preset}).",
      file=sys.stderr,
    )
  return config


def check_overrides(argv: list[str], flag: str = "config"):
  """Loads `--config path[:arg]` (see `load`) and refuses a `--config.a.b=value` override of a
  key that config lacks, with the closest key, before absl parses the flags (ml_collections'
  config_flags refuses them too, but with a raw traceback). Run it before `app.run`:

      try:
        configs.check_overrides(sys.argv)
      except ValueError as e:
        sys.exit(f"FATAL: {e}")
  """
  from experiments.configs import common

  spec, overrides, args = None, [], iter(argv[1:])
  for a in args:
    if a in (f"--{flag}", f"-{flag}"):
      spec = next(args, None)
    elif a.startswith((f"--{flag}=", f"-{flag}=")):
      spec = a.split("=", 1)[1]
    elif a.startswith((f"--{flag}.", f"--no{flag}.")):
      overrides.append(a.split("=", 1)[0].split(".", 1)[1])
  if spec is None:
    return
  config = load(spec, flag)
  keys = common.flat_keys(config)
  for key in overrides:
    if key not in keys:
      close = " or ".join(f"--{flag}.{k}" for k in common.closest(key, keys))
      hint = f" (did you mean {close}?)" if close else ""
      raise ValueError(f"Unknown config override --{flag}.{key}{hint}: {spec} has no such key.")
