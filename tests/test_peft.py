"""PEFT (LoRA, adapters): identity at init, only adapter + head leaves train and sit in the optimizer state,
PEFT checkpoints reference their base, and the HF peft round trip (export, `peft` loads it, import back).

The model is a tiny random transformers BERT (2 layers, hidden 32) saved as an HF folder with MiniLM's tokenizer
files, fine-tuned on the first 64 SST-2 sentences of the shared GLUE copy (dev = the same 64).
"""

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bertjax.errors import UserError
from bertjax.peft import core

from test_glue_task import glue_dir, minilm_dir, tiny_config


def _tiny_hf_base(folder: Path, seed: int = 0) -> Path:
  import torch
  import transformers
  torch.manual_seed(seed)
  cfg = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=64, max_position_embeddings=64)
  transformers.BertModel(cfg).save_pretrained(folder)
  for f in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
    shutil.copy(Path(minilm_dir()) / f, folder / f)
  return folder


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
  return _tiny_hf_base(tmp_path_factory.mktemp("base") / "tiny")


@pytest.fixture(scope="module")
def sst2_64(tmp_path_factory) -> Path:
  out = tmp_path_factory.mktemp("glue")
  (out / "SST-2").mkdir()
  lines = (glue_dir() / "SST-2" / "train.tsv").read_text(encoding="utf-8").splitlines(keepends=True)[:65]
  for split in ("train", "dev"):
    (out / "SST-2" / f"{split}.tsv").write_text("".join(lines), encoding="utf-8")
  return out


def _config(data, cache_dir, base, method, **peft):
  c = tiny_config("sst2", data, cache_dir, "", num_epochs=1.0, eval_every_steps=-1, log_every_steps=2)
  c.init_from_hf, c.model.preset = str(base), ""
  c.peft.method = method
  c.peft.update(peft)
  return c


def _tiny_model(rngs_seed=0):
  from bertjax.models.bert import BertConfig
  from bertjax.models.heads import BertForSequenceClassification
  cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                   max_position_embeddings=16)
  return cfg, BertForSequenceClassification(cfg, 2, nnx.Rngs(rngs_seed))


def test_fresh_adapters_and_lora_leave_outputs_unchanged():
  from bertjax.peft import adapters
  from bertjax.artifacts.load import peft_config
  cfg, model = _tiny_model()
  ids = jnp.asarray(np.random.RandomState(0).randint(1, 50, (3, 12)))
  before, hidden = np.asarray(model(ids)), np.asarray(model.bert(ids)[0])
  full = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  # LoRA: B = 0, so the merged kernels equal the base's bit for bit; A is peft's U(+-1/sqrt(in)).
  split = core.Split(peft_config({"method": "lora", "target_modules": ["query", "value"]}), full,
                     "sequence_classification")
  trainable, frozen = split.split(full, jax.random.key(1))
  merged = split.combine(trainable, frozen)
  assert jax.tree_util.tree_all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), merged, full))
  a = np.asarray(trainable["bert"]["encoder"]["layer"][1]["attention"]["self"]["value"]["lora_A"])
  assert a.shape == (16, 8) and 0.2 < np.abs(a).max() <= 0.25 and np.abs(a).std() > 0.05
  assert len(split.lora) == 4 and {core.path_str(m)[-5:] for m in split.lora} == {"query", "value"}
  # Adapters: the zero up-projection makes each an identity.
  assert adapters.attach(model, cfg, 4, 0.0, nnx.Rngs(2)) == 4
  np.testing.assert_array_equal(np.asarray(model(ids)), before)
  np.testing.assert_array_equal(np.asarray(model.bert(ids)[0]), hidden)
  # ...and they are really applied: a non-zero up-projection changes the logits.
  up = model.bert.encoder.layer[0].output.adapter.up
  up.kernel[...] = 10 * jax.random.normal(jax.random.key(3), up.kernel.shape)  # (a constant row: LayerNorm removes)
  assert np.abs(np.asarray(model.bert(ids)[0]) - hidden).max() > 1e-3


@pytest.mark.parametrize("method, expect", [
    ("lora", r"^bert/encoder/layer/\d/attention/self/(query|value)/lora_[AB]$|^classifier/|^bert/pooler/"),
    ("adapter", r"/adapter/(down|up)/(kernel|bias)$|LayerNorm/(scale|bias)$|^classifier/|^bert/pooler/"),
])
def test_only_adapter_and_head_params_train(method, expect, sst2_64, cache_dir, base, tmp_path):
  import re

  from bertjax.train.trainer import Trainer
  trainer = Trainer(_config(sst2_64, cache_dir, base, method, adapter_size=8), str(tmp_path / "wd"))
  trainer.setup()
  state = trainer.init_state()
  names = {core.path_str(p) for p, _ in core.leaves(state.params)}
  assert names and all(re.search(expect, n) for n in names), sorted(names)
  n_layers = 2
  if method == "lora":
    assert len([n for n in names if "lora_" in n]) == 2 * 2 * n_layers  # query + value, A + B, per layer
  else:
    assert len([n for n in names if "/adapter/" in n]) == 2 * 4 * n_layers  # 2 adapters x down/up x kernel/bias
    assert not [n for n in names if n.startswith("bert/embeddings")]  # its LayerNorm stays frozen
  # The optimizer state holds Adam's two moments of the trainable leaves only, nothing base-sized.
  n_train, bytes_train = core.count(state.params)
  n_frozen, _ = core.count(trainer.frozen)
  opt_arrays = [x for x in jax.tree_util.tree_leaves(state.opt_state) if x.ndim > 0]
  assert sum(x.nbytes for x in opt_arrays) == 2 * bytes_train and len(opt_arrays) == 2 * len(names)
  assert n_frozen > 20 * n_train
  frozen_before = jax.tree.map(np.asarray, trainer.frozen)
  before = jax.tree.map(np.asarray, state.params)
  params, opt_state = state.params, state.opt_state
  for step in (3, 4):  # lr > 0; at the first step B / `up` are 0, so A / `down` get their gradient at the second
    batch = trainer.put_batch(trainer.source.batch(step))
    params, opt_state, m = trainer.train_step(params, opt_state, batch, np.int32(step), state.rng)
    assert float(m.compute()["grad_norm"]) > 0
  # Every trainable leaf moved (the gradient reached every LoRA pair / adapter); the base did not.
  changed = {core.path_str(p): not np.array_equal(np.asarray(v), before_v) for (p, v), (_, before_v)
             in zip(core.leaves(params), core.leaves(before))}
  assert all(changed.values()), [k for k, v in changed.items() if not v]
  assert jax.tree_util.tree_all(jax.tree.map(lambda a, b: np.array_equal(np.asarray(a), b), trainer.frozen,
                                             frozen_before))


@pytest.mark.slow
def test_lora_checkpoint_base_and_hf_peft_round_trip(sst2_64, cache_dir, base, tmp_path):
  from bertjax.convert import commands
  from bertjax.train import checkpoint
  from bertjax.train.trainer import train_and_evaluate
  wd = tmp_path / "wd"
  result = train_and_evaluate(_config(sst2_64, cache_dir, base, "lora"), str(wd))
  assert result["best_step"] == 4
  raw, meta = checkpoint.load_params(str(wd), merge=False)
  assert meta["peft"]["method"] == "lora" and meta["peft"]["base"]["init_from_hf"] == str(base)
  assert set(raw) == {"bert", "classifier"} and set(raw["bert"]) == {"encoder", "pooler"}  # no base copy
  merged, _ = checkpoint.load_params(str(wd))
  q = merged["bert"]["encoder"]["layer"][0]["attention"]["self"]["query"]
  assert q["kernel"].shape == (32, 32) and "lora_A" not in q
  # Export as an HF peft folder: to_hf --peft itself compares bertjax's logits with peft's (unmerged LoRA).
  out = tmp_path / "peft"
  diffs = commands.to_hf(str(wd), str(out), verify=True, peft=True, log=lambda _: None)
  assert diffs["logits"] < 1e-4, diffs
  cfg = json.loads((out / "adapter_config.json").read_text())
  assert cfg["peft_type"] == "LORA" and cfg["r"] == 8 and cfg["lora_alpha"] == 16.0 and cfg["task_type"] == "SEQ_CLS"
  assert sorted(cfg["modules_to_save"]) == ["bert.pooler.dense", "classifier"]
  from safetensors.numpy import load_file
  state = load_file(str(out / "adapter_model.safetensors"))
  a = state["base_model.model.bert.encoder.layer.1.attention.self.value.lora_A.weight"]
  b = state["base_model.model.bert.encoder.layer.1.attention.self.value.lora_B.weight"]
  assert a.shape == (8, 32) and b.shape == (32, 8) and np.abs(b).max() > 0
  np.testing.assert_array_equal(a, raw["bert"]["encoder"]["layer"][1]["attention"]["self"]["value"]["lora_A"].T)
  # Merged into a plain transformers folder (checked against transformers inside to_hf).
  assert commands.to_hf(str(wd), str(tmp_path / "merged"), verify=True, log=lambda _: None)["logits"] < 1e-4
  # Import the peft folder back onto the base: the same merged model.
  commands.from_hf_peft(str(out), str(base), str(tmp_path / "back"), log=lambda _: None)
  back, back_meta = checkpoint.load_params(str(tmp_path / "back"))
  assert back_meta["peft"]["lora_modules"] == meta["peft"]["lora_modules"]
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=0, atol=1e-6), back, merged)
  # A changed base is refused on resume and on load; a moved one on load.
  other = _tiny_hf_base(tmp_path / "other", seed=1)
  longer = _config(sst2_64, cache_dir, other, "lora")
  longer.training.num_epochs = 2.0
  with pytest.raises(UserError, match="base model differs"):
    train_and_evaluate(longer, str(wd))
  shutil.move(str(base), str(tmp_path / "moved"))
  try:
    with pytest.raises(UserError, match="is gone"):
      checkpoint.load_params(str(wd))
    shutil.copytree(other, base)
    with pytest.raises(UserError, match="differs from the one"):
      checkpoint.load_params(str(wd))
  finally:
    shutil.rmtree(base, ignore_errors=True)
    shutil.move(str(tmp_path / "moved"), str(base))


@pytest.mark.slow
def test_adapter_checkpoint_is_not_exported_to_hf(sst2_64, cache_dir, base, tmp_path):
  from bertjax.convert import commands
  from bertjax.artifacts.factory import model_from_meta
  from bertjax.train import checkpoint
  from bertjax.train.trainer import Trainer, train_and_evaluate
  c = _config(sst2_64, cache_dir, base, "adapter", adapter_size=8)
  c.training.num_epochs = 0.5  # 2 steps
  wd = tmp_path / "wd"
  result = train_and_evaluate(c, str(wd))
  params, meta = checkpoint.load_params(str(wd))
  # The merged params (base + trained leaves) rebuild the adapter model and reproduce the run's dev accuracy.
  model = model_from_meta(meta, params, dtype="float32")
  trainer = Trainer(c, str(tmp_path / "other"))
  trainer.task.prepare()
  batches = trainer.task.eval_batches()
  preds = [jax.tree.map(np.asarray, trainer.task.predict_step(model, {k: jnp.asarray(v) for k, v in b.items()}))
           for b in batches]
  assert trainer.task.compute_metrics(preds)["accuracy"] == pytest.approx(result["accuracy"], abs=1e-9)
  for peft in (False, True):
    with pytest.raises(UserError, match="Houlsby adapters"):
      commands.to_hf(str(wd), str(tmp_path / f"hf{peft}"), verify=False, peft=peft, log=lambda _: None)
  assert not (tmp_path / "hfFalse").exists()
