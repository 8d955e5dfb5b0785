"""A gs:// workdir: pretraining, resume and knn_eval against a stand-in for GCS.

No test reaches real Google Cloud Storage. The stand-in keeps gs://<bucket>/<key> in a
local folder, <root>/<bucket>/<key>, and is put in at the four places where a run's
gs:// paths leave Python code that this project or orbax owns:
  - etils.epath's gs:// backend (config.json, knn_eval.json, spectrum.png, orbax's own
    files and step listing): one that rewrites gs:// onto the folder;
  - orbax's TensorStore spec for gs:// (the arrays): gcs_utils.get_kvstore_for_gcs
    builds TensorStore's "gcs" driver spec, which would go to the network; here a
    "file" spec of the same key;
  - google.cloud.storage, which orbax asks whether a bucket has a hierarchical
    namespace before listing steps: a module whose bucket says no;
  - tf.summary.create_file_writer (TensorBoard events), whose gs:// file system is
    TensorFlow's C++ one: here it gets the local path.
Above these seams the run takes orbax's gs:// path (commit files instead of renames)
and the product code is unchanged. The stand-in itself is tests/gcs_stand_in.py.
"""
import json
import logging
import os
import shutil
import sys
import threading
import time

import numpy as np
import pytest
from conftest import tiny_config
from gcs_stand_in import BucketFolders
from gcs_stand_in import install_stand_in
from test_main import assert_one_error_line
from test_main import run_main
from etils import epath

import corinfomax_jax
from corinfomax_jax import errors
from corinfomax_jax import files
from corinfomax_jax.interop import torchvision as export
from corinfomax_jax.modes import embed as embed_lib
from corinfomax_jax.modes import export as export_lib
from corinfomax_jax.modes import knn_eval as knn_eval_lib
from corinfomax_jax.modes import pretrain
from corinfomax_jax.run import workdir as workdir_lib

WORKDIR = "gs://bucket/run"


@pytest.fixture
def bucket(tmp_path, monkeypatch):
  """The stand-in, with the current directory an empty folder (a local gs: would show)."""
  fs = BucketFolders(tmp_path / "store")
  os.makedirs(fs.local("gs://bucket"))  # the bucket exists
  install_stand_in(monkeypatch, fs)
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  monkeypatch.chdir(cwd)
  yield fs
  from orbax.checkpoint._src.path import gcs_utils  # pylint: disable=g-import-not-at-top
  gcs_utils.get_bucket.cache_clear()
  assert not os.listdir(cwd), f"local files for a gs:// workdir: {os.listdir(cwd)}"


def _steps(fs) -> list[int]:
  directory = fs.local(f"{WORKDIR}/checkpoints")
  return sorted(int(d) for d in os.listdir(directory) if d.isdigit())


def test_pretrain_resume_knn_eval_export_and_embed_use_only_the_bucket(
    bucket, image_folder, caplog):
  pretrain.train_and_evaluate(tiny_config(f"folder:{image_folder}", max_steps=2), WORKDIR)
  assert _steps(bucket) == [2]
  with caplog.at_level(logging.INFO):
    state = pretrain.train_and_evaluate(
        tiny_config(f"folder:{image_folder}", max_steps=4), WORKDIR)
  assert int(state.step) == 4
  assert any(f"Resumed from {WORKDIR}/checkpoints at step 2" in r.getMessage()
             for r in caplog.records)
  assert _steps(bucket) == [2, 4]
  result = knn_eval_lib.knn_eval(tiny_config(f"folder:{image_folder}"), WORKDIR)
  assert result["step"] == 4

  run = bucket.local(WORKDIR)
  with open(os.path.join(run, knn_eval_lib.RESULT_FILE)) as f:
    assert json.load(f) == json.loads(json.dumps(result))
  with open(os.path.join(run, "config.json")) as f:
    assert json.load(f)["max_steps"] == 4
  with open(os.path.join(run, "spectrum.png"), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert [n for n in os.listdir(run) if n.startswith("events.out.tfevents.")]
  for step in (2, 4):
    step_dir = os.path.join(run, "checkpoints", str(step))
    assert {"state", "run"} <= set(os.listdir(step_dir))
    # orbax's gs:// way of finishing a checkpoint (object stores cannot rename).
    assert "commit_success.txt" in os.listdir(step_dir)

  # The modes that read the checkpoint back: load_encoder, export, embed (an upload).
  assert corinfomax_jax.load_encoder(WORKDIR).step == 4
  out = export_lib.export_backbone(tiny_config(f"folder:{image_folder}"), WORKDIR)
  assert out["safetensors"] == f"{WORKDIR}/export/backbone.safetensors"
  assert export.read_safetensors_header(bucket.local(out["safetensors"]))[
      "__metadata__"]["step"] == "4"
  path = embed_lib.embed(tiny_config(f"folder:{image_folder}"), WORKDIR)
  assert path == f"{WORKDIR}/embeddings/test.npz"
  with np.load(bucket.local(path)) as npz:
    assert npz["features"].shape[0] == 24 and list(npz["index"]) == list(range(24))


def test_an_image_folder_in_the_bucket_pretrains_and_evaluates_as_the_local_one(
    bucket, image_folder, caplog):
  """folder:gs://bucket/data: listed and read through epath, never by os or TensorFlow."""
  shutil.copytree(image_folder, bucket.local("gs://bucket/data"))
  dataset, workdir = "folder:gs://bucket/data", "gs://bucket/folder_run"
  with caplog.at_level(logging.INFO):
    state = pretrain.train_and_evaluate(tiny_config(dataset, max_steps=2), workdir)
  assert int(state.step) == 2
  assert "gs://bucket/data/train: 24 images in 2 classes." in caplog.messages
  assert sorted(os.listdir(bucket.local(f"{workdir}/checkpoints"))) == ["2"]
  remote = knn_eval_lib.knn_eval(tiny_config(dataset), workdir)
  # The same checkpoint on the local copy: same images, order and labels, so same numbers.
  local = knn_eval_lib.knn_eval(tiny_config(f"folder:{image_folder}"), workdir)
  assert remote["num_bank_examples"] == local["num_bank_examples"] == 24
  assert remote["num_query_examples"] == local["num_query_examples"] == 24
  assert ({k: v for k, v in remote.items() if k != "dataset"}
          == {k: v for k, v in local.items() if k != "dataset"})


def test_files_write_and_move_to_a_url(bucket, tmp_path):
  files.write_text(f"{WORKDIR}/a/b.json", "{}\n")
  local = tmp_path / "part.npz"
  local.write_bytes(b"npz")
  files.move_local_file(str(local), f"{WORKDIR}/a/c.npz")
  assert sorted(os.listdir(bucket.local(f"{WORKDIR}/a"))) == ["b.json", "c.npz"]
  assert not local.exists()
  assert str(files.as_path(WORKDIR)) == WORKDIR  # not made absolute
  assert files.as_path("rel") == epath.Path(os.path.abspath("rel"))


class _Forbidden(BucketFolders):
  """A bucket this identity may read but not write (GCS's 403)."""

  def open(self, path, mode):
    if "r" not in mode:
      raise PermissionError(f"403 POST {path}: caller does not have "
                            "storage.objects.create access")
    return super().open(path, mode)


class _Silent(BucketFolders):
  """A store that never answers (no route to it): the first call hangs for good."""

  def makedirs(self, path, **kwargs):
    threading.Event().wait()


@pytest.mark.parametrize("store, why", [(_Forbidden, "storage.objects.create"),
                                        (_Silent, "no answer within 0.5 s")])
def test_an_unwritable_or_unreachable_bucket_fails_at_once_in_one_line(
    tmp_path, monkeypatch, store, why):
  install_stand_in(monkeypatch, store(tmp_path))
  monkeypatch.setattr(workdir_lib, "REMOTE_TIMEOUT_S", 0.5)
  start = time.monotonic()
  with pytest.raises(errors.WorkdirError) as raised:
    workdir_lib.check_workdir(WORKDIR)
  assert time.monotonic() - start < 5
  message = str(raised.value)
  assert "\n" not in message
  assert f"--workdir {WORKDIR!r} cannot be reached or written" in message
  assert why in message and "credentials" in message


def test_a_gs_workdir_without_googles_storage_client_fails_in_one_line(monkeypatch):
  monkeypatch.setitem(sys.modules, "google.cloud.storage", None)  # import fails
  with pytest.raises(errors.WorkdirError, match="pip install google-cloud-storage"):
    workdir_lib.check_workdir(WORKDIR)


def test_main_with_an_unusable_gs_workdir_prints_one_line_and_makes_no_local_gs(
    tmp_path, image_folder):
  """main.py as a user runs it, with no stand-in: google-cloud-storage is missing here
  (where it is installed, no credentials or network reach the bucket)."""
  workdir = "gs://corinfomax-no-such-bucket/run"
  proc = run_main(image_folder, workdir, cwd=tmp_path)
  assert_one_error_line(proc, f"--workdir {workdir!r}")
  assert not os.listdir(tmp_path)
