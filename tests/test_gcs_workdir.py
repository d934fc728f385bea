"""A Google Cloud Storage bucket as the workdir (`--workdir gs://bucket/run`), against an in-memory GCS emulator
(gcp-storage-emulator) started here on 127.0.0.1: pretraining writes its checkpoints, metrics, TensorBoard events,
figure and config.json into the bucket, saves there when a SIGTERM arrives, and the same run resumes from the bucket
exactly; fine-tuning reads its encoder from the bucket and writes into it; the workdir's hold lives in the bucket
(one writer per workdir); a missing bucket is a one-line error.

The emulator's endpoint reaches the libraries as they read it: STORAGE_EMULATOR_HOST (gcsfs: config, metrics,
TensorBoard, figures, reports, orbax's metadata files) and TENSORSTORE_GCS_HTTP_URL (tensorstore's gcs driver: the
checkpoint arrays). No credentials: gcsfs goes anonymous against an emulator, tensorstore when it finds no
application-default credentials.
"""
import json
import logging
import os
import pathlib
import signal
import sys
import threading
from http import HTTPStatus

import jax
import numpy as np
import pytest
from gcp_storage_emulator import server as emulator_server  # the `test` extra
from gcp_storage_emulator.exceptions import NotFound

from configs import finetune as finetune_config
from configs import pretrain as pretrain_config
from data_pipelines.errors import UsageError
from tests.helpers import tiny_checkpoint

BUCKET = "stmem-test"
N = 3


def _download_with_generation(download):
  """The emulator's download, with the `x-goog-generation` header that GCS sends with every object it serves: the
  emulator leaves it out, and tensorstore takes the generation of what it read from it for its next conditional
  write (an OCDBT manifest update), which it refuses as malformed without one."""
  def wrapped(request, response, storage, *args, **kwargs):
    download(request, response, storage, *args, **kwargs)
    if int(response.status) in (200, 206):
      obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
      response["x-goog-generation"] = obj["generation"]
  return wrapped


def _only_if_absent(upload):
  """The emulator's upload, honouring the precondition `ifGenerationMatch=0` as GCS does (412 when the object
  exists), which the emulator ignores: the workdir's hold is created with it."""
  def wrapped(request, response, storage, *args, **kwargs):
    if request.query.get("ifGenerationMatch") == ["0"]:
      name = request.query["name"][0] if "name" in request.query else request.data["meta"].get("name")
      try:
        storage.get_file_obj(request.params["bucket_name"], name)
      except NotFound:
        pass
      else:
        response.status = HTTPStatus.PRECONDITION_FAILED
        return None
    return upload(request, response, storage, *args, **kwargs)
  return wrapped


def _quiet_disconnects(handle_error):
  """The emulator's error report, less the tracebacks of clients that hung up before reading a whole response (a
  ranged or abandoned read): they are no error of the run."""
  def handle(request, client_address):
    if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
      handle_error(request, client_address)
  return handle


@pytest.fixture(scope="module")
def bucket():
  """The emulator on a free port, in memory, with one bucket; the environment pointing every library at it. Yields
  a gcsfs file system to look into the bucket with."""
  from gcp_storage_emulator.handlers import objects
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(objects, "download", _download_with_generation(objects.download))
    mp.setattr(objects, "_media_upload", _only_if_absent(objects._media_upload))
    mp.setattr(objects, "_multipart_upload", _only_if_absent(objects._multipart_upload))
    server = emulator_server.create_server("127.0.0.1", 0, in_memory=True, default_bucket=BUCKET)
    server.start()
    httpd = server._api._httpd
    mp.setattr(httpd, "handle_error", _quiet_disconnects(httpd.handle_error))
    mp.setattr(logging.getLogger("gcp_storage_emulator"), "level", logging.CRITICAL)  # it logs each 404 as an error
    url = f"http://127.0.0.1:{server._api._httpd.server_address[1]}"
    env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
           # gcsfs asks the storage-control API (which the emulator lacks) whether a bucket is zonal: plain GCS here
           "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
    for k, v in env.items():
      mp.setenv(k, v)
    mp.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    import gcsfs
    try:
      yield gcsfs.GCSFileSystem(use_listings_cache=False)
    finally:
      server.stop()


def _config(**overrides):
  c = pretrain_config.get_config("tiny")
  c.batch_size, c.total_steps, c.warmup_steps = 8, 2 * N, 1
  c.data.num_synthetic = 24
  c.checkpoint.every, c.checkpoint.async_save = 2 * N, True  # the end only: a save costs many small uploads
  c.log_every, c.log_batches = 1, True
  c.evals = type(c.evals)()
  c.mesh, c.num_devices = "data:-1,fsdp:1", 1
  for k, v in overrides.items():
    setattr(c, k, v)
  return c


def _params(path):
  from flax import nnx

  from stmem import checkpoint as ckpt_lib
  model, meta = ckpt_lib.load_model(path)
  return jax.tree.leaves(nnx.state(model, nnx.Param).to_pure_dict()), meta


def _steps(fs, folder):
  """The finished checkpoint steps of a checkpoint folder in the bucket: on GCS orbax writes a step in place and
  marks it written whole with its commit file (there is no atomic rename)."""
  return sorted(int(p.split("/")[-2]) for p in fs.glob(f"{BUCKET}/{folder}/*/commit_success.txt"))


@pytest.fixture(scope="module")
def straight(bucket):
  from stmem.programs import pretrain
  return pretrain.run(_config(), f"gs://{BUCKET}/straight")


def test_pretrain_writes_everything_into_the_bucket(bucket, straight):
  fs = bucket
  assert straight["workdir"] == f"gs://{BUCKET}/straight" and straight["step"] == 2 * N
  assert straight["checkpoint"] == f"gs://{BUCKET}/straight/checkpoints/{2 * N}"
  assert _steps(fs, "straight/checkpoints") == [2 * N]
  assert json.loads(fs.cat(f"{BUCKET}/straight/config.json"))["batch_size"] == 8
  lines = [json.loads(x) for x in fs.cat(f"{BUCKET}/straight/metrics.jsonl").decode().splitlines()]
  assert [x["step"] for x in lines] == list(range(1, 2 * N + 1)) and all(np.isfinite(x["loss"]) for x in lines)
  assert len(fs.cat(f"{BUCKET}/straight/batches.0.jsonl").decode().splitlines()) == 2 * N  # appended, not overwritten
  events = fs.glob(f"{BUCKET}/straight/tensorboard/events.out.tfevents.*")
  assert len(events) == 1 and fs.size(events[0]) > 0
  assert fs.size(f"{BUCKET}/straight/reconstruction.png") > 10_000
  assert not pathlib.Path("gs:").exists()  # nothing written to a local folder named after the URL


class SigtermAt:
  """The training iterator; a real SIGTERM arrives while batch `at` is read (during step `at`): the loop saves that
  step and returns, as a preempted VM's run does."""

  def __init__(self, it, at):
    self.it, self.at, self.count = it, at, 0

  def __next__(self):
    self.count += 1
    if self.count == self.at:
      signal.raise_signal(signal.SIGTERM)
    return next(self.it)

  def get_state(self):
    return self.it.get_state()


def test_sigterm_saves_into_the_bucket_and_the_same_run_resumes_exactly(bucket, straight, monkeypatch):
  """2N steps straight == a SIGTERM during step 2 (saved there, off the checkpoint schedule) and the rest resumed
  from the bucket: parameters to 1e-6, the same batches in the same order."""
  from stmem.programs import pretrain
  workdir = f"gs://{BUCKET}/resumed"
  real = pretrain.data_lib.make_iterator
  with monkeypatch.context() as m:
    m.setattr(pretrain.data_lib, "make_iterator", lambda *a, **k: SigtermAt(real(*a, **k), 2))
    first = pretrain.run(_config(), workdir)
  assert first["preempted"] and first["step"] == 2 and _steps(bucket, "resumed/checkpoints") == [2]
  second = pretrain.run(_config(), workdir)
  assert second["start_step"] == 2 and second["step"] == 2 * N
  assert _steps(bucket, "resumed/checkpoints") == [2, 2 * N]
  a, meta = _params(f"gs://{BUCKET}/straight/checkpoints/{2 * N}")
  b, _ = _params(workdir)  # a workdir URL: its latest step
  for x, y in zip(a, b):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6)
  assert meta["step"] == 2 * N
  straight_batches = bucket.cat(f"{BUCKET}/straight/batches.0.jsonl").decode().splitlines()
  resumed_batches = bucket.cat(f"{BUCKET}/resumed/batches.0.jsonl").decode().splitlines()
  assert resumed_batches == straight_batches  # appended across the restart, not overwritten


def test_finetune_reads_its_encoder_from_the_bucket_and_writes_into_it(bucket):
  from stmem import checkpoint as ckpt_lib
  from stmem.programs import finetune
  encoder = tiny_checkpoint(f"gs://{BUCKET}/encoder")
  c = finetune_config.get_config("test")
  c.init_from, c.num_devices, c.total_steps, c.bootstrap = str(encoder), 1, 3, 10  # one evaluation, one save
  out = f"gs://{BUCKET}/ft"
  summary = finetune.run(c, out)
  assert summary["step"] == 3 and summary["checkpoint"] == f"gs://{BUCKET}/ft/checkpoints/3"
  lines = [json.loads(x) for x in bucket.cat(f"{BUCKET}/ft/metrics.jsonl").decode().splitlines()]
  assert [x["step"] for x in lines] == [3] and "val_loss" in lines[0]
  assert json.loads(bucket.cat(f"{BUCKET}/ft/report.json"))["rows"][0]["model"] == "fine-tuned"
  assert bucket.exists(f"{BUCKET}/ft/report.md") and bucket.glob(f"{BUCKET}/ft/roc_*.png")
  assert _steps(bucket, "ft/train_state") == [3] and _steps(bucket, "ft/checkpoints") == [3]
  _, meta = ckpt_lib.load_model(out, encoder_only=True)  # the selected model, read back from the bucket
  assert meta["origin"] == "stmem finetune" and meta["step"] == 3


def test_the_hold_of_a_bucket_workdir(bucket, straight):
  """One writer per workdir on a bucket: a finished run leaves no hold and names its program; a run on a workdir
  that another run holds stops in one line naming the holder; fine-tuning in a pretraining workdir is refused; of
  runs creating the hold at the same instant exactly one does (GCS's ifGenerationMatch=0)."""
  from stmem import workdir as workdir_lib
  from stmem import workdir_hold
  from stmem.programs import finetune, pretrain
  assert not bucket.exists(f"{BUCKET}/straight/{workdir_hold.HOLD_FILE}")
  assert json.loads(bucket.cat(f"{BUCKET}/straight/{workdir_hold.PROGRAM_FILE}"))["program"] == "pretrain"
  held = f"gs://{BUCKET}/held"
  hold = workdir_hold.take(held, "pretrain", log=lambda line: None)
  try:
    assert json.loads(bucket.cat(f"{BUCKET}/held/{workdir_hold.HOLD_FILE}"))["pid"] == os.getpid()
    with pytest.raises(UsageError, match=f"workdir {held} is held by `stmem pretrain` \\(host "):
      pretrain.run(_config(), held)
  finally:
    hold.release()
  assert not bucket.exists(f"{BUCKET}/held/{workdir_hold.HOLD_FILE}")
  with pytest.raises(UsageError, match=f"workdir gs://{BUCKET}/straight belongs to `stmem pretrain`"):
    finetune.run(finetune_config.get_config("test"), f"gs://{BUCKET}/straight")

  stores = [workdir_lib.GcsStore(f"gs://{BUCKET}/race") for _ in range(4)]
  start, won = threading.Barrier(len(stores)), []

  def create(store, i):
    start.wait()
    if store.create_exclusive(workdir_hold.HOLD_FILE, f"{i}".encode()):
      won.append(i)

  threads = [threading.Thread(target=create, args=(store, i)) for i, store in enumerate(stores)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert len(won) == 1 and bucket.cat(f"{BUCKET}/race/{workdir_hold.HOLD_FILE}") == f"{won[0]}".encode()


def test_a_missing_bucket_or_another_scheme_is_a_one_line_error(bucket):
  from stmem import workdir as workdir_lib
  from stmem.programs import pretrain
  with pytest.raises(UsageError, match="the bucket gs://no-such-bucket does not exist"):
    pretrain.run(_config(), "gs://no-such-bucket/run")
  with pytest.raises(UsageError, match="s3://bucket/run: .*not supported"):
    pretrain.run(_config(), "s3://bucket/run")
  with pytest.raises(UsageError, match="local folders and to Google Cloud Storage"):
    workdir_lib.resolve("s3://bucket/run")  # where a path meets stmem without a hold (a checkpoint to read)
  assert not bucket.exists("no-such-bucket")
