"""Task scores for fine-tuned models: SQuAD v1.1, entity-level NER and the GLUE tasks.

Each follows the reference definition it names, in NumPy and the standard library only:

- SQuAD v1.1: the official `evaluate-v1.1.py` (Rajpurkar et al., 2016), as run under Python 3.
  `squad_scores` returns percentages, as the script prints them.
- NER: seqeval's default (conlleval-style, non-strict) entity chunking and micro-averaged
  precision / recall / F1 (`seqeval.metrics.classification_report`), for IOB1 and IOB2 tags.
  Fractions in [0, 1], as seqeval returns them.
- GLUE: the metric of each task as the GLUE benchmark (Wang et al., 2019) and Hugging Face's
  `evaluate` "glue" metric define it (sklearn's `matthews_corrcoef` and `f1_score`, scipy's
  `pearsonr` and `spearmanr`). Fractions in [0, 1], as `evaluate` returns them.
"""

import collections
import re
import string
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
from absl import logging

# SQuAD v1.1 ----------------------------------------------------------------------------------

_PUNCTUATION = frozenset(string.punctuation)  # ASCII only: "¿", "—", "“" stay, as in the script
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(s: str) -> str:
  """Lower case, drop ASCII punctuation, drop the articles a/an/the, collapse whitespace.

  The official script's `normalize_answer`, in its order. Under Python 3 `\\b` and `split()` are
  Unicode-aware ("éthe" keeps its "the"); the script was written for Python 2, whose ASCII `\\b`
  differs only for articles next to non-ASCII letters or digits.
  """
  s = "".join(ch for ch in s.lower() if ch not in _PUNCTUATION)
  return " ".join(_ARTICLES.sub(" ", s).split())


def _f1_one(prediction: str, ground_truth: str) -> float:
  """The script's `f1_score`: F1 of the bag-of-tokens overlap (a token counts as often as it is
  in both). No common token -> 0, which includes an empty prediction or answer, and both empty:
  v1.1 gives F1 0 (but exact match 1) for "" vs "" (v2.0's script gives 1)."""
  pred_tokens = normalize_answer(prediction).split()
  truth_tokens = normalize_answer(ground_truth).split()
  num_same = sum((collections.Counter(pred_tokens) & collections.Counter(truth_tokens)).values())
  if num_same == 0:
    return 0.0
  precision = num_same / len(pred_tokens)
  recall = num_same / len(truth_tokens)
  return 2 * precision * recall / (precision + recall)


def _max_over(metric, prediction: str, ground_truths: Sequence[str]) -> float:
  if isinstance(ground_truths, str):
    raise TypeError("ground_truths is a list of answers, not one string")
  if not ground_truths:
    raise ValueError("no ground-truth answer to compare with")  # the script's max([]) fails too
  return max(metric(prediction, truth) for truth in ground_truths)


def exact_match(prediction: str, ground_truths: Sequence[str]) -> float:
  """1.0 when the normalized prediction equals some normalized answer, else 0.0."""
  return _max_over(
    lambda p, t: float(normalize_answer(p) == normalize_answer(t)), prediction, ground_truths
  )


def f1(prediction: str, ground_truths: Sequence[str]) -> float:
  """Token-level F1 with the best-matching answer (the script's metric_max_over_ground_truths)."""
  return _max_over(_f1_one, prediction, ground_truths)


def squad_references(dataset: Iterable[Mapping]) -> dict[str, list[str]]:
  """{question id: [answer texts]} from the official file's "data" list (articles)."""
  return {
    qa["id"]: [answer["text"] for answer in qa["answers"]]
    for article in dataset
    for paragraph in article["paragraphs"]
    for qa in paragraph["qas"]
  }


def squad_scores(
  predictions: Mapping[str, str], references: Mapping[str, Sequence[str]]
) -> dict[str, float]:
  """{"exact_match", "f1"} in percent over the questions of `references`, and "unanswered".

  As the script's `evaluate`: a question with no prediction scores 0 (it is counted in
  "unanswered" and logged); predictions for ids not in `references` are ignored.
  """
  if not references:
    raise ValueError("no questions in references")
  em = total_f1 = 0.0
  missing = []
  for qid, ground_truths in references.items():
    if qid not in predictions:
      missing.append(qid)
      continue
    em += exact_match(predictions[qid], ground_truths)
    total_f1 += f1(predictions[qid], ground_truths)
  if missing:
    logging.warning(
      "%d of %d questions unanswered, scored 0 (e.g. %s)",
      len(missing),
      len(references),
      ", ".join(missing[:5]),
    )
  n = len(references)
  return {"exact_match": 100.0 * em / n, "f1": 100.0 * total_f1 / n, "unanswered": len(missing)}


# NER -----------------------------------------------------------------------------------------


def _split_tag(tag: str) -> tuple[str, str]:
  if tag == "O":
    return "O", ""
  prefix, _, type_ = tag.partition("-")
  if prefix not in ("B", "I") or not type_:
    raise ValueError(f"{tag!r} is not an IOB tag: 'O', 'B-TYPE' or 'I-TYPE'")
  return prefix, type_


def entities(tags: Sequence[str]) -> set[tuple[str, int, int]]:
  """The entities of one sentence's tags, as (type, start, end), `end` inclusive as in seqeval.

  seqeval's default chunking (`get_entities`) restricted to B/I/O: an entity ends before "O",
  before "B-", and where the type changes ("B-PER I-LOC" is PER then LOC); one starts at every
  "B-" and at every "I-" that does not continue an entity of its type ("O I-PER", "I-PER" first,
  "B-PER I-LOC"). So IOB1 tagging, whose entities open with "I-", chunks as intended too, and an
  IOB2 sequence with a stray "I-" is read leniently, as seqeval's default mode (not its strict
  mode) does. E-/S- (IOBES) tags are rejected rather than chunked.
  """
  found = set()
  prev_prefix, prev_type, start = "O", "", 0
  for i, tag in enumerate([*tags, "O"]):
    prefix, type_ = _split_tag(tag)
    if prev_prefix != "O" and (prefix != "I" or type_ != prev_type):
      found.add((prev_type, start, i - 1))
    if prefix == "B" or (prefix == "I" and (prev_prefix == "O" or type_ != prev_type)):
      start = i
    prev_prefix, prev_type = prefix, type_
  return found


def _prf(tp: int, n_pred: int, n_true: int) -> dict[str, float]:
  """Precision, recall and F1 as seqeval's default (zero_division="warn"): 0 for 0 / 0."""
  precision = tp / n_pred if n_pred else 0.0
  recall = tp / n_true if n_true else 0.0
  f = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
  return {"precision": precision, "recall": recall, "f1": f}


def ner_scores(
  true_seqs: Sequence[Sequence[str]], pred_seqs: Sequence[Sequence[str]]
) -> dict[str, object]:
  """Micro-averaged entity-level {"precision", "recall", "f1"} over all sentences, and
  "per_type": {type: {"precision", "recall", "f1", "support"}} (support: true entities).

  A predicted entity is correct when a true one in the same sentence has its type, start and end
  (seqeval's default `precision_score` / `recall_score` / `f1_score`, average="micro"). With no
  entity predicted (or none true) precision (recall) is 0, as seqeval's zero_division default.
  """
  if len(true_seqs) != len(pred_seqs):
    raise ValueError(f"{len(true_seqs)} true sentences but {len(pred_seqs)} predicted")
  counts = collections.defaultdict(lambda: [0, 0, 0])  # type -> [tp, predicted, true]
  for n, (true_tags, pred_tags) in enumerate(zip(true_seqs, pred_seqs)):
    if isinstance(true_tags, str) or isinstance(pred_tags, str):
      raise TypeError("true_seqs and pred_seqs are lists of sentences, each a list of tags")
    if len(true_tags) != len(pred_tags):
      raise ValueError(f"sentence {n}: {len(true_tags)} true tags but {len(pred_tags)} predicted")
    true, pred = entities(true_tags), entities(pred_tags)
    for type_, *_ in true & pred:
      counts[type_][0] += 1
    for type_, *_ in pred:
      counts[type_][1] += 1
    for type_, *_ in true:
      counts[type_][2] += 1
  tp, n_pred, n_true = (sum(c[k] for c in counts.values()) for k in range(3))
  per_type = {t: {**_prf(*counts[t]), "support": counts[t][2]} for t in sorted(counts)}
  return {**_prf(tp, n_pred, n_true), "per_type": per_type}


# GLUE ----------------------------------------------------------------------------------------


def _pair(predictions, labels, dtype=None) -> tuple[np.ndarray, np.ndarray]:
  p, y = np.asarray(predictions, dtype), np.asarray(labels, dtype)
  if p.ndim != 1 or p.shape != y.shape or not p.size:
    raise ValueError(
      f"predictions {p.shape} and labels {y.shape}: expected two equal non-empty 1-D arrays"
      " (class ids, not logits)"
    )
  return p, y


def accuracy(predictions, labels) -> float:
  p, y = _pair(predictions, labels)
  return float(np.mean(p == y))


def binary_f1(predictions, labels) -> float:
  """F1 of the positive class 1 (sklearn's `f1_score`, average="binary", pos_label=1):
  2 tp / (2 tp + fp + fn); 0 when there is no positive label or prediction at all."""
  p, y = _pair(predictions, labels)
  if not np.isin(p, (0, 1)).all() or not np.isin(y, (0, 1)).all():
    raise ValueError("binary F1 needs predictions and labels in {0, 1}")
  tp = np.sum((p == 1) & (y == 1))
  wrong = np.sum(p != y)  # fp + fn
  return float(2 * tp / (2 * tp + wrong)) if tp + wrong else 0.0


def matthews_correlation(predictions, labels) -> float:
  """Matthews correlation coefficient, in sklearn's multiclass form (Gorodkin's R_K), which is
  (tp tn - fp fn) / sqrt((tp + fp)(tp + fn)(tn + fp)(tn + fn)) for two classes. 0 when it is
  undefined (all predictions, or all labels, one class), as sklearn's `matthews_corrcoef`."""
  p, y = _pair(predictions, labels)
  classes, idx = np.unique(np.concatenate([y, p]), return_inverse=True)
  confusion = np.zeros((len(classes), len(classes)), np.float64)  # [true, predicted]
  np.add.at(confusion, (idx[: len(y)], idx[len(y) :]), 1)
  t_sum, p_sum = confusion.sum(1), confusion.sum(0)
  n = float(len(y))
  cov_tp = np.trace(confusion) * n - t_sum @ p_sum
  cov_pp = n * n - p_sum @ p_sum
  cov_tt = n * n - t_sum @ t_sum
  if cov_pp * cov_tt == 0:
    return 0.0
  return float(cov_tp / np.sqrt(cov_pp * cov_tt))


def pearson(x, y) -> float:
  """Pearson's r, as scipy's `pearsonr` computes it; NaN when an input is constant or holds a
  NaN / inf (scipy returns NaN there too)."""
  x, y = _pair(x, y, np.float64)
  if len(x) < 2:
    raise ValueError("correlation needs at least 2 pairs")
  if not (np.isfinite(x).all() and np.isfinite(y).all()) or (x == x[0]).all() or (y == y[0]).all():
    return float("nan")
  xm, ym = x - x.mean(), y - y.mean()
  r = (xm / np.linalg.norm(xm)) @ (ym / np.linalg.norm(ym))
  return float(np.clip(r, -1.0, 1.0))


def _average_ranks(x: np.ndarray) -> np.ndarray:
  """1-based ranks, ties given the mean of the ranks they span (scipy's rankdata "average")."""
  order = np.argsort(x, kind="stable")
  xs = x[order]
  first = np.concatenate([[True], xs[1:] != xs[:-1]])
  starts = np.flatnonzero(first)
  ends = np.append(starts[1:], len(x))  # exclusive
  ranks = np.empty(len(x), np.float64)
  ranks[order] = ((starts + 1 + ends) / 2)[np.cumsum(first) - 1]
  return ranks


def spearman(x, y) -> float:
  """Spearman's rho: Pearson's r of the average ranks (scipy's `spearmanr`); NaN as `pearson`."""
  x, y = _pair(x, y, np.float64)
  if not (np.isfinite(x).all() and np.isfinite(y).all()):
    return float("nan")
  return pearson(_average_ranks(x), _average_ranks(y))


def _accuracy_only(p, y):
  return {"accuracy": accuracy(p, y)}


_GLUE = {
  "cola": lambda p, y: {"matthews_correlation": matthews_correlation(p, y)},
  "stsb": lambda p, y: {"pearson": pearson(p, y), "spearmanr": spearman(p, y)},
  "mrpc": lambda p, y: {"accuracy": accuracy(p, y), "f1": binary_f1(p, y)},
  "qqp": lambda p, y: {"accuracy": accuracy(p, y), "f1": binary_f1(p, y)},
  **dict.fromkeys(
    ["sst2", "mnli", "mnli_matched", "mnli_mismatched", "qnli", "rte", "wnli"], _accuracy_only
  ),
}
GLUE_TASKS = tuple(_GLUE)


def glue_scores(task: str, predictions, labels) -> dict[str, float]:
  """The GLUE metrics of `task` (keys as `evaluate.load("glue", task)`): class ids for the
  classification tasks, real-valued scores for stsb. MNLI: one split per call, or `mnli_scores`."""
  if task not in _GLUE:
    raise ValueError(f"unknown GLUE task {task!r}; known: {', '.join(GLUE_TASKS)}")
  return _GLUE[task](predictions, labels)


def mnli_scores(*, matched, mismatched) -> dict[str, float]:
  """{"accuracy_matched", "accuracy_mismatched"} from (predictions, labels) of each dev split."""
  return {
    "accuracy_matched": accuracy(*matched),
    "accuracy_mismatched": accuracy(*mismatched),
  }
