"""experiments/scores.py against hand-computed values, the official SQuAD v1.1 script's functions
(re-typed below), and seqeval / scipy / sklearn where they are installed."""

import collections
import contextlib
import math
import re
import string
import warnings

import numpy as np
import pytest

from experiments import scores

# SQuAD v1.1 ----------------------------------------------------------------------------------


# The official evaluate-v1.1.py, re-typed verbatim (but for indentation).
def official_normalize_answer(s):
  def remove_articles(text):
    return re.sub(r"\b(a|an|the)\b", " ", text)

  def white_space_fix(text):
    return " ".join(text.split())

  def remove_punc(text):
    exclude = set(string.punctuation)
    return "".join(ch for ch in text if ch not in exclude)

  def lower(text):
    return text.lower()

  return white_space_fix(remove_articles(remove_punc(lower(s))))


def official_f1_score(prediction, ground_truth):
  prediction_tokens = official_normalize_answer(prediction).split()
  ground_truth_tokens = official_normalize_answer(ground_truth).split()
  common = collections.Counter(prediction_tokens) & collections.Counter(ground_truth_tokens)
  num_same = sum(common.values())
  if num_same == 0:
    return 0
  precision = 1.0 * num_same / len(prediction_tokens)
  recall = 1.0 * num_same / len(ground_truth_tokens)
  f1 = (2 * precision * recall) / (precision + recall)
  return f1


def official_exact_match_score(prediction, ground_truth):
  return official_normalize_answer(prediction) == official_normalize_answer(ground_truth)


def official_metric_max_over_ground_truths(metric_fn, prediction, ground_truths):
  scores_for_ground_truths = []
  for ground_truth in ground_truths:
    score = metric_fn(prediction, ground_truth)
    scores_for_ground_truths.append(score)
  return max(scores_for_ground_truths)


SQUAD_CASES = [  # (prediction, ground truths, exact match, F1) by hand
  ("The Eiffel Tower", ["eiffel tower"], 1.0, 1.0),  # article, case
  ("  Paris,   France. ", ["paris france"], 1.0, 1.0),  # punctuation, whitespace
  ("an apple a day", ["apple day"], 1.0, 1.0),
  ("theater", ["ater"], 0.0, 0.0),  # "the" only as a whole word
  ("Denver Broncos", ["Broncos", "Denver Broncos", "the Broncos"], 1.0, 1.0),  # max over golds
  ("Denver", ["Denver Broncos", "Carolina Panthers"], 0.0, 2 / 3),  # P 1, R 1/2
  ("in the year 1850", ["1850", "around 1850s"], 0.0, 0.5),  # P 1/3, R 1 -> 1/2
  ("", ["Denver"], 0.0, 0.0),  # empty prediction
  ("the", ["a"], 1.0, 0.0),  # both normalize to "": equal, but v1.1 F1 is 0 (no common token)
  ("new new york", ["new york"], 0.0, 0.8),  # Counter: "new" counts once; P 2/3, R 1
  ("new york new", ["new new york"], 0.0, 1.0),  # same bag of tokens, another order
  ("«Paris» — France", ["Paris France"], 0.0, 0.4),  # «, », — are not string.punctuation
  ("¿Qué?", ["qué"], 0.0, 0.0),  # "¿" stays: "¿qué" != "qué"
  ("Ünited   Státes", ["ünited státes"], 1.0, 1.0),  # lower() is Unicode
  ("Ü the", ["ü"], 1.0, 1.0),
]


@pytest.mark.parametrize("prediction,truths,em,f1", SQUAD_CASES)
def test_squad_cases(prediction, truths, em, f1):
  assert scores.exact_match(prediction, truths) == em
  assert scores.f1(prediction, truths) == pytest.approx(f1)
  official_em = official_metric_max_over_ground_truths(
    official_exact_match_score, prediction, truths
  )
  official_f1 = official_metric_max_over_ground_truths(official_f1_score, prediction, truths)
  assert scores.exact_match(prediction, truths) == float(official_em)
  assert scores.f1(prediction, truths) == official_f1


def test_normalize_answer_matches_official():
  texts = [c[0] for c in SQUAD_CASES] + [
    "A.B.C. (the) an-the a_the",
    "Hello,\tWorld!\n  The END",
    "it's 3.14 — “quoted” the",
    "THE AN A",
    "",
  ]
  for text in texts:
    assert scores.normalize_answer(text) == official_normalize_answer(text), text
  assert scores.normalize_answer("A.B.C. (the) an-the") == "abc anthe"  # "-" goes first
  assert scores.normalize_answer("a_the") == "athe"  # "_" is ASCII punctuation


def test_squad_scores_percent_and_unanswered():
  references = {
    "q1": ["Denver Broncos"],
    "q2": ["Carolina Panthers", "the Panthers"],
    "q3": ["Santa Clara"],
    "q4": ["1850"],
  }
  predictions = {"q1": "the Denver Broncos", "q2": "Panthers", "q3": "Levi's Stadium, Santa Clara",
                 "extra": "ignored"}  # fmt: skip
  result = scores.squad_scores(predictions, references)
  # q1 EM 1 F1 1; q2 EM 1 (the panthers) F1 1; q3 EM 0, F1 P 2/4 R 1 -> 2/3; q4 unanswered: 0
  assert result["exact_match"] == pytest.approx(100 * 2 / 4)
  assert result["f1"] == pytest.approx(100 * (1 + 1 + 2 / 3) / 4)
  assert result["unanswered"] == 1


def test_squad_references_from_official_layout():
  data = [{"paragraphs": [{"qas": [{"id": "x", "answers": [{"text": "a"}, {"text": "b"}]}]}]}]
  assert scores.squad_references(data) == {"x": ["a", "b"]}


def test_squad_rejects_bad_truths():
  with pytest.raises(ValueError):
    scores.f1("x", [])
  with pytest.raises(TypeError):
    scores.exact_match("x", "x")
  with pytest.raises(ValueError):
    scores.squad_scores({}, {})


# NER -----------------------------------------------------------------------------------------

NER_SEQS = [  # (tags, seqeval's entities) by hand
  (["B-PER", "I-PER", "O", "B-LOC"], {("PER", 0, 1), ("LOC", 3, 3)}),
  (["B-PER", "B-PER"], {("PER", 0, 0), ("PER", 1, 1)}),  # adjacent, same type
  (["I-PER", "I-PER", "O"], {("PER", 0, 1)}),  # I- without B- at the start
  (["O", "I-PER"], {("PER", 1, 1)}),  # ... after O, and at sentence end
  (["B-PER", "I-LOC", "I-LOC"], {("PER", 0, 0), ("LOC", 1, 2)}),  # type change mid-entity
  (["B-ORG", "I-ORG", "B-LOC", "I-LOC", "I-ORG"], {("ORG", 0, 1), ("LOC", 2, 3), ("ORG", 4, 4)}),
  (["B-ORG", "B-PER", "I-PER", "I-ORG"], {("ORG", 0, 0), ("PER", 1, 2), ("ORG", 3, 3)}),  # nested
  (["I-MISC", "B-MISC", "I-MISC"], {("MISC", 0, 0), ("MISC", 1, 2)}),  # IOB1 boundary
  (["O", "O", "B-PER", "I-PER"], {("PER", 2, 3)}),  # entity at sentence end
  (["O", "O"], set()),
  ([], set()),
  (["B-LOC-X", "I-LOC-X"], {("LOC-X", 0, 1)}),  # type is all after the first "-"
]


@pytest.mark.parametrize("tags,expected", NER_SEQS)
def test_entities_by_hand(tags, expected):
  assert scores.entities(tags) == expected


@pytest.mark.parametrize("tags,_", NER_SEQS)
def test_entities_match_seqeval(tags, _):
  seqeval = pytest.importorskip("seqeval.metrics.sequence_labeling")
  assert scores.entities(tags) == set(seqeval.get_entities(list(tags)))


def test_entities_rejects_non_iob_tags():
  for bad in (["E-PER"], ["S-PER"], ["B"], ["B-"], ["PER"], ["O-PER"]):
    with pytest.raises(ValueError):
      scores.entities(bad)


def test_ner_scores_by_hand():
  true = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O", "B-PER"]]
  pred = [["B-PER", "I-PER", "O", "O"], ["B-ORG", "B-PER", "I-PER"]]
  # true: PER 0-1, LOC 3; ORG 0, PER 2. pred: PER 0-1; ORG 0, PER 1-2. tp: PER 0-1, ORG 0.
  result = scores.ner_scores(true, pred)
  assert result["precision"] == pytest.approx(2 / 3)
  assert result["recall"] == pytest.approx(2 / 4)
  assert result["f1"] == pytest.approx(2 * (2 / 3) * (1 / 2) / (2 / 3 + 1 / 2))
  assert result["per_type"]["PER"] == pytest.approx(
    {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
  )
  assert result["per_type"]["LOC"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
  assert result["per_type"]["ORG"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 1}


def test_ner_entities_compared_per_sentence():
  # The same (type, start, end) in different sentences is not a match.
  result = scores.ner_scores([["B-PER"], ["O"]], [["O"], ["B-PER"]])
  assert (result["precision"], result["recall"], result["f1"]) == (0.0, 0.0, 0.0)


def test_ner_empty_predictions_and_no_entities():
  result = scores.ner_scores([["B-PER", "O"]], [["O", "O"]])
  assert (result["precision"], result["recall"], result["f1"]) == (0.0, 0.0, 0.0)
  result = scores.ner_scores([["O"]], [["O"]])  # nothing to find: 0 as seqeval, not 1
  assert (result["precision"], result["recall"], result["f1"]) == (0.0, 0.0, 0.0)
  assert result["per_type"] == {}


def test_ner_rejects_mismatched_lengths():
  with pytest.raises(ValueError):
    scores.ner_scores([["O"]], [["O"], ["O"]])
  with pytest.raises(ValueError):
    scores.ner_scores([["O", "O"]], [["O"]])


NER_CORPORA = [
  ([["B-PER", "B-PER", "O"]], [["B-PER", "I-PER", "O"]]),
  ([["I-PER", "O", "I-PER"]], [["B-PER", "O", "B-PER"]]),
  ([["B-PER", "I-LOC"], ["O", "I-PER"]], [["B-PER", "B-LOC"], ["O", "B-PER"]]),
  ([["B-ORG", "B-PER", "I-PER", "I-ORG"]], [["B-ORG", "I-ORG", "I-ORG", "I-ORG"]]),
  ([["O", "B-MISC", "I-MISC"], ["B-LOC"]], [["O", "O", "O"], ["O"]]),  # empty predictions
  ([["O", "O"]], [["B-PER", "O"]]),  # no true entity
  ([["B-PER"], ["O"]], [["O"], ["B-PER"]]),
]


def _random_corpus(rng, n_sent=30):
  tags = ["O", "O", "O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG"]
  true, pred = [], []
  for _ in range(n_sent):
    n = int(rng.integers(0, 12))
    t = [tags[i] for i in rng.integers(0, len(tags), n)]
    p = [tag if rng.random() < 0.7 else tags[int(rng.integers(0, len(tags)))] for tag in t]
    true.append(t)
    pred.append(p)
  return true, pred


def test_ner_scores_match_seqeval():
  metrics = pytest.importorskip("seqeval.metrics")
  rng = np.random.default_rng(0)
  corpora = NER_CORPORA + [_random_corpus(rng) for _ in range(20)]
  for true, pred in corpora:
    result = scores.ner_scores(true, pred)
    with _quiet():
      assert result["precision"] == pytest.approx(metrics.precision_score(true, pred))
      assert result["recall"] == pytest.approx(metrics.recall_score(true, pred))
      assert result["f1"] == pytest.approx(metrics.f1_score(true, pred))
      report = metrics.classification_report(true, pred, output_dict=True)
    for type_, row in result["per_type"].items():
      expected = report[type_]
      assert row["precision"] == pytest.approx(expected["precision"])
      assert row["recall"] == pytest.approx(expected["recall"])
      assert row["f1"] == pytest.approx(expected["f1-score"])
      assert row["support"] == expected["support"]
    named = {k for k in report if not k.endswith(" avg")}
    assert named == set(result["per_type"])


@contextlib.contextmanager
def _quiet():
  """seqeval and sklearn warn where a score is 0 / 0."""
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    yield


# GLUE ----------------------------------------------------------------------------------------


def test_mcc_by_hand():
  # tp 2, tn 1, fp 1, fn 1: (2 - 1) / sqrt(3 * 3 * 2 * 2) = 1/6
  labels = [1, 1, 1, 0, 0]
  preds = [1, 1, 0, 1, 0]
  assert scores.matthews_correlation(preds, labels) == pytest.approx(1 / 6)
  assert scores.matthews_correlation(labels, labels) == 1.0
  assert scores.matthews_correlation([1 - y for y in labels], labels) == -1.0


def test_mcc_constant_is_zero():
  # Undefined (0 / 0): 0, as sklearn's matthews_corrcoef.
  assert scores.matthews_correlation([1, 1, 1, 1], [1, 0, 1, 0]) == 0.0
  assert scores.matthews_correlation([1, 0, 1, 0], [0, 0, 0, 0]) == 0.0
  assert scores.matthews_correlation([0, 0], [0, 0]) == 0.0


def test_f1_accuracy_by_hand():
  labels = [1, 1, 1, 0, 0, 0]
  preds = [1, 1, 0, 1, 0, 0]  # tp 2 fp 1 fn 1 -> 4 / 6
  assert scores.binary_f1(preds, labels) == pytest.approx(2 / 3)
  assert scores.accuracy(preds, labels) == pytest.approx(4 / 6)
  assert scores.binary_f1([0, 0, 0], [0, 0, 0]) == 0.0  # all negative: 0, as sklearn
  assert scores.binary_f1([0, 0, 0], [1, 0, 1]) == 0.0
  assert scores.binary_f1([1, 1, 1], [0, 0, 0]) == 0.0
  with pytest.raises(ValueError):
    scores.binary_f1([2, 0], [1, 0])


def test_correlations_by_hand():
  x = [1.0, 2.0, 3.0, 4.0]
  assert scores.pearson(x, [2.0, 4.0, 6.0, 8.0]) == pytest.approx(1.0)
  assert scores.pearson(x, [1.0, 3.0, 2.0, 4.0]) == pytest.approx(0.8)  # cov 4/4, var 5/4
  assert scores.spearman(x, [1.0, 8.0, 27.0, 64.0]) == pytest.approx(1.0)  # monotone
  # ties: ranks of [1, 2, 2, 3] are [1, 2.5, 2.5, 4]; r with [1, 2, 3, 4] = 4.5 / sqrt(5 * 4.5)
  assert scores.spearman(x, [10.0, 20.0, 20.0, 30.0]) == pytest.approx(4.5 / math.sqrt(22.5))
  np.testing.assert_array_equal(
    scores._average_ranks(np.array([3.0, 1.0, 3.0, 2.0, 3.0])), [4.0, 1.0, 4.0, 2.0, 4.0]
  )


def test_correlations_undefined_are_nan():
  assert math.isnan(scores.pearson([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))
  assert math.isnan(scores.spearman([0.1] * 3, [1.0, 2.0, 3.0]))
  assert math.isnan(scores.pearson([1.0, float("nan")], [1.0, 2.0]))
  with pytest.raises(ValueError):
    scores.pearson([1.0], [1.0])


def test_glue_scores_keys():
  assert scores.glue_scores("cola", [1, 0], [1, 0]) == {"matthews_correlation": 1.0}
  assert scores.glue_scores("mrpc", [1, 0], [1, 1]) == {"accuracy": 0.5, "f1": 2 / 3}
  assert set(scores.glue_scores("qqp", [1, 0], [1, 1])) == {"accuracy", "f1"}
  assert set(scores.glue_scores("stsb", [0.1, 0.5, 0.2], [1, 3, 2])) == {"pearson", "spearmanr"}
  for task in ("sst2", "mnli", "qnli", "rte", "wnli"):
    assert scores.glue_scores(task, np.array([1, 0, 2]), np.array([1, 0, 0])) == {
      "accuracy": pytest.approx(2 / 3)
    }
  with pytest.raises(ValueError):
    scores.glue_scores("squad", [1], [1])
  with pytest.raises(ValueError):  # logits, not class ids
    scores.glue_scores("sst2", np.zeros((3, 2)), [0, 1, 1])
  assert scores.mnli_scores(matched=([0, 1, 2], [0, 1, 1]), mismatched=([2, 2], [2, 2])) == {
    "accuracy_matched": pytest.approx(2 / 3),
    "accuracy_mismatched": 1.0,
  }


def _glue_samples(rng):
  for n in (5, 17, 200):
    yield rng.integers(0, 2, n), rng.integers(0, 2, n)
  yield np.ones(10, int), rng.integers(0, 2, 10)  # constant prediction
  yield np.zeros(10, int), np.zeros(10, int)


def test_mcc_f1_match_sklearn():
  metrics = pytest.importorskip("sklearn.metrics")
  rng = np.random.default_rng(1)
  for preds, labels in _glue_samples(rng):
    with _quiet():
      assert scores.matthews_correlation(preds, labels) == pytest.approx(
        metrics.matthews_corrcoef(labels, preds)
      )
      assert scores.binary_f1(preds, labels) == pytest.approx(metrics.f1_score(labels, preds))
  labels, preds = rng.integers(0, 3, 50), rng.integers(0, 3, 50)  # multiclass MCC
  assert scores.matthews_correlation(preds, labels) == pytest.approx(
    metrics.matthews_corrcoef(labels, preds)
  )


def test_correlations_match_scipy():
  stats = pytest.importorskip("scipy.stats")
  rng = np.random.default_rng(2)
  for n in (3, 10, 300):
    x = rng.normal(size=n)
    y = x + rng.normal(size=n)
    tied_x, tied_y = np.round(x * 2) / 2, np.round(y)  # many ties
    for a, b in ((x, y), (tied_x, tied_y), (x, tied_y)):
      assert scores.pearson(a, b) == pytest.approx(stats.pearsonr(a, b)[0], abs=1e-12)
      assert scores.spearman(a, b) == pytest.approx(stats.spearmanr(a, b)[0], abs=1e-12)
      np.testing.assert_allclose(scores._average_ranks(a), stats.rankdata(a))
