"""Library API for starting bertjax models from Hugging Face weights or bertjax checkpoints.

    cfg, hf_state, tok_dir = load_pretrained("bert-base-uncased")       # or a local folder
    model = build_model(cfg, head, num_labels)                          # any head, any dtype
    params, report = init_params(nnx.to_pure_dict(nnx.state(model, nnx.Param)), hf_state)
    for line in report.lines(): logging.info(line)

Keys the source lacks keep the template's values (listed in `report.fresh`); an abstract template
(`nnx.eval_shape`) gets BERT's init in numpy for them instead. Returned leaves are numpy arrays in the template's
dtype (or the template's own arrays for fresh keys); place/shard them as you like.

The code lives in the bottom layer `bertjax.artifacts` (`weights`: HF folders, `load`: bertjax checkpoints,
`factory`: models from configs and checkpoint meta); this module gathers the user-facing functions in one import.
"""

from bertjax.artifacts.factory import CLASSIFIER_HEADS, abstract_params, build_model, config_from_meta, model_from_meta
from bertjax.artifacts.load import init_from_checkpoint, load_params
from bertjax.artifacts.weights import LoadReport, init_from_hf, init_params, load_pretrained, read_config, tokenizer_dir

__all__ = ["CLASSIFIER_HEADS", "LoadReport", "abstract_params", "build_model", "config_from_meta", "init_from_checkpoint", "init_from_hf",
           "init_params", "load_params", "load_pretrained", "model_from_meta", "read_config",
           "tokenizer_dir"]
