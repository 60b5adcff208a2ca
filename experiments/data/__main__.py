"""The synthetic source: speed, entropy rate, baselines and a sample.

python -m experiments.data
"""

import time

import numpy as np

from experiments.data.encoder import ClassifySource
from experiments.data.markov import TOKENIZER, MarkovSource


def _tokens_per_second(fn, tokens, min_time=1.0):
  fn(0)  # warm-up
  t0, step = time.perf_counter(), 1
  while time.perf_counter() - t0 < min_time:
    fn(step)
    step += 1
  return tokens * (step - 1) / (time.perf_counter() - t0)


if __name__ == "__main__":
  t0 = time.perf_counter()
  src = MarkovSource()
  print(
    f"MarkovSource(n_symbols={src.n_symbols}, order={src.order}): "
    f"{src.n_contexts} x {src.n_symbols} table, built in {time.perf_counter() - t0:.2f}s"
  )
  for b, L in [(64, 128), (256, 128), (64, 256), (256, 256)]:
    tps = _tokens_per_second(lambda s: src.batch(s, b, L), b * L)
    print(f"  batch {b:3d} x seq {L:3d}: {tps / 1e6:5.2f}M tokens/s")
  print(f"uniform loss   ln({src.n_symbols}) = {np.log(src.n_symbols):.4f} nats/token")
  print(f"unigram loss   {src.unigram_loss:.4f}")
  print(f"bigram loss    {src.bigram_loss:.4f}")
  print(f"entropy rate   {src.entropy_rate:.4f}")
  print(f"optimal_loss(128) = {src.optimal_loss(128):.4f}")
  print("sample:", repr(TOKENIZER.decode(src.batch(0, 1, 100)["inputs"][0])))

  cls_src = ClassifySource(src)
  cb = cls_src.batch(0, 256, 128)
  tps = _tokens_per_second(lambda s: cls_src.batch(s, 256, 128), 256 * 128)
  print(
    f"ClassifySource: bayes_accuracy {cls_src.bayes_accuracy:.2f}, "
    f"batch 256 x 128: {tps / 1e6:.2f}M tokens/s, label balance {cb['label'].mean():.2f}"
  )
  for row in range(2):
    print(f"  label {cb['label'][row]}:", repr(TOKENIZER.decode(cb["inputs"][row])))
