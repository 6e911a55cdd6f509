"""Test setup: 8 simulated CPU devices (set before jax is imported), shared tiny fixtures."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("BERTJAX_COMPILATION_CACHE", "off")  # tests never write XLA's cache under ~/.cache
# The tests run on (simulated) CPU devices; with libtpu installed (the [tpu] extra, for the compile-for-TPU checks) JAX
# would otherwise try to open a TPU in every test process. Compiling for a TPU topology works without it.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path | None:
  env = os.environ.get("BERTJAX_SHARED_DATA")
  for p in ([Path(env)] if env else []) + [REPO.parent / "shared" / "data"]:
    if p.is_dir():
      return p
  return None


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> str:
  """One bertjax cache (corpora, tokenized datasets, pairs) for the whole session."""
  return str(tmp_path_factory.mktemp("bertjax_cache"))


@pytest.fixture(scope="session")
def bbc_tokenizer(cache_dir):
  """A small WordPiece vocabulary trained on the embedded BBC News corpus, and the documents."""
  from bertjax.data import corpus, tokenizer
  docs = corpus.load_documents("bbc_news", cache_dir)
  return tokenizer.train((t for t in docs["text"]), 3000), docs


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory, cache_dir):
  """200 BBC News articles written as local .txt files (one document per file)."""
  from bertjax.data import corpus
  docs = corpus.load_documents("bbc_news", cache_dir)
  folder = tmp_path_factory.mktemp("corpus")
  for i in range(0, 2225, 11):
    (folder / f"{i:04d}.txt").write_text(docs[i]["text"])
  return str(folder)
