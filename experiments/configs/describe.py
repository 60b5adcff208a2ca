"""Every key of a run config with its value and what it means (`--config_help`).

The meanings are the comments next to the keys where they are defined: configs/common.py,
each method's `section()` (experiments/methods) and models.ModelConfig. Nothing is written
twice: a key's comment in those files is its help.
"""

import ast
import inspect
import io
import re
import tokenize

import ml_collections

import models
from experiments import methods
from experiments.configs import common


def _comments(source: str) -> tuple[dict, dict]:
  """({line: trailing comment}, {line: comment of a comment-only line}) of `source`."""
  trailing, alone = {}, {}
  code_lines = set()
  for tok in tokenize.generate_tokens(io.StringIO(source).readline):
    if tok.type == tokenize.COMMENT:
      text = tok.string.lstrip("#").strip()
      (trailing if tok.start[0] in code_lines else alone)[tok.start[0]] = text
    elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT):
      code_lines.update(range(tok.start[0], tok.end[0] + 1))
  return trailing, alone


def _block(alone: dict, line: int, step: int) -> list[str]:
  """The comment-only lines next to `line` (step -1: above it, +1: below it)."""
  out, i = [], line + step
  while i in alone:
    out.append(alone[i])
    i += step
  return out[::-1] if step < 0 else out


def _path(node) -> str | None:
  """`c.a.b` -> "a.b" (the dotted key under whatever variable holds the config)."""
  parts = []
  while isinstance(node, ast.Attribute):
    parts.append(node.attr)
    node = node.value
  return ".".join(parts[::-1]) if isinstance(node, ast.Name) and parts else None


def _keywords(node) -> list[ast.keyword]:
  """The keywords of `dict(...)`, possibly inside `ConfigDict(dict(...))`."""
  if not isinstance(node, ast.Call):
    return []
  if node.args and not node.keywords:
    return _keywords(node.args[0])
  return [k for k in node.keywords if k.arg]


def _split(text: str, names) -> dict[str, str]:
  """Prose about several keys ("a > 0: ... b: ...") cut where a sentence starts with a name."""
  pattern = r"(?:^|(?<=[.;] ))(" + "|".join(sorted(map(re.escape, names), key=len)[::-1]) + r")\b"
  starts = [(m.start(), m.group(1)) for m in re.finditer(pattern, text)]
  out = {"": text[: starts[0][0]].strip() if starts else text}
  for (a, name), (b, _) in zip(starts, starts[1:] + [(len(text), "")]):
    out[name] = (out.get(name, "") + " " + text[a:b].strip()).strip()
  return out


def _section_docs(source: str, prefix: str = "") -> dict[str, str]:
  """{dotted key: comment} for the assignments and `dict(...)` keywords in `source`."""
  trailing, alone = _comments(source)
  docs, claimed = {}, set()

  def keywords(path, kws, last_line):
    starts = {}
    for k in kws:
      starts.setdefault(k.lineno, []).append(k)
    for line, ks in starts.items():
      if len(ks) == 1 and line in trailing:
        docs[f"{path}{ks[0].arg}"] = trailing[line]
        claimed.add(line)
    for k in kws:
      inner = _keywords(k.value)
      if inner:
        keywords(f"{path}{k.arg}.", inner, k.value.end_lineno)
    # A comment after the closing bracket (with the comment lines right below it when they
    # start with one of these keys) is prose about several of them.
    if last_line in trailing and last_line not in claimed:
      names = [k.arg for k in kws]
      below = _block(alone, last_line, 1)
      if below and not _split(" ".join(below), names)[""]:
        claimed.update(range(last_line + 1, last_line + 1 + len(below)))
      else:
        below = []
      for name, part in _split(" ".join([trailing[last_line], *below]), names).items():
        key = path + name if name else path.rstrip(".")
        part = re.sub(rf"^{re.escape(name)}: ", "", part) if name else part
        if part and key:
          docs[key] = f"{docs[key]} {part}" if key in docs else part

  tree = ast.parse(source)
  for node in ast.walk(tree):
    if isinstance(node, ast.Assign) and len(node.targets) == 1:
      path = _path(node.targets[0])
      if path is None:
        continue
      key = prefix + path
      above = _block(alone, node.lineno, -1)
      if above and node.lineno - 1 not in claimed:
        docs[key] = " ".join(above)
      kws = _keywords(node.value)
      if kws:
        keywords(key + ".", kws, node.end_lineno)
      elif node.lineno in trailing:
        docs[key] = trailing[node.lineno]
    elif isinstance(node, ast.Return) and _keywords(node.value):  # a method's section()
      keywords(prefix, _keywords(node.value), node.end_lineno)
    elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
      if node.func.attr == "update" and _path(node.func.value):
        keywords(prefix + _path(node.func.value) + ".", _keywords(node), node.end_lineno)
    elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):  # dataclass
      above = " ".join(_block(alone, node.lineno, -1))
      text = "; ".join(filter(None, [trailing.get(node.lineno), above]))
      if text:
        docs[prefix + node.target.id] = text
  return docs


def _method_docs() -> dict[str, str]:
  docs = {}
  for m in methods.registry():
    docs.update(_section_docs(_dedent(inspect.getsource(m.section)), m.name + "."))
  return docs


def _dedent(source: str) -> str:
  lines = source.splitlines()
  indent = min(len(s) - len(s.lstrip()) for s in lines if s.strip())
  return "\n".join(s[indent:] for s in lines)


def key_docs() -> dict[str, str]:
  """{dotted key: its comment} of every key defined with one."""
  docs = _section_docs(_dedent(inspect.getsource(models.ModelConfig)), "model.")
  docs.update(_method_docs())
  docs.update(_section_docs(inspect.getsource(common)))
  return docs


def _see(path: str, doc_path: str, name: str, siblings, docs) -> str:
  """For a key without a comment: "see <sibling>" when the comment of a sibling with a word of
  its name in common names it (max_nonfinite: see nonfinite)."""
  words = set(name.split("_"))
  if len(words) < 2:  # `steps` is also a word
    return ""
  for s in siblings:
    doc = docs.get(doc_path + s, "")
    if s != name and words & set(s.split("_")) and re.search(rf"\b{re.escape(name)}\b", doc):
      return f"see {path}{s}"
  return ""


def describe(config: ml_collections.ConfigDict, name: str = "") -> str:
  """Every key of `config` (and of its run sections: pretrain, teacher) as `key = value  #
  comment`, grouped by section, each section's own comment above it."""
  docs = key_docs()
  lines = [
    f"The keys of {name or 'the config'} with their values there (set one with "
    "--config.<key>=<value>):",
    "",
  ]

  def walk(node, path, doc_path):
    scalars = [k for k, v in node.items() if not isinstance(v, ml_collections.ConfigDict)]
    for k in scalars:  # then the sections
      doc = docs.get(doc_path + k) or _see(path, doc_path, k, scalars, docs)
      lines.append(f"{path}{k} = {node[k]!r}" + (f"  # {doc}" if doc else ""))
    for k, v in node.items():
      if k not in scalars:
        head = docs.get(doc_path + k, "")
        lines.extend(["", f"[{path}{k}]" + (f"  # {head}" if head else "")])
        run = not doc_path and k in common.RUN_SECTIONS  # a whole run config: the same keys
        walk(v, f"{path}{k}.", "" if run else f"{doc_path}{k}.")

  walk(config, "", "")
  return "\n".join(lines)
