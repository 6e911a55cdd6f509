"""`bertjax.prune`: pruned layers shrink and compute what the masked full model computes; importance is the
per-example |d loss / d head mask|; the CLI writes a checkpoint that predict, load_params and to_hf take.

Models are tiny (2 layers, hidden 32, 4 heads of 8) with random parameters (std 0.5, so heads differ).
"""

import json
import os

import numpy as np
import pytest

from test_glue_task import glue_dir, minilm_dir, tiny_config

SENTENCES = ["a gripping , beautifully shot film", "dull", "the plot never finds its footing", "fine !"]


def tiny_cfg(**kw):
  from bertjax.models.bert import BertConfig
  return BertConfig(**{**dict(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                              intermediate_size=64, max_position_embeddings=64), **kw})


def random_params(cfg, head="sequence_classification", n=2, seed=0):
  import jax
  from bertjax.convert import hf
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: rng.normal(0, 0.5, s.shape).astype(np.float32), hf.abstract_params(cfg, head, n))


def masked(model, kept, heads):
  """`model` with every head outside `kept` masked to 0 (the full-shape reference of a pruned model)."""
  import jax.numpy as jnp
  from bertjax import prune
  for att, k in zip(prune.attention_layers(model), kept):
    att.head_mask = jnp.zeros(heads).at[jnp.asarray(k, jnp.int32)].set(1.0)
  return model


def batch(rows=3, t=12, seed=1):
  rng = np.random.default_rng(seed)
  ids = rng.integers(1000, 30000, (rows, t)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[1, t // 2:] = 0
  return ids, np.zeros_like(ids), mask


def test_pruned_model_shrinks_and_equals_masked_full_model():
  import jax
  from bertjax import prune
  from bertjax.convert import hf
  from bertjax.errors import UserError
  cfg = tiny_cfg()
  params = random_params(cfg)
  kept = [[1, 3], [2]]
  small_params, small_cfg = prune.prune_params(params, cfg, kept)
  assert small_cfg.heads_per_layer == (2, 1)
  layer = lambda p, i: p["bert"]["encoder"]["layer"][i]["attention"]
  assert layer(small_params, 0)["self"]["query"]["kernel"].shape == (32, 16)
  assert layer(small_params, 1)["self"]["value"]["bias"].shape == (8,)
  assert layer(small_params, 1)["output"]["dense"]["kernel"].shape == (8, 32)
  # 5 of 8 heads gone: 3 x (32 x 8 + 8) q/k/v + 8 x 32 output rows each
  assert prune.count_params(params) - prune.count_params(small_params) == 5 * (3 * (32 * 8 + 8) + 8 * 32)
  small = hf.build_model(small_cfg, "sequence_classification", 2, small_params)
  assert [a.query.kernel.shape for a in prune.attention_layers(small)] == [(32, 16), (32, 8)]
  full = masked(hf.build_model(cfg, "sequence_classification", 2, params), kept, 4)
  ids, types, mask = batch()
  want, got = np.asarray(full(ids, types, mask)), np.asarray(small(ids, types, mask))
  unmasked = np.asarray(hf.build_model(cfg, "sequence_classification", 2, params)(ids, types, mask))
  assert np.abs(got - want).max() <= 1e-5 and np.abs(unmasked - want).max() > 1e-2
  # the pruned params really are what a pruned config builds (jit path too)
  jitted = jax.jit(lambda p: hf.build_model(small_cfg, "sequence_classification", 2, p)(ids, types, mask))
  assert np.abs(np.asarray(jitted(small_params)) - want).max() <= 1e-5
  with pytest.raises(UserError, match=r"heads_per_layer\[1\]=0 .*at least one attention head"):
    tiny_cfg(heads_per_layer=(2, 0))
  with pytest.raises(UserError, match="scan_layers=True needs layers of one shape"):
    tiny_cfg(heads_per_layer=[2, 1], scan_layers=True)
  assert tiny_cfg(heads_per_layer=[3, 3], scan_layers=True).heads_per_layer == (3, 3)  # equal layers still scan
  with pytest.raises(UserError, match="has 1 entries"):
    tiny_cfg(heads_per_layer=(2,))


def test_importance_is_per_example_abs_gradient_and_dead_head_scores_zero():
  import jax.numpy as jnp
  import optax
  from bertjax import prune
  from bertjax.convert import hf
  cfg = tiny_cfg()
  params = random_params(cfg, seed=3)
  # layer 1 head 2: zero value columns, so its output is 0 whatever the mask: a useless head
  v = params["bert"]["encoder"]["layer"][1]["attention"]["self"]["value"]
  v["kernel"][:, 16:24], v["bias"][16:24] = 0.0, 0.0
  model = hf.build_model(cfg, "sequence_classification", 2, params)
  ids, types, mask = batch(rows=4, seed=5)
  labels = np.array([0, 1, 1, 0])

  def loss(m, b):
    logits = m(b["input_ids"], b["token_type_ids"], b["attention_mask"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, b["labels"]).mean()

  both = {"input_ids": ids, "token_type_ids": types, "attention_mask": mask, "labels": labels}
  got = prune.head_importance(model, loss, [both])
  # reference: one example at a time, |gradient of its own loss| / 4 (the batch mean's weight), summed
  ref = [np.zeros(4), np.zeros(4)]
  for r in range(4):
    one = {k: val[r:r + 1] for k, val in both.items()}
    for layer, g in enumerate(prune.head_importance(model, loss, [one])):
      ref[layer] += g / 4
  for g, want in zip(got, ref):
    np.testing.assert_allclose(g, want, rtol=1e-4, atol=1e-9)
  assert got[1][2] == 0.0 and min(x for layer in got for x in layer if x != got[1][2]) > 1e-4
  scores = prune.normalise(got)
  np.testing.assert_allclose([np.linalg.norm(s) for s in scores], [1.0, 1.0], rtol=1e-9)
  assert prune.choose_kept(scores, 1) == [[0, 1, 2, 3], [0, 1, 3]]
  assert prune.choose_kept([np.array([0.1, 0.9]), np.array([0.0])], 2) == [[1], [0]]  # never a layer's last head
  assert jnp.asarray(got[0]).shape == (4,)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, cache_dir):
  """A fine-tuning workdir as training leaves it (tiny random model, SST-2 config, tokenizer, config.json)."""
  from bertjax.data import tokenizer as toklib
  from bertjax.train import checkpoint
  src, root = glue_dir(), tmp_path_factory.mktemp("prune")
  (root / "glue" / "SST-2").mkdir(parents=True)
  for split in ("train", "dev"):
    lines = (src / "SST-2" / "train.tsv").read_text(encoding="utf-8").splitlines(keepends=True)
    (root / "glue" / "SST-2" / f"{split}.tsv").write_text("".join(lines[:65]), encoding="utf-8")
  c = tiny_config("sst2", root / "glue", cache_dir, minilm_dir(), num_train_steps=2, eval_every_steps=2)
  c.init_from_hf = minilm_dir()  # as a real run records it; prune must not need it
  wd = root / "wd"
  cfg = tiny_cfg()
  meta = checkpoint.model_meta(cfg, "sequence_classification", num_labels=2, label_names=["0", "1"], task="glue")
  checkpoint.save_params(str(wd), 7, random_params(cfg, seed=11), meta)
  toklib.save(toklib.load(minilm_dir()), str(wd / "tokenizer"))
  (wd / "config.json").write_text(c.to_json_best_effort(), encoding="utf-8")
  return wd


def test_prune_cli_predict_and_to_hf_parity(workdir, tmp_path):
  from bertjax import predict, prune
  from bertjax.convert import hf
  from bertjax.convert.commands import to_hf
  from bertjax.train import checkpoint
  out = tmp_path / "p50"
  assert prune.main([f"--checkpoint={workdir}", f"--out={out}", "--prune_heads=0.5", "--num_examples=40"]) == 0
  report = json.loads((out / "prune.json").read_text())
  assert report["heads_removed"] == 4 and sum(report["heads_per_layer"]) == 4
  assert report["examples_scored"] == 48  # 3 batches of 16
  params, meta = checkpoint.load_params(str(out))
  cfg = hf.config_from_meta(meta)
  assert cfg.heads_per_layer == tuple(report["heads_per_layer"]) and meta["head"] == "sequence_classification"
  assert sorted(os.listdir(out)) == ["checkpoints", "config.json", "prune.json", "tokenizer"]
  assert os.listdir(out / "checkpoints") == ["0"]
  kept = report["kept_heads"]
  # the kept heads are the top of the recorded (per-layer normalised) scores
  assert kept == prune.choose_kept([np.array(s) for s in report["importance"]], 4)
  assert [np.linalg.norm(s) for s in report["importance"]] == pytest.approx([1.0, 1.0], abs=1e-5)

  # predict on the pruned checkpoint == the full model with the removed heads masked to 0
  full_params, full_meta = checkpoint.load_params(str(workdir))
  ref = masked(hf.build_model(hf.config_from_meta(full_meta), "sequence_classification", 2, full_params), kept, 4)
  p = predict.Predictor.from_checkpoint(str(out), batch_size=4)
  from bertjax.data import glue
  feats = glue.encode_pairs(p.tokenizer, SENTENCES, None, p.max_seq_length)
  want = np.asarray(ref(feats["input_ids"], feats["token_type_ids"], feats["attention_mask"]))
  got = np.stack(p.run(feats))
  assert np.abs(got - want).max() <= 1e-5
  assert [o["label"] for o in p(SENTENCES)] == [str(i) for i in want.argmax(-1)]

  # to_hf: full shape, removed heads zero, transformers reproduces the pruned model
  diffs = to_hf(str(out), str(tmp_path / "hf"), verify=True, log=lambda s: None)
  assert max(diffs.values()) <= 1e-4 and "logits" in diffs
  hf_cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
  assert "heads_per_layer" not in hf_cfg and hf_cfg["num_attention_heads"] == 4
  from safetensors.numpy import load_file
  state = load_file(str(tmp_path / "hf" / "model.safetensors"))
  for i, k in enumerate(kept):
    q = state[f"bert.encoder.layer.{i}.attention.self.query.weight"]  # [out, in]
    removed = [h for h in range(4) if h not in k]
    assert q.shape == (32, 32) and all(not q[h * 8:(h + 1) * 8].any() for h in removed)
    assert all(q[h * 8:(h + 1) * 8].any() for h in k)


def test_prune_cli_errors_leave_out_untouched(workdir, tmp_path, capsys):
  from bertjax import prune
  out = tmp_path / "out"
  out.mkdir()
  for bad, why in (("-0.1", "must be a fraction"), ("1", "must be a fraction"), ("1.5", "must be a fraction"),
                   ("0.9", "every layer keeps at least one")):
    assert prune.main([f"--checkpoint={workdir}", f"--out={out}", f"--prune_heads={bad}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("bertjax.prune: error: ") and why in err and "\n" not in err
    assert os.listdir(out) == []
  (out / "keep.txt").write_text("x")
  assert prune.main([f"--checkpoint={workdir}", f"--out={out}", "--prune_heads=0.25"]) == 2
  assert "not an empty folder" in capsys.readouterr().err and os.listdir(out) == ["keep.txt"]


@pytest.mark.slow
def test_prune_with_recovery_runs_the_trainer(workdir, tmp_path):
  from bertjax import predict, prune
  from bertjax.train import checkpoint
  out = tmp_path / "p25r"
  report = prune.prune(str(workdir), str(out), 0.25, num_examples=16, recover_steps=2, log=lambda s: None)
  assert report["heads_removed"] == 2 and report["recovery"]["steps"] == 2
  assert os.path.isdir(out / "pruned" / "checkpoints" / "0") and os.path.isdir(out / "checkpoints" / "2")
  params, meta = checkpoint.load_params(str(out / "checkpoints" / "2"))
  assert tuple(meta["model_config"]["heads_per_layer"]) == tuple(report["heads_per_layer"])
  before, _ = checkpoint.load_params(str(out / "pruned"))
  q = lambda p: p["bert"]["encoder"]["layer"][0]["attention"]["self"]["query"]["kernel"]
  assert q(params).shape == q(before).shape and np.abs(q(params) - q(before)).max() > 0  # it trained
  assert len(predict.Predictor.from_checkpoint(str(out))(SENTENCES)) == 4
