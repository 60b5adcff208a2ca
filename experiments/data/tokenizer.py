"""Tokenizers: bytes (the offline default: no vocabulary files, no download) or any Hugging Face
tokenizer, behind one interface (ids of the special tokens, encode / decode, batched encoding
and the classifier's [CLS] a [SEP] b [SEP] pairs).

    tokenizer = get_tokenizer("byte")               # config.data.tokenizer
    tokenizer = get_tokenizer("bert-base-uncased")  # a Hub name (online) or a local directory
"""

import os

import numpy as np


class ByteTokenizer:
  """UTF-8 bytes shifted past four special ids.

  Ids: pad=0, bos=1 (doubles as [CLS]), eos=2 (doubles as [SEP]), mask=3, byte b -> b + 4.
  """

  pad_id, bos_id, eos_id, mask_id = 0, 1, 2, 3
  cls_id, sep_id = bos_id, eos_id
  n_special = 4
  vocab_size = 256 + n_special
  special_ids = frozenset(range(n_special))

  def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
    ids = [b + self.n_special for b in text.encode("utf-8")]
    return [self.bos_id] * add_bos + ids + [self.eos_id] * add_eos

  def decode(self, ids) -> str:
    data = bytes(int(i) - self.n_special for i in ids if int(i) >= self.n_special)
    return data.decode("utf-8", errors="replace")

  def byte_id(self, char: str) -> int:
    """Token id of a single-byte character, e.g. byte_id('a') == 101."""
    (b,) = char.encode("utf-8")
    return b + self.n_special

  def encode_batch(self, texts, add_bos: bool = False, add_eos: bool = False) -> list[list[int]]:
    return [self.encode(t, add_bos, add_eos) for t in texts]

  def encode_pairs(self, texts_a, texts_b, seq_len: int) -> dict:
    """[CLS] a [SEP] (b [SEP]), the longer text truncated first to fit, padded to seq_len:
    int32 inputs, attention_mask, token_type_ids [B, seq_len]. texts_b: None for one text."""
    b_list = [None] * len(texts_a) if texts_b is None else texts_b
    out = _pad_rows(len(texts_a), seq_len, self.pad_id)
    for row, (a, b) in enumerate(zip(texts_a, b_list)):
      ids_a, ids_b = self.encode(a), [] if b is None else self.encode(b)
      budget = seq_len - (2 if b is None else 3)
      if budget < 0:
        raise ValueError(f"seq_len={seq_len} has no room for the special tokens.")
      keep_a, keep_b = _longest_first(len(ids_a), len(ids_b), budget)
      first = [self.cls_id, *ids_a[:keep_a], self.sep_id]
      second = [] if b is None else [*ids_b[:keep_b], self.sep_id]
      n = len(first) + len(second)
      out["inputs"][row, :n] = first + second
      out["attention_mask"][row, :n] = 1
      out["token_type_ids"][row, len(first) : n] = 1
    return out


def _pad_rows(rows: int, seq_len: int, pad_id: int) -> dict:
  return {
    "inputs": np.full((rows, seq_len), pad_id, np.int32),
    "attention_mask": np.zeros((rows, seq_len), np.int32),
    "token_type_ids": np.zeros((rows, seq_len), np.int32),
  }


def _longest_first(len_a: int, len_b: int, budget: int) -> tuple[int, int]:
  """How many tokens of a and b to keep: removed one at a time from the longer one."""
  if len_a + len_b <= budget:
    return len_a, len_b
  short = min(len_a, len_b)
  if short <= budget // 2:  # the shorter one fits whole
    return (short, budget - short) if len_a == short else (budget - short, short)
  return budget - budget // 2, budget // 2


class HFTokenizer:
  """A Hugging Face tokenizer (`transformers.AutoTokenizer`) with ByteTokenizer's interface.

  Ids the tokenizer lacks are None (GPT-2: no [CLS], [SEP] or [MASK]). A tokenizer without
  a pad token (GPT-2) pads with its EOS id; padded positions are masked, so the id is never
  seen. `n_special` is 0: MLM's random replacements draw from the whole vocabulary, and
  masking skips `special_ids` instead.
  """

  n_special = 0

  def __init__(self, name_or_path: str):
    try:
      import transformers
    except ImportError as e:
      raise ImportError(
        f"data.tokenizer={name_or_path!r} needs transformers: pip install -e '.[hf]'"
      ) from e
    self.name = name_or_path
    local = os.path.isabs(name_or_path) or name_or_path.startswith(".")
    if local and not os.path.isdir(name_or_path):
      raise ValueError(f"data.tokenizer={name_or_path!r}: no such directory.")
    try:
      tok = transformers.AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as e:
      raise ValueError(
        f"data.tokenizer={name_or_path!r} could not be loaded ({e}). Offline, give a local "
        "directory holding the tokenizer's files (tokenizer.save_pretrained(dir) on a "
        "machine with internet; HF_HUB_OFFLINE=1 skips the Hub's retries); online, a Hugging "
        "Face Hub name."
      ) from e
    # Documents are packed into rows of any length: no warning for long documents.
    tok.model_max_length = int(1e30)
    if tok.pad_token is None:
      tok.pad_token = tok.eos_token  # GPT-2: pads with EOS
    self.tok = tok
    self.pad_id = tok.pad_token_id
    self.bos_id, self.eos_id = tok.bos_token_id, tok.eos_token_id
    self.cls_id, self.sep_id = tok.cls_token_id, tok.sep_token_id
    self.mask_id = tok.mask_token_id
    self.vocab_size = len(tok)
    self.special_ids = frozenset(tok.all_special_ids)

  def __repr__(self):
    return f"HFTokenizer({self.name!r})"

  def _wrap(self, ids: list[int], add_bos: bool, add_eos: bool) -> list[int]:
    for flag, name in ((add_bos, "bos"), (add_eos, "eos")):
      if flag and getattr(self, f"{name}_id") is None:
        raise ValueError(f"{self} has no {name.upper()} token.")
    return [self.bos_id] * add_bos + ids + [self.eos_id] * add_eos

  def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
    return self._wrap(self.tok.encode(text, add_special_tokens=False), add_bos, add_eos)

  def encode_batch(self, texts, add_bos: bool = False, add_eos: bool = False) -> list[list[int]]:
    """Many texts in one call (the Rust tokenizer's batch path)."""
    if not len(texts):
      return []
    ids = self.tok(list(texts), add_special_tokens=False, return_attention_mask=False)
    return [self._wrap(x, add_bos, add_eos) for x in ids["input_ids"]]

  def decode(self, ids) -> str:
    """The text of `ids`, special tokens dropped (as ByteTokenizer.decode)."""
    return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)

  def encode_pairs(self, texts_a, texts_b, seq_len: int) -> dict:
    """The tokenizer's own single / pair template (BERT: [CLS] a [SEP] b [SEP] with token
    types 0 / 1), truncated longest first and padded to seq_len: int32 inputs,
    attention_mask, token_type_ids [B, seq_len]. texts_b: None for one text."""
    enc = self.tok(
      list(texts_a),
      None if texts_b is None else list(texts_b),
      truncation=True,
      max_length=seq_len,
      padding="max_length",
      return_attention_mask=True,
      return_token_type_ids=True,
      return_tensors="np",
    )
    return {
      "inputs": enc["input_ids"].astype(np.int32),
      "attention_mask": enc["attention_mask"].astype(np.int32),
      "token_type_ids": enc["token_type_ids"].astype(np.int32),
    }


def get_tokenizer(spec: str):
  """ "byte" -> ByteTokenizer(); anything else -> HFTokenizer(spec) (a local directory, or a
  Hub name when online)."""
  return ByteTokenizer() if spec == "byte" else HFTokenizer(spec)
