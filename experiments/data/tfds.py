"""Real data from TensorFlow Datasets: packed text for the LM and MLM (lm1b, c4/en) and GLUE
classification (glue/<task>), tokenized on the host.

    source = TextSource("lm1b", tokenizer, batch_size=512, eval_batch_size=512, seq_len=128)
    batch = source.batch(step, "train")  # this process's rows, NumPy, like MarkovSource.batch

Determinism: a batch is a function of (seed, step, process index, process count), for given
prepared files and TF / TFDS versions. Each process reads its own part of the train split
(`tfds.split_for_jax_process`); files and examples are shuffled with fixed seeds, reshuffled
each epoch (seeded too) and repeated; tf.data runs with `deterministic=True`, so the
interleaving of files is fixed. Unlike the synthetic data, the global batch depends on the
process count: resuming on another number of processes changes the order of the data.

Batches are addressed by step: `batch(step)` continues the stream when `step` follows the last
step asked for; any other step rebuilds the stream and skips ahead, so a resumed run (or a
fresh source) sees exactly the batches an uninterrupted run would. The replay costs:
- GLUE: skipped inside tf.data (files read and shuffled, nothing tokenized): cheap.
- Packed text: every document before `step` is read and tokenized again, since packing
  depends on token counts: resuming at step k re-tokenizes k x batch x (seq_len + 1) tokens.
  `python -m experiments.data.tfds [tokenizer]` measures the rate on mocked documents: on two
  idle CPU cores 4-6M tokens/s with the byte tokenizer, 0.45M tokens/s with a byte-level BPE
  (GPT-2's kind; Hugging Face's tokenizer itself runs at 0.55M tokens/s there). E.g. resuming
  lm1b (512 x 129 tokens a step) at step 10k replays 660M tokens: about 25 minutes at
  0.45M tokens/s, less on a TPU host's many cores (the Rust tokenizer uses them all).

TensorFlow is imported on first use only (`pip install -e '.[data]'`), with its GPU hidden
so that it never takes accelerator memory.
"""

import functools
import itertools
import math
import time

import numpy as np

from experiments.data.markov import _round4, row_uniforms
from experiments.data.encoder import _mlm_from_uniforms

# GLUE's classification tasks: their text features and number of classes.
GLUE = {
  "cola": (("sentence",), 2),
  "sst2": (("sentence",), 2),
  "mrpc": (("sentence1", "sentence2"), 2),
  "qqp": (("question1", "question2"), 2),
  "mnli": (("premise", "hypothesis"), 3),
  "qnli": (("question", "sentence"), 2),
  "rte": (("sentence1", "sentence2"), 2),
  "wnli": (("sentence1", "sentence2"), 2),
}
# Eval splits where the dataset has no "validation".
EVAL_SPLITS = {"glue/mnli": "validation_matched", "lm1b": "test"}
# More eval splits, evaluated beside the default one (when data.tfds.eval_split is ""):
# {dataset: {split name for `batch`: TFDS split}}; the eval row carries their metrics with the
# split name as prefix (GLUE's MNLI-m / MNLI-mm: eval_mm_accuracy beside accuracy).
EXTRA_EVAL_SPLITS = {"glue/mnli": {"eval_mm": "validation_mismatched"}}
CHUNK_DOCS = 1024  # documents tokenized per call


@functools.cache
def _tf():
  """(tensorflow, tensorflow_datasets), imported on first use, with TF off the GPUs."""
  try:
    import tensorflow as tf
    import tensorflow_datasets as tfds
  except ImportError as e:
    raise ImportError(
      "data.source='tfds' needs tensorflow and tensorflow-datasets: pip install -e '.[data]'"
    ) from e
  try:
    tf.config.set_visible_devices([], "GPU")  # JAX owns the accelerators
  except RuntimeError:  # TF had already initialized its devices
    pass
  return tf, tfds


def default_eval_split(name: str, split: str = "") -> str:
  """`split`, or when it is "" the dataset's eval split (validation_matched for glue/mnli,
  test for lm1b, else validation)."""
  return split or EVAL_SPLITS.get(name, "validation")


def glue_task(name: str) -> tuple[tuple[str, ...], int]:
  """(text features, number of classes) of "glue/<task>"."""
  task = name.removeprefix("glue/")
  if not name.startswith("glue/") or task not in GLUE:
    if task == "stsb":
      raise ValueError("glue/stsb is a regression task: only GLUE's classification tasks run.")
    raise ValueError(f"data.tfds.name={name!r}: choose glue/<task>, <task> one of {list(GLUE)}.")
  return GLUE[task]


def builder(name: str, data_dir: str = ""):
  """The TFDS builder of `name` in `data_dir`, prepared (downloaded) if it is not yet."""
  _, tfds = _tf()
  b = tfds.builder(name, data_dir=data_dir or None)
  if not b.is_prepared():
    try:
      b.download_and_prepare()
    except Exception as e:
      raise RuntimeError(
        f"TFDS dataset {name!r} is not prepared in {b.data_dir} and could not be prepared "
        f"here ({type(e).__name__}: {e}). Prepare it where it can be downloaded (`tfds build "
        f"{name} --data_dir=DIR`) and set --config.data.tfds.data_dir=DIR."
      ) from e
  return b


def _options():
  tf, _ = _tf()
  options = tf.data.Options()
  options.deterministic = True
  return options


def read_train(b, split: str, seed: int, shuffle_buffer: int):
  """The examples of `split`, shuffled (files, then a buffer) and reshuffled each epoch with
  seeds derived from `seed`, repeated forever: a tf.data.Dataset."""
  _, tfds = _tf()
  read_config = tfds.ReadConfig(
    shuffle_seed=seed,
    shuffle_reshuffle_each_iteration=True,
    options=_options(),
    try_autocache=False,
  )
  ds = b.as_dataset(split=split, shuffle_files=True, read_config=read_config)
  return ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True).repeat()


def read_eval(b, split: str):
  """The examples of `split` once, in file order: a tf.data.Dataset."""
  _, tfds = _tf()
  read_config = tfds.ReadConfig(options=_options(), interleave_cycle_length=1)
  return b.as_dataset(split=split, shuffle_files=False, read_config=read_config)


def _decode(texts) -> list[str]:
  return [t.decode("utf-8") for t in texts]


def pack(chunks, rows: int, width: int):
  """[rows, width] blocks of the concatenated token chunks, in order (the remainder waits
  for the next chunk; what is left at the end is dropped)."""
  need, buf = rows * width, np.zeros(0, np.int32)
  for chunk in chunks:
    buf = np.concatenate([buf, chunk])
    n = len(buf) // need
    for i in range(n):
      yield buf[i * need : (i + 1) * need].reshape(rows, width)
    buf = buf[n * need :]


def pad_rows(rows: dict, b: int, pad_id: int) -> dict:
  """`rows` (a batch's arrays, up to `b` rows each) filled up to `b` rows with padding rows of
  weight 0: "inputs" `pad_id`, "attention_mask" 1 on the first position only (one visible
  key, as a real row has), every other array 0; each array keeps its trailing shape and dtype."""
  pad = b - len(rows["weights"])
  if not pad:
    return rows
  filler = {k: np.zeros((pad, *v.shape[1:]), v.dtype) for k, v in rows.items()}
  filler["inputs"][:] = pad_id
  filler["attention_mask"][:, 0] = 1
  return {k: np.concatenate([rows[k], filler[k]]) for k in rows}


class Steps:
  """Batches addressed by step over `start(step)`, an iterator of the batches from `step` on:
  consecutive steps continue it, any other step starts it again there (the last batch is
  kept, so asking for it again is free)."""

  def __init__(self, start):
    self._start, self._it, self._next, self._last = start, None, None, (None, None)

  def __call__(self, step: int) -> dict:
    if step == self._last[0]:
      return dict(self._last[1])
    it = self._it if self._it is not None and step == self._next else self._start(step)
    self._it = None  # until `it` has given its batch (it may raise)
    batch = next(it)
    self._it, self._next, self._last = it, step + 1, (step, batch)
    return dict(batch)


def _local_rows(batch_size: int, process_count: int, what: str) -> int:
  if batch_size % process_count:
    raise ValueError(f"{what}={batch_size} does not split over {process_count} processes.")
  return batch_size // process_count


class _Source:
  """What the TFDS sources share: the dataset, the process's part, the per-split streams.

  `builder` (the dataset's TFDS builder) is prepared at construction, so that a dataset that
  cannot be prepared fails there; a subclass that may read no TFDS dataset (NerSource's CoNLL
  files) sets `prepare_on_init = False` and gets it on first use of `self.builder`."""

  prepare_on_init = True

  def __init__(
    self,
    name: str,
    tokenizer,
    *,
    batch_size: int,
    eval_batch_size: int,
    seq_len: int,
    seed: int = 0,
    data_dir: str = "",
    train_split: str = "train",
    eval_split: str = "",
    shuffle_buffer: int = 10_000,
    process_index: int = 0,
    process_count: int = 1,
  ):
    if not name:
      raise ValueError("data.source='tfds' needs a dataset: set data.tfds.name (e.g. lm1b).")
    self.name, self.tokenizer, self.seq_len, self.seed = name, tokenizer, seq_len, seed
    self.process_index, self.process_count = process_index, process_count
    self.rows = {
      "train": _local_rows(batch_size, process_count, "train.batch_size"),
      "eval": _local_rows(eval_batch_size, process_count, "eval.batch_size"),
    }
    self.splits = {"train": train_split, "eval": default_eval_split(name, eval_split)}
    self.shuffle_buffer, self.data_dir = shuffle_buffer, data_dir
    self._streams = {}
    if self.prepare_on_init:
      self.builder  # prepared now

  @functools.cached_property
  def builder(self):
    """The TFDS builder of the dataset, prepared (module-level `builder`) on first use."""
    return builder(self.name, self.data_dir)

  def empty(self, split: str, what: str, keys=("name",)) -> ValueError:
    """The error for a `split` that `what` (e.g. "holds no documents"), naming what to check."""
    key = "train_split" if split == "train" else "eval_split"
    check = ", ".join(f"data.tfds.{k}" for k in (*keys, key, "data_dir"))
    part = f" (process {self.process_index}'s part)" if self.process_count > 1 else ""
    return ValueError(
      f"The {split} split {self.splits[split]!r} of {self.name}{part} {what}: check {check}."
    )

  def process_split(self, split: str):
    _, tfds = _tf()
    return tfds.split_for_jax_process(
      self.splits[split], process_index=self.process_index, process_count=self.process_count
    )

  def batch(self, step: int, split: str = "train") -> dict:
    """This process's rows of the batch at `step` of `split` ("train" or "eval")."""
    if split not in self._streams:
      self._streams[split] = Steps(functools.partial(self._start, split))
    return self._streams[split](step)


class TextSource(_Source):
  """Documents of a TFDS text dataset (lm1b, c4/en: feature `text_key`), tokenized, each
  followed by EOS ([SEP] when the tokenizer has no EOS) and packed GPT-2 style into rows.

  task "lm": rows of seq_len + 1 tokens -> int32 inputs / targets (shifted by one) and
  float32 weights (ones) [b, seq_len], as MarkovSource.batch.
  task "mlm": [CLS] + seq_len - 1 tokens, BERT-masked with uniforms of (seed, split, step,
  global row) -> inputs, targets, weights, attention_mask, token_type_ids, as
  data.encoder.mlm_batch; special tokens are never selected.

  Eval: the eval split packed the same way, in order, not shuffled, never repeated.
  """

  def __init__(self, name, tokenizer, *, task="lm", text_key="text", mask_prob=0.15, **kwargs):
    super().__init__(name, tokenizer, **kwargs)
    if task not in ("lm", "mlm"):
      raise ValueError(f"TextSource: task={task!r}: choose 'lm' or 'mlm'.")
    self.task, self.text_key, self.mask_prob = task, text_key, mask_prob
    features = getattr(self.builder.info, "features", None)
    if features is not None and text_key not in features.keys():
      raise ValueError(
        f"data.tfds.text_key={text_key!r} is not a feature of {name}: choose one of "
        f"{sorted(features.keys())}."
      )
    tok = tokenizer
    self.doc_end = tok.eos_id if tok.eos_id is not None else tok.sep_id
    if task == "mlm":
      self.doc_end = tok.sep_id if tok.sep_id is not None else tok.eos_id
      missing = [n for n in ("cls_id", "mask_id") if getattr(tok, n) is None]
      if missing:
        raise ValueError(f"MLM needs [CLS] and [MASK] tokens: {tok!r} has no {missing}.")
      self.specials = np.array(sorted(tok.special_ids), np.int32)
    if self.doc_end is None:
      raise ValueError(f"{tok!r} has no EOS or [SEP] token to end documents with.")
    self.width = self.seq_len + 1 if task == "lm" else self.seq_len - 1

  def token_chunks(self, split: str):
    """This process's documents of `split` as token arrays (each document + EOS), in stream
    order: shuffled and repeated for "train", once in order for "eval"."""
    tf, tfds = _tf()
    s = self.process_split(split)
    if split == "train":
      ds = read_train(self.builder, s, self.seed, self.shuffle_buffer)
    else:
      ds = read_eval(self.builder, s)
    key = self.text_key
    ds = ds.map(lambda ex: ex[key]).batch(CHUNK_DOCS).prefetch(tf.data.AUTOTUNE)
    for texts in tfds.as_numpy(ds):
      ids = self.tokenizer.encode_batch(_decode(texts))
      yield np.fromiter(itertools.chain.from_iterable(x + [self.doc_end] for x in ids), np.int32)

  def _start(self, split: str, step: int):
    rows, tokens = self.rows[split], [0]

    def counted():
      for chunk in self.token_chunks(split):
        tokens[0] += len(chunk)
        yield chunk

    blocks = pack(counted(), rows, self.width)
    for s in itertools.count():  # s < step: the replay (every document tokenized again)
      block = next(blocks, None)
      if block is None and not tokens[0]:
        raise self.empty(split, "holds no documents", ("name", "text_key"))
      if block is None and not s:
        batch_size = "train.batch_size" if split == "train" else "eval.batch_size"
        raise self.empty(
          split,
          f"holds {tokens[0]} tokens, less than one batch of {rows} x {self.width} tokens per "
          f"process: lower {batch_size} or train.seq_len, or use a larger split",
        )
      if block is None:
        raise ValueError(
          f"The {split} split {self.splits[split]!r} of {self.name} has only {s} batches of "
          f"{rows} x {self.width} tokens per process: lower eval.steps to at most {s}."
        )
      if s >= step:
        yield self._batch(block, split, s)

  def _batch(self, ids_BxW: np.ndarray, split: str, step: int) -> dict:
    B, L = ids_BxW.shape[0], self.seq_len
    if self.task == "lm":
      return {
        "inputs": np.ascontiguousarray(ids_BxW[:, :-1]),
        "targets": np.ascontiguousarray(ids_BxW[:, 1:]),
        "weights": np.ones((B, L), np.float32),
      }
    tok = self.tokenizer
    inputs_BxL = np.concatenate([np.full((B, 1), tok.cls_id, np.int32), ids_BxW], axis=1)
    maskable_BxL = ~np.isin(inputs_BxL, self.specials)
    start = self.process_index * B
    u = row_uniforms(self.seed, "mlm", split, step, start, B, _round4(3 * L))
    out = _mlm_from_uniforms(
      inputs_BxL,
      maskable_BxL,
      u[:, : 3 * L].reshape(B, L, 3),
      mask_id=tok.mask_id,
      vocab_size=tok.vocab_size,
      n_special=tok.n_special,
      mask_prob=self.mask_prob,
    )
    return {
      **out,
      "attention_mask": np.ones((B, L), np.int32),
      "token_type_ids": np.zeros((B, L), np.int32),
    }


class GlueSource(_Source):
  """A GLUE classification task (glue/<task>): [CLS] a [SEP] (b [SEP]) (the tokenizer's own
  template for HF tokenizers), truncated and padded to seq_len -> int32 inputs,
  attention_mask, token_type_ids [b, seq_len], int32 label [b] and float32 weights [b]
  (1: a real example, 0: a padding row), as data.encoder.ClassifySource.batch.

  Train: shuffled, reshuffled each epoch, repeated. Eval: the whole eval split, read by
  every process (GLUE's are small) and cut into equal parts, in order; `eval_steps` batches
  cover it, the last ones padded with weight-0 rows. With the default eval split, MNLI also
  evaluates validation_mismatched (EXTRA_EVAL_SPLITS): `batch(step, "eval_mm")`, the same way,
  in `extra_eval_steps["eval_mm"]` batches.
  """

  def __init__(self, name, tokenizer, *, eval_split: str = "", **kwargs):
    self.keys, self.num_labels = glue_task(name)
    super().__init__(name, tokenizer, eval_split=eval_split, **kwargs)
    if not eval_split:  # a split the user names is evaluated alone
      self.splits.update(EXTRA_EVAL_SPLITS.get(name, {}))
    self._eval, steps = {}, {}
    for split in [s for s in self.splits if s != "train"]:
      full = self._read_eval(split)
      part = math.ceil(len(full["label"]) / self.process_count)  # the same on every process
      lo = self.process_index * part
      self._eval[split] = {k: v[lo : lo + part] for k, v in full.items()}
      steps[split] = math.ceil(part / self.rows["eval"])
    self.eval_steps = steps.pop("eval")
    self.extra_eval_steps = steps  # {split: batches} of the extra eval splits

  def encode(self, examples: dict) -> dict:
    texts = [_decode(examples[k]) for k in self.keys]
    out = self.tokenizer.encode_pairs(texts[0], texts[1] if len(texts) > 1 else None, self.seq_len)
    label = np.asarray(examples["label"]).astype(np.int32)
    if ((label < 0) | (label >= self.num_labels)).any():
      raise ValueError(
        f"{self.name}: labels outside [0, {self.num_labels}) (GLUE's test splits have none, "
        "-1): train and evaluate on labelled splits."
      )
    return {**out, "label": label, "weights": np.ones(len(label), np.float32)}

  def _read_eval(self, split: str = "eval") -> dict:
    """The whole eval split (or an extra one, e.g. "eval_mm"), encoded, in order."""
    _, tfds = _tf()
    ds = read_eval(self.builder, self.splits[split]).batch(4096)
    parts = [self.encode(ex) for ex in tfds.as_numpy(ds)]
    if not parts:
      raise self.empty(split, "holds no examples")
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

  def _start(self, split: str, step: int):
    tf, tfds = _tf()
    if split != "train":
      if split not in self._eval:
        raise ValueError(
          f"{self.name} has no eval split {split!r}: choose one of {list(self._eval)}."
        )
      return (self._eval_batch(s, split) for s in itertools.count(step))
    ds = read_train(self.builder, self.process_split("train"), self.seed, self.shuffle_buffer)
    ds = ds.batch(self.rows["train"], drop_remainder=True).skip(step)
    return self._train_batches(tfds.as_numpy(ds.prefetch(tf.data.AUTOTUNE)))

  def _train_batches(self, examples):
    yield from (self.encode(ex) for ex in examples)
    # the train split repeats forever: it ends only when it holds nothing
    raise self.empty("train", "holds no examples")

  def _eval_batch(self, step: int, split: str = "eval") -> dict:
    """Eval rows [step * b, (step + 1) * b) of this process's part of `split` ("eval" or an
    extra eval split); weight-0 rows past it."""
    b = self.rows["eval"]
    rows = {k: v[step * b : (step + 1) * b] for k, v in self._eval[split].items()}
    return pad_rows(rows, b, self.tokenizer.pad_id)


def _fake_documents(self, split, read_config=None, **kwargs):
  """Mocked `_as_dataset`: 1M documents of 20 to 400 random words, made by tf.data (TFDS's
  own mock makes about 1k examples/s in Python, too slow to time the tokenizing)."""
  tf, _ = _tf()
  words = tf.constant(
    "the of and to in a is that for it as was with be by on not he i this".split()
  )

  def doc(i):
    n = 20 + tf.random.stateless_uniform([], [i, 0], maxval=380, dtype=tf.int64)
    ids = tf.random.stateless_uniform([n], [i, 1], maxval=words.shape[0], dtype=tf.int64)
    return {"text": tf.strings.reduce_join(tf.gather(words, ids), separator=" ")}

  return tf.data.Dataset.range(1_000_000).map(doc, num_parallel_calls=tf.data.AUTOTUNE)


def _throughput(src: TextSource, steps: int) -> float:
  """Tokens per second of a fresh stream over `steps` batches (the replay rate)."""
  t0 = time.perf_counter()
  src.batch(steps - 1, "train")  # a stream started again replays steps 0 .. steps - 2
  return steps * src.rows["train"] * src.width / (time.perf_counter() - t0)


if __name__ == "__main__":
  import sys

  from experiments.data.tokenizer import get_tokenizer

  _, tfds = _tf()
  spec = sys.argv[1] if len(sys.argv) > 1 else "byte"
  tokenizer = get_tokenizer(spec)
  with tfds.testing.mock_data(as_dataset_fn=_fake_documents):
    kw = dict(batch_size=64, eval_batch_size=64, seq_len=1024, shuffle_buffer=1000)
    for task in ("lm", "mlm") if tokenizer.mask_id is not None else ("lm",):
      src = TextSource("c4/en", tokenizer, task=task, **kw)
      src.batch(0)
      for steps in (20, 100):
        rate = _throughput(src, steps)
        print(f"{task}, {spec} tokenizer, {steps} steps: {rate / 1e6:.2f}M tokens/s")
