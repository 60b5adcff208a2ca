"""experiments/harness.py: lm-evaluation-harness's "trimformer" model, on local tasks (offline).

A tiny random GPT-2 with a word-level tokenizer (saved with save_pretrained) runs four YAML
tasks over jsonl files the test writes (loglikelihood, multiple_choice, loglikelihood_rolling,
generate_until) through lm_eval.simple_evaluate; each logged response must equal trimformer's
own computation of the same text (model.apply, log_softmax, summed) and its greedy generation.
A trained run's workdir loads too, and an encoder is refused.
"""

import json
import os

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest

pytest.importorskip("lm_eval")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

import jax  # noqa: E402

import models  # noqa: E402
from experiments import harness  # noqa: E402
from experiments.train import ConfigError  # noqa: E402

MAX_LENGTH = 16  # the rolling document (40 words) spans three windows
WORDS = ["<eos>", "<unk>"] + [f"w{i}" for i in range(62)]  # id of "wN" is N + 2


def words(ids):
  return " ".join(WORDS[i] for i in ids)


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
  """A tiny GPT-2 with randomized weights and a word-level tokenizer over its vocabulary."""
  import torch

  tok = tokenizers.Tokenizer(
    tokenizers.models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>")
  )
  tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
  tok.decoder = tokenizers.decoders.WordPiece(prefix="##")  # joins words with spaces
  fast = transformers.PreTrainedTokenizerFast(
    tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>"
  )
  torch.manual_seed(0)
  model = transformers.GPT2LMHeadModel(
    transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64)
  ).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.3 * torch.randn_like(p))  # logits far from uniform: greedy tokens are clear
  directory = str(tmp_path_factory.mktemp("gpt2"))
  model.save_pretrained(directory)
  fast.save_pretrained(directory)
  return directory


def write_tasks(directory):
  """Four local tasks (YAML over jsonl files) in `directory`; returns their docs by name."""
  rng = np.random.default_rng(0)
  ids = lambda n: [int(x) for x in rng.integers(2, 64, n)]  # noqa: E731
  docs = {
    "tt_ll": [
      {"context": words(ids(n)), "target": " " + words(ids(m))}
      for n, m in [(3, 1), (5, 2), (1, 4), (9, 3), (12, 5)]
    ],  # fmt: skip
    "tt_mc": [
      {"question": words(ids(4)), "choices": [words(ids(k)) for k in (1, 2, 3)], "label": 1},
      {"question": words(ids(7)), "choices": [words(ids(k)) for k in (2, 1, 2)], "label": 0},
    ],
    "tt_roll": [{"text": words(ids(40))}, {"text": words(ids(5))}],
    "tt_gen": [{"prompt": words(ids(4)), "answer": "w1"}],
  }
  common = "dataset_path: json\ntest_split: test\n"
  yaml = {
    "tt_ll": "output_type: loglikelihood\ndoc_to_text: '{{context}}'\n"
    "doc_to_target: '{{target}}'\nmetric_list:\n  - metric: perplexity\n  - metric: acc\n",
    "tt_mc": "output_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
    "doc_to_choice: '{{choices}}'\ndoc_to_target: label\nmetric_list:\n  - metric: acc\n",
    "tt_roll": "output_type: loglikelihood_rolling\ndoc_to_text: ''\n"
    "doc_to_target: '{{text}}'\nmetric_list:\n  - metric: word_perplexity\n",
    "tt_gen": "output_type: generate_until\ndoc_to_text: '{{prompt}}'\n"
    "doc_to_target: '{{answer}}'\ngeneration_kwargs:\n  until: ['\\n']\n"
    "  max_gen_toks: 6\n  do_sample: false\nmetric_list:\n  - metric: exact_match\n",
  }
  for name, rows in docs.items():
    data = os.path.join(directory, f"{name}.jsonl")
    with open(data, "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in rows)
    with open(os.path.join(directory, f"{name}.yaml"), "w") as f:
      f.write(f"task: {name}\n{common}dataset_kwargs:\n  data_files:\n    test: {data}\n")
      f.write(yaml[name])
  return docs


def reference(model, params, ids_context, ids_continuation):
  """(summed log-probability of the continuation after the context, every token the argmax)
  from one model.apply on the whole sequence."""
  seq = np.array([list(ids_context) + list(ids_continuation)], np.int32)
  logp = jax.nn.log_softmax(model.apply({"params": params}, seq)[0], -1)
  n = len(ids_context)
  rows = np.arange(n - 1, seq.shape[1] - 1)
  targets = seq[0, n:]
  lp = np.asarray(logp)[rows, targets]
  return float(lp.sum()), bool(np.all(np.asarray(logp)[rows].argmax(-1) == targets))


def rolling_reference(model, params, tokens, prefix, width):
  """The document's log-likelihood in windows of `width` inputs: each token predicted once,
  with as many tokens before it as the window holds (lm-eval's rolling windows)."""
  seq = [prefix] + list(tokens)
  total, start = 0.0, 0
  while start < len(tokens):
    end = min(len(tokens), start + width)
    window = seq[max(0, end - width) : end + 1]  # inputs: window[:-1]; targets: its tail
    n_scored = end - start
    total += reference(model, params, window[: len(window) - n_scored], window[-n_scored:])[0]
    start = end
  return total


def test_simple_evaluate_equals_trimformer(gpt2_dir, tmp_path):
  from lm_eval import simple_evaluate
  from lm_eval.tasks import TaskManager

  docs = write_tasks(str(tmp_path))
  out = simple_evaluate(
    model="trimformer",
    model_args=f"init_from=hf:{gpt2_dir},max_length={MAX_LENGTH}",
    tasks=list(docs),
    task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False),
    batch_size=4,
    log_samples=True,
    bootstrap_iters=0,
  )
  model, params = models.hf.from_pretrained(gpt2_dir)
  ids = lambda text: [WORDS.index(w) for w in text.split()]  # noqa: E731
  samples = out["samples"]

  for s in samples["tt_ll"]:
    (logp, greedy), doc = s["resps"][0][0], s["doc"]
    want = reference(model, params, ids(doc["context"]), ids(doc["target"]))
    np.testing.assert_allclose(logp, want[0], atol=1e-4)
    assert greedy == want[1]
  # One request is the greedy continuation: is_greedy is tested both ways.
  first = ids(docs["tt_ll"][0]["context"])
  best = int(np.argmax(model.apply({"params": params}, np.array([first]))[0, -1]))
  lm = harness.TrimformerLM(init_from=f"hf:{gpt2_dir}", max_length=MAX_LENGTH, batch_size=4)
  assert lm.score_tokens([(first, [best])])[0][1] is True
  assert lm.score_tokens([(first, [(best + 1) % 64])])[0][1] is False

  for s in samples["tt_mc"]:
    doc = s["doc"]
    for (logp, greedy), choice in zip((r[0] for r in s["resps"]), doc["choices"]):
      want = reference(model, params, ids(doc["question"]), ids(choice))
      np.testing.assert_allclose(logp, want[0], atol=1e-4)
      assert greedy == want[1]

  assert [len(ids(d["text"])) for d in docs["tt_roll"]] == [40, 5]
  for s in samples["tt_roll"]:
    toks = ids(s["doc"]["text"])
    want = rolling_reference(model, params, toks, lm.prefix_token_id, MAX_LENGTH)
    np.testing.assert_allclose(s["resps"][0][0], want, atol=1e-4)
  assert lm.prefix_token_id == 0  # no BOS: the EOS

  (s,) = samples["tt_gen"]
  prompt = np.array([ids(s["doc"]["prompt"])], np.int32)
  tokens, _ = models.generate(model, {"params": params}, prompt, max_new_tokens=6, eos_id=0)
  row = [int(t) for t in np.asarray(tokens)[0]]
  row = row[: row.index(0)] if 0 in row else row
  assert s["resps"][0][0] == words(row)
  assert len(row) > 2
  assert "tt_ll" in out["results"] and "word_perplexity,none" in out["results"]["tt_roll"]

  # Stop strings cut the continuation (the third generated word stops it).
  from lm_eval.api.instance import Instance

  stop = " " + WORDS[row[2]]
  req = Instance(
    "generate_until", {}, (s["doc"]["prompt"], {"until": [stop], "max_gen_toks": 6}), 0
  )
  (text,) = lm.generate_until([req])
  assert text == words(row[:2]).split(stop)[0]


def test_workdir_run(tmp_path):
  """A run of experiments.train (two steps of the tiny LM on the synthetic language): its
  newest checkpoint, scored through its symbols' tokenizer."""
  from experiments import generate, train
  from experiments.configs import lm
  from lm_eval.api.instance import Instance

  c = lm.get_config("tiny")
  c.train.update(steps=2, checkpoint_every=2, log_every=1)
  c.eval.update(every=2, steps=1)
  train.train_and_evaluate(c, str(tmp_path), devices=jax.devices()[:1])
  h = harness.TrimformerLM(workdir=str(tmp_path), batch_size=2)
  model, variables, tok = generate.load_run(str(tmp_path))
  pairs = [("abc", "de"), ("x", "yz z"), ("hello", " w")]
  got = h.loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)])
  for (ctx, cont), (logp, _) in zip(pairs, got):
    seq = np.array([tok.encode(ctx + cont)], np.int32)
    lp = jax.nn.log_softmax(model.apply(variables, seq)[0], -1)
    n = len(ctx)
    want = sum(float(lp[j - 1, seq[0, j]]) for j in range(n, seq.shape[1]))
    np.testing.assert_allclose(logp, want, atol=1e-4)
  with pytest.raises(ConfigError, match="prefix_token_id"):  # the symbols have no EOS
    h.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, ("abc",), 0)])
  h = harness.TrimformerLM(workdir=str(tmp_path), prefix_token_id=tok.encode("a")[0])
  (total,) = h.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, ("abc",), 0)])
  assert total < 0


def test_refused(tmp_path):
  bert = transformers.BertForMaskedLM(
    transformers.BertConfig(
      vocab_size=64,
      hidden_size=32,
      num_hidden_layers=1,
      num_attention_heads=4,
      intermediate_size=37,
    )
  )
  bert.save_pretrained(str(tmp_path))
  with pytest.raises(ConfigError, match="decoder"):
    harness.TrimformerLM(init_from=f"hf:{tmp_path}", tokenizer="byte")
  with pytest.raises(ConfigError, match="exactly one"):
    harness.TrimformerLM()
  with pytest.raises(ConfigError, match="hf:"):
    harness.TrimformerLM(init_from=str(tmp_path))
