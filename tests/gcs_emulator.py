"""A local GCS emulator for tests: `gcp-storage-emulator` (PyPI) with object generations the way GCS reports them.

    python tests/gcs_emulator.py --port 9023 --bucket bertjax-test    # in-memory, until killed

Point the clients at it:
    STORAGE_EMULATOR_HOST=http://127.0.0.1:9023        gcsfs / etils.epath (corpus, config.json, TensorBoard)
    TENSORSTORE_GCS_HTTP_URL=http://127.0.0.1:9023     tensorstore's gs:// driver (orbax checkpoint arrays)
    GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false            gcsfs asks no gRPC Storage Control API (the emulator has none)

Why the shim: tensorstore takes an object's generation from the `x-goog-generation` header of an `alt=media` read
(and the object JSON of other calls). gcp-storage-emulator sends no such header, so tensorstore records generation
0, which is not a valid GCS generation; the next conditional read of that object (orbax's OCDBT manifest, read with
`ifGenerationNotMatch=<the generation it has>`) is then refused with `Malformed StorageGeneration`. The emulator
also ignores `ifGenerationMatch` / `ifGenerationNotMatch`, on which OCDBT's manifest commits rely. The wrappers below
add the headers and honour both preconditions (412 / 304) on reads and uploads, as GCS does; nothing else changes,
and tensorstore's real gs:// driver does every checkpoint read and write.
"""

from __future__ import annotations

import argparse
import logging
from http import HTTPStatus

from gcp_storage_emulator import server
from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects


def _object(storage, bucket: str, name: str | None) -> dict | None:
  if not name:
    return None
  try:
    return storage.get_file_obj(bucket, name)
  except NotFound:
    return None


def _precondition_failed(request, obj: dict | None, reading: bool) -> HTTPStatus | None:
  """412 / 304 as GCS answers `ifGenerationMatch` / `ifGenerationNotMatch` (0 = "the object does not exist")."""
  gen = int(obj["generation"]) if obj else 0
  match = request.query.get("ifGenerationMatch")
  if match and int(match[0]) != gen and (obj or not reading):
    return HTTPStatus.PRECONDITION_FAILED
  not_match = request.query.get("ifGenerationNotMatch")
  if reading and obj and not_match and int(not_match[0]) == gen:
    return HTTPStatus.NOT_MODIFIED
  return None


def _with_generations(handler, reading: bool):
  def wrapped(request, response, storage, *args, **kwargs):
    bucket = request.params["bucket_name"]
    name = request.params.get("object_id") or (request.query.get("name") or [None])[0]
    if not reading:
      request.data  # noqa: B018 - read the body first, so a refused upload's client is not cut off mid-send
    failed = _precondition_failed(request, _object(storage, bucket, name), reading)
    if failed is not None:
      response.status = failed
      return None
    result = handler(request, response, storage, *args, **kwargs)
    obj = _object(storage, bucket, name)
    if reading and obj and response.status in (HTTPStatus.OK, HTTPStatus.PARTIAL_CONTENT):
      response["x-goog-generation"] = str(obj["generation"])
      response["x-goog-metageneration"] = str(obj["metageneration"])
    return result
  return wrapped


def patch() -> None:
  """Wrap the emulator's object read and upload routes (its route table holds the functions themselves)."""
  wrappers = {objects.get: _with_generations(objects.get, reading=True),
              objects.download: _with_generations(objects.download, reading=True),
              objects.insert: _with_generations(objects.insert, reading=False)}
  wrapped = set()
  for _, methods in server.HANDLERS:
    for method, handler in list(methods.items()):
      if handler in wrappers:
        methods[method] = wrappers[handler]
        wrapped.add(handler)
  if wrapped != set(wrappers):  # another emulator version: fail here, not with tensorstore's errors later
    raise RuntimeError(f"gcp-storage-emulator routes changed: wrapped only {sorted(h.__name__ for h in wrapped)}")


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--host", default="127.0.0.1")
  p.add_argument("--port", type=int, required=True)
  p.add_argument("--bucket", default="bertjax-test")
  a = p.parse_args()
  logging.basicConfig(level=logging.WARNING)
  patch()
  server.create_server(a.host, a.port, in_memory=True, default_bucket=a.bucket).run()


if __name__ == "__main__":
  main()
