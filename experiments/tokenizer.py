"""Byte-level tokenizer: the offline default (no vocabulary files, no download)."""


class ByteTokenizer:
  """UTF-8 bytes shifted past four special ids.

  Ids: pad=0, bos=1 (doubles as [CLS]), eos=2 (doubles as [SEP]), mask=3, byte b -> b + 4.
  """

  pad_id, bos_id, eos_id, mask_id = 0, 1, 2, 3
  cls_id, sep_id = bos_id, eos_id
  n_special = 4
  vocab_size = 256 + n_special

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
