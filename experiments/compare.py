"""Two or more runs of the same tables side by side: each claim's verdict in each, with the
libraries each ran with (e.g. the same command in a second environment).

    python -m experiments.compare runs/repro runs/repro-env2 --tables qat,kd,deep-compression

Reads `DIR/TABLE.json` (what experiments.reproduce writes) and prints one markdown table per
table: a row per claim, a column per directory, "yes" / "yes, within noise" / "no" (with the
paired t statistic where the claim has one).
"""

import argparse
import json
import os
import sys


def mark(check: dict) -> str:
  if not check["holds"]:
    return "no"
  return "yes" if check["beyond_noise"] in (True, None) else "yes, within noise"


def versions(table: dict) -> str:
  v = (table.get("versions") or [{}])[0]
  names = ("jax", "flax", "optax", "numpy")
  return ", ".join(f"{k} {v[k]}" for k in names if k in v) or "versions not recorded"


def compare(dirs: list[str], table: str) -> str:
  """The markdown comparison of `table` across `dirs`."""
  runs = []
  for d in dirs:
    path = os.path.join(d, f"{table}.json")
    try:
      with open(path) as f:
        runs.append(json.load(f))
    except FileNotFoundError:
      raise SystemExit(f"FATAL: {path}: no such table (run experiments.reproduce {table} first)")
  claims = list(dict.fromkeys(c["claim"] for r in runs for c in r["checks"]))
  head = [f"{d} ({r['scale']}, {r['seeds']} seeds; {versions(r)})" for d, r in zip(dirs, runs)]
  lines = [f"{table}:", "", "| claim | " + " | ".join(head) + " |"]
  lines.append("|---" * (len(dirs) + 1) + "|")
  for claim in claims:
    cells = []
    for r in runs:
      c = next((c for c in r["checks"] if c["claim"] == claim), None)
      if c is None:
        cells.append("-")
        continue
      t = c["detail"].rsplit("t=", 1)[1].split(")")[0] if "t=" in c["detail"] else ""
      cells.append(mark(c) + (f" (t={t})" if t else ""))
    lines.append(f"| {claim} | " + " | ".join(cells) + " |")
  held = [sum(mark(c) == "yes" for c in r["checks"]) for r in runs]
  lines += [
    "",
    "beyond noise: " + ", ".join(f"{h} of {len(r['checks'])}" for h, r in zip(held, runs)),
  ]
  return "\n".join(lines)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("dirs", nargs="+", help="the --workdir of each reproduce run")
  p.add_argument("--tables", default="qat,kd,deep-compression", help="comma-separated tables")
  args = p.parse_args(argv)
  out = [compare(args.dirs, t) for t in args.tables.split(",")]
  sys.stdout.write("\n\n".join(out) + "\n")


if __name__ == "__main__":
  main()
