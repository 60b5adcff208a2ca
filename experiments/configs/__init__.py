"""The experiments' config files (`--config experiments/configs/<file>.py:<arg>`)."""

import importlib.util


def check_overrides(argv: list[str], flag: str = "config"):
  """Refuses a `--config.a.b=value` override of a key the config file's config lacks, with the
  closest key, before absl parses the flags (ml_collections' config_flags refuses it too, but
  with a raw AttributeError traceback). Run it before `app.run`:

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
  if spec is None or not overrides:
    return
  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("_checked_config", path)
  if module_spec is None:
    return  # not a file: config_flags reports it
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  config = module.get_config(arg) if arg else module.get_config()
  keys = common.flat_keys(config)
  for key in overrides:
    if key not in keys:
      close = " or ".join(f"--{flag}.{k}" for k in common.closest(key, keys))
      hint = f" (did you mean {close}?)" if close else ""
      raise ValueError(f"Unknown config override --{flag}.{key}{hint}: {spec} has no such key.")
