"""Model weights into a params tree: Hugging Face folders (and the policy every loader shares).

    cfg, hf_state, tok_dir = load_pretrained("bert-base-uncased")       # or a local folder
    model = HEADS[head](cfg, ...)                                      # any head, any dtype
    params, report = init_params(nnx.to_pure_dict(nnx.state(model, nnx.Param)), hf_state)
    for line in report.lines(): logging.info(line)

Keys the source lacks keep the template's values (listed in `report.fresh`); an abstract template
(`nnx.eval_shape`) gets BERT's init in numpy for them instead. Returned leaves are numpy arrays in the template's
dtype (or the template's own arrays for fresh keys); place/shard them as you like.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np

from bertjax.artifacts import hf_io
from bertjax.artifacts.mapping import ARCHITECTURE_HEAD, canonical_hf_state, flatten, hf_key, unflatten
from bertjax.errors import UserError
from bertjax.models.bert import BertConfig

# Task output layers whose shape depends on the task: a shape change re-initialises them instead of failing.
_TASK_LAYERS = ("classifier", "qa_outputs", "cls.seq_relationship")
# Parameters that must come from the source: without them it is not a trained BERT encoder.
_REQUIRED = ("bert.embeddings.", "bert.encoder.")
# config field a mismatching key most likely points at.
_SHAPE_HINTS = (("word_embeddings", "vocab_size"), ("predictions.bias", "vocab_size"),
                ("position_embeddings", "max_position_embeddings"), ("token_type_embeddings", "type_vocab_size"),
                ("intermediate", "intermediate_size"), ("attention.", "hidden_size / heads_per_layer"),
                ("output.dense.weight", "intermediate_size"))


@dataclasses.dataclass
class LoadReport:
  """What `init_params` / `init_from_checkpoint` did, by transformers key name."""

  loaded: list[str] = dataclasses.field(default_factory=list)
  fresh: list[str] = dataclasses.field(default_factory=list)  # kept the template's (fresh) init
  unused: list[str] = dataclasses.field(default_factory=list)  # source keys the model has no place for
  notes: list[str] = dataclasses.field(default_factory=list)

  def get(self, key: str, default: Any = None) -> Any:  # dict-style access: report.get("fresh", [])
    return getattr(self, key, default)

  def __getitem__(self, key: str) -> Any:
    return getattr(self, key)

  def lines(self) -> list[str]:
    out = [f"loaded {len(self.loaded)} tensors", *self.notes]
    if self.fresh:
      out.append(f"initialised fresh ({len(self.fresh)}): {', '.join(self.fresh)}")
    if self.unused:
      out.append(f"unused source keys ({len(self.unused)}): {', '.join(self.unused)}")
    return out


def load_pretrained(name_or_path: str) -> tuple[BertConfig, dict[str, np.ndarray], str | None]:
  """A HF BERT folder or hub name -> (BertConfig, raw HF state dict as numpy, folder with tokenizer or None)."""
  folder = hf_io.resolve_source(name_or_path)
  cfg, _ = hf_io.read_config(folder)
  state, _ = hf_io.read_weights(folder)
  return cfg, state, (folder if hf_io.has_tokenizer(folder) else None)


def read_config(name_or_path: str) -> BertConfig:
  """The bertjax BertConfig of a HF BERT folder or hub name."""
  return hf_io.read_config(hf_io.resolve_source(name_or_path))[0]


def tokenizer_dir(name_or_path: str) -> str | None:
  """The folder holding the source's vocab.txt / tokenizer.json (None without one). To get a complete
  vocab.txt + tokenizer.json + configs into a workdir: `export_tokenizer(folder, f"{workdir}/tokenizer")`."""
  folder = hf_io.resolve_source(name_or_path)
  return folder if hf_io.has_tokenizer(folder) else None


export_tokenizer = hf_io.export_tokenizer


def detect_head(hf_config: Mapping[str, Any], hf_state: Mapping[str, Any]) -> str:
  """The bertjax head matching the source: config `architectures` first, else the head keys present."""
  for arch in hf_config.get("architectures") or []:
    if arch in ARCHITECTURE_HEAD:
      return ARCHITECTURE_HEAD[arch]
  keys = canonical_hf_state(hf_state)[0].keys()
  has = lambda prefix: any(k.startswith(prefix) for k in keys)
  if has("qa_outputs."):
    return "question_answering"
  if has("classifier."):  # BertForTokenClassification has no pooler
    return "sequence_classification" if has("bert.pooler.") else "token_classification"
  if has("cls.predictions.") and not has("cls.seq_relationship."):
    return "masked_lm"
  return "pretraining"


def _hint(key: str) -> str:
  for part, field in _SHAPE_HINTS:
    if part in key:
      return field
  return "hidden_size"


def fresh_value(path: tuple, like: Any, rng: np.random.Generator, initializer_range: float = 0.02) -> np.ndarray:
  """BERT's init for one leaf, in numpy: normal(initializer_range) kernels/embeddings, LayerNorm scale 1, biases 0."""
  shape, dtype = tuple(like.shape), np.dtype(like.dtype)
  if path[-1] in ("kernel", "embedding"):
    return rng.normal(0.0, initializer_range, shape).astype(dtype)
  return (np.ones if path[-1] == "scale" else np.zeros)(shape, dtype)


def plan_loading(template: Mapping[Any, Any], source: Mapping[tuple, Any], what: str, transpose: bool,
          head: str | None) -> tuple[dict, LoadReport, set]:
  """Which source leaf fills each template path (None: keep the template's / fresh init); policy shared by every
  loader. Looks at shapes only, so sources may be lazy (memory maps, checkpoint metadata)."""
  report, plan, used = LoadReport(), {}, set()
  for path, init in flatten(template).items():
    key = hf_key(path)
    if path not in source:
      report.fresh.append(key)
      plan[path] = None
      continue
    used.add(path)
    shape = tuple(source[path].shape)
    if transpose and path[-1] == "kernel":
      shape = shape[::-1]
    want = tuple(init.shape)
    if shape != want:
      if key.startswith(_TASK_LAYERS):
        report.notes.append(f"{key}: shape {shape} in {what} != {want} in the model (different label "
                            "count); initialised fresh")
        report.fresh.append(key)
        plan[path] = None
        continue
      raise UserError(f"{key}: shape {shape} in {what} != {want} expected from the model config "
                      f"(check {_hint(key)}); make the config match the weights")
    plan[path] = source[path]
    report.loaded.append(key)
  missing = [k for k in report.fresh if k.startswith(_REQUIRED) and ".adapter." not in k]  # adapters start fresh
  if missing:
    for_head = f" for head {head!r}" if head else ""
    raise UserError(f"{what} lacks {len(missing)} encoder weights{for_head}, e.g. {missing[0]}: not a complete "
                    "BERT checkpoint, or its num_hidden_layers/layout differs")
  return plan, report, used


def read_leaf(src: Any, path: tuple, transpose: bool, dtype: Any, index: tuple = ()) -> np.ndarray:
  """`src[index]` of the template-layout leaf at `path` (source kernels are [out, in] when `transpose`)."""
  if transpose and path[-1] == "kernel":
    return np.ascontiguousarray(np.asarray(src[tuple(index)[::-1]]).T.astype(dtype))
  return np.ascontiguousarray(np.asarray(src[tuple(index)]).astype(dtype))


def fill(template: Mapping[Any, Any], source: Mapping[tuple, Any], what: str, transpose: bool,
          head: str | None, seed: int, initializer_range: float) -> tuple[dict, LoadReport, set]:
  """Copy `source` leaves (by template path) into the template as numpy arrays."""
  plan, report, used = plan_loading(template, source, what, transpose, head)
  rng, out = np.random.default_rng(seed), {}
  for path, init in flatten(template).items():
    src = plan[path]
    if src is not None:
      out[path] = read_leaf(src, path, transpose, init.dtype if hasattr(init, "dtype") else np.asarray(src).dtype)
    else:  # the template's value, or BERT's init when the template is abstract
      out[path] = init if hasattr(init, "__array__") else fresh_value(path, init, rng, initializer_range)
  return unflatten(out), report, used


def wrap(template: Mapping[Any, Any]) -> tuple[Mapping[Any, Any], bool]:
  """A bare `BertModel` tree (embeddings/encoder/pooler) is matched as `bert.*`."""
  bare = "bert" not in template and "embeddings" in template
  return ({"bert": template} if bare else template), bare


def _check_layers(template: Mapping[Any, Any], state: Mapping[str, Any]) -> None:
  """Encoder layers beyond the config's num_hidden_layers mean config and weights disagree."""
  n = len(template["bert"]["encoder"]["layer"])
  extra = sorted({int(k.split(".")[3]) for k in state if k.startswith("bert.encoder.layer.")} - set(range(n)))
  if extra:
    raise UserError(f"the HF weights have {n + len(extra)} encoder layers (e.g. bert.encoder.layer.{extra[0]}) but "
                    f"the model config has num_hidden_layers={n}; make the config match the weights")


def init_params(template_params: Mapping[Any, Any], hf_state: Mapping[str, Any], head: str | None = None, *,
                seed: int = 0, initializer_range: float = 0.02) -> tuple[dict, LoadReport]:
  """Fill a bertjax pure-dict params tree (any head, or a bare BertModel) from an HF BERT state dict.

  Accepts every `BertFor*` / `BertModel` layout (with or without `bert.`). Heads missing from the source keep
  the template's init; task layers (classifier, qa_outputs, seq_relationship) whose shape differs are
  re-initialised; any other shape mismatch or a missing encoder tensor raises UserError. `head` only names the
  target in messages. Template leaves may be arrays (fresh keys keep them) or abstract `jax.ShapeDtypeStruct`s
  (from `nnx.eval_shape`; fresh keys then get `fresh_value`, seeded by `seed`).
  """
  template, bare, state, by_path, notes = hf_source(template_params, hf_state)
  params, report, used = fill(template, by_path, "the HF weights", True, head, seed, initializer_range)
  hf_report(report, state, used, notes)
  return (params["bert"] if bare else params), report


def hf_source(template_params: Mapping[Any, Any], hf_state: Mapping[str, Any]):
  """(template as `bert.*`, whether it was bare, canonical state, {template path: source leaf}, notes)."""
  state, notes = canonical_hf_state(hf_state)
  if "bert.embeddings.word_embeddings.weight" not in state:
    raise UserError("no BERT encoder in the HF weights (expected embeddings.word_embeddings.weight, with or "
                    f"without 'bert.'; keys look like {next(iter(hf_state), 'nothing')!r})")
  template, bare = wrap(template_params)
  _check_layers(template, state)
  by_path = {path: state[hf_key(path)] for path in flatten(template) if hf_key(path) in state}
  return template, bare, state, by_path, notes


def hf_report(report: LoadReport, state: Mapping[str, Any], used: set, notes: list[str]) -> None:
  used_keys = {hf_key(p) for p in used}
  report.unused = sorted(k for k in state if k not in used_keys)
  dtype = lambda v: np.dtype(v.dtype) if hasattr(v, "dtype") else np.asarray(v).dtype
  dtypes = sorted({str(dtype(state[k])) for k in used_keys} - {"float32"})
  if dtypes:
    notes.append(f"source weights are {'/'.join(dtypes)}; converted to the model's float32")
  report.notes[:0] = notes


def init_from_hf(template_params: Mapping[Any, Any], name_or_path: str, head: str | None = None, *,
                 seed: int = 0) -> tuple[dict, LoadReport]:
  """`load_pretrained` + `init_params` in one call (fresh keys use the source's initializer_range)."""
  cfg, state, _ = load_pretrained(name_or_path)
  return init_params(template_params, state, head, seed=seed, initializer_range=cfg.initializer_range)


_ARCH_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                "hidden_act", "max_position_embeddings", "type_vocab_size", "layer_norm_eps")


def check_architecture(step_dir: str, meta: Mapping[str, Any], cfg: BertConfig | None) -> dict:
  """The checkpoint's saved model config, after checking it matches `cfg` (when given)."""
  saved = meta.get("model_config") or {}
  if cfg is not None:
    diff = [f"{k}={saved[k]!r} (checkpoint) vs {getattr(cfg, k)!r}" for k in _ARCH_FIELDS
            if k in saved and saved[k] != getattr(cfg, k)]
    if diff:
      raise UserError(f"checkpoint {step_dir} has a different architecture: {'; '.join(diff)}; set the model "
                      "config to match it")
  return saved


def checkpoint_report(report: LoadReport, step_dir: str, meta: Mapping[str, Any], source: Mapping[tuple, Any],
                      used: set) -> None:
  report.unused = sorted(hf_key(p) for p in source if p not in used)
  report.notes.insert(0, f"from {step_dir} (head {meta.get('head')!r})")
