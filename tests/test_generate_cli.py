"""experiments/generate.py: the CLI over models.generate, called in-process on the session's
tiny trained LM (tests/conftest.py `tiny_lm_run`) and on a tiny random HF GPT-2 with a
word-level tokenizer built offline."""

import json
import os

import jax
import numpy as np
import pytest

import models
import parallel
from experiments import generate as cli, tasks
from experiments.experiment import build


def _json_rows(capsys):
  return [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]


def test_run_prompt_ids_json_equals_models_generate(tiny_lm_run, capsys):
  workdir, config, _ = tiny_lm_run
  prompts = ["1 2 3", "4 5"]
  argv = ["--workdir", str(workdir), "--max_new_tokens", "8", "--json"]
  for p in prompts:
    argv += ["--prompt_ids", p]
  cli.main(argv)
  rows = _json_rows(capsys)
  assert [r["prompt"] for r in rows] == [[1, 2, 3], [4, 5]]
  assert all(len(r["tokens"]) == 8 and len(r["logprobs"]) == 8 for r in rows)

  exp = build(config, None, jax.devices()[:1])
  abstract, _ = exp.shard_shapes()
  with parallel.Checkpointer(os.path.join(str(workdir), "checkpoints")) as ckpt:
    state, _ = ckpt.restore_latest(abstract)
  ids = np.array([[1, 2, 3], [4, 5, 0]], np.int32)
  mask = np.array([[1, 1, 1], [1, 1, 0]], np.int32)
  want, _ = models.generate(exp.model, {"params": state["params"]}, ids, mask, max_new_tokens=8)
  np.testing.assert_array_equal(np.array([r["tokens"] for r in rows]), np.asarray(want))


def test_sharded_mesh_equals_one_device(tiny_lm_run, capsys):
  """--mesh 2,4 (data 2 x tensor 4 on 8 CPU devices): the same tokens as one device, the
  parameters sharded over tensor."""
  workdir, _, _ = tiny_lm_run
  argv = ["--workdir", str(workdir), "--max_new_tokens", "8", "--json"]
  argv += ["--prompt_ids", "1 2 3", "--prompt_ids", "4 5"]
  cli.main(argv)
  one = _json_rows(capsys)
  cli.main(argv + ["--mesh", "2,4"])
  sharded = _json_rows(capsys)
  assert [r["tokens"] for r in sharded] == [r["tokens"] for r in one]
  np.testing.assert_allclose(
    [r["logprobs"] for r in sharded], [r["logprobs"] for r in one], atol=1e-5
  )
  model, variables, _ = cli.load_run(str(workdir))
  mesh, rules = cli.mesh_of("2,4", 2)
  placed = cli.place(model, variables, mesh, rules)
  specs = {str(x.sharding.spec) for x in jax.tree.leaves(placed)}
  assert any("tensor" in s for s in specs), specs
  with pytest.raises(SystemExit, match="FATAL: --mesh 2,4: 3 prompts do not split over data=2"):
    cli.main(argv + ["--prompt_ids", "6", "--mesh", "2,4"])
  with pytest.raises(SystemExit, match="FATAL: --mesh 4,4: needs 16 devices, 8 here"):
    cli.main(argv + ["--mesh", "4,4"])


def test_bad_input_is_one_line(tiny_lm_run, tmp_path):
  workdir, _, _ = tiny_lm_run
  with pytest.raises(SystemExit, match="FATAL: .*--prompt_ids"):
    cli.main(["--workdir", str(workdir), "--prompt_ids", "1 x"])
  with pytest.raises(SystemExit, match="FATAL: .*config.json"):
    cli.main(["--workdir", str(tmp_path), "--prompt_ids", "1"])
  with pytest.raises(SystemExit, match="FATAL: .*exactly one"):
    cli.main(["--prompt_ids", "1"])


@pytest.fixture(scope="module")
def hf_gpt2(tmp_path_factory):
  """A tiny random GPT-2 and a word-level tokenizer over its vocabulary, saved to one dir."""
  transformers = pytest.importorskip("transformers")
  tokenizers = pytest.importorskip("tokenizers")
  words = ["<eos>", "<unk>"] + [f"w{i}" for i in range(62)]
  vocab = {w: i for i, w in enumerate(words)}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
  tok.decoder = tokenizers.decoders.WordPiece(prefix="##")  # joins words with spaces
  fast = transformers.PreTrainedTokenizerFast(
    tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>"
  )
  model = transformers.GPT2LMHeadModel(
    transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64)
  )
  directory = str(tmp_path_factory.mktemp("gpt2"))
  model.save_pretrained(directory)
  fast.save_pretrained(directory)
  return directory


def test_hf_text_prompt(hf_gpt2, capsys):
  rows = cli.main(
    ["--init_from", f"hf:{hf_gpt2}", "--prompt", "w1 w2 w3", "--prompt", "w5",
     "--max_new_tokens", "6", "--json"]
  )  # fmt: skip
  assert _json_rows(capsys) == rows
  assert [len(r["tokens"]) for r in rows] == [6, 6]
  model, params = models.hf.from_pretrained(hf_gpt2)
  ids = np.array([[3, 4, 5], [7, 0, 0]], np.int32)
  mask = np.array([[1, 1, 1], [1, 0, 0]], np.int32)
  want, _ = models.generate(model, {"params": params}, ids, mask, max_new_tokens=6)
  np.testing.assert_array_equal(np.array([r["tokens"] for r in rows]), np.asarray(want))
  for r in rows:
    assert r["text"].split() == [f"w{t - 2}" for t in r["tokens"] if t >= 2]
  # Sampling runs too, and plain output prints the prompt and its continuation.
  cli.main(["--init_from", f"hf:{hf_gpt2}", "--prompt", "w1", "--max_new_tokens", "3",
            "--temperature", "0.8", "--top_k", "5", "--top_p", "0.9"])  # fmt: skip
  assert capsys.readouterr().out.startswith("w1 => ")


def test_quantized_export_with_text_prompt(tiny_lm_run, tmp_path, capsys):
  """A PTQ run of the tiny LM (as tests/test_quant_train.py makes one): its integer export
  served through --export, the prompt as text of the synthetic language's alphabet."""
  from compress import quant
  from experiments import train
  from experiments.configs import quant as quant_configs

  float_dir, _, _ = tiny_lm_run
  c = quant_configs.get_config("ptq")
  del c.pretrain
  c.init_from = str(float_dir)
  c.eval.update(steps=1)
  c.quant.calib_batches = 1
  train.train_and_evaluate(c, str(tmp_path), jax.devices()[:1])
  export = str(tmp_path / "export")
  argv = ["--workdir", str(tmp_path), "--export", export, "--prompt", "abc", "--max_new_tokens"]
  (row,) = cli.main(argv + ["5", "--json"])
  assert _json_rows(capsys) == [row] and len(row["tokens"]) == 5 and isinstance(row["text"], str)

  exp = build(c, None, jax.devices()[:1])
  tok = cli.SymbolTokenizer(tasks.markov_source(c))
  ids = np.array([tok.encode("abc")], np.int32)
  want, _ = models.generate(exp.model_in("serve"), quant.load(export), ids, max_new_tokens=5)
  assert row["tokens"] == np.asarray(want)[0].tolist()
  with pytest.raises(SystemExit, match="FATAL: .*alphabet"):
    cli.main(argv + ["5", "--prompt", "a!"])
  with pytest.raises(SystemExit, match="FATAL: .*no quantization"):
    cli.main(["--workdir", str(float_dir), "--export", export, "--prompt", "a"])
