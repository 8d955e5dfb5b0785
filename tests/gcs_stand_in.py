"""A stand-in for Google Cloud Storage on local folders, for tests that use gs:// paths.

gs://<bucket>/<key> is <root>/<bucket>/<key>. `install_stand_in` puts it in at the places
where a run's gs:// paths leave Python code that this project or orbax owns (see
tests/e2e/test_remote_workdir.py); no test reaches real Cloud Storage.
"""
import os
import sys
import types

from etils.epath import backend as epath_backend
from etils.epath import gpath

from corinfomax_jax import files


class BucketFolders(epath_backend.Backend):
  """epath's gs:// backend on local folders: gs://<bucket>/<key> is <root>/<bucket>/<key>."""

  def __init__(self, root):
    self.root = os.fspath(root)
    self._os = epath_backend.os_backend

  def local(self, url) -> str:
    url = os.fspath(url)
    assert url.startswith("gs://"), url
    return os.path.join(self.root, url[len("gs://"):])

  def url(self, local) -> str:
    return "gs://" + os.path.relpath(local, self.root)

  def open(self, path, mode):
    return self._os.open(self.local(path), mode)

  def exists(self, path):
    return self._os.exists(self.local(path))

  def isdir(self, path):
    return self._os.isdir(self.local(path))

  def listdir(self, path):
    return self._os.listdir(self.local(path))

  def glob(self, path):
    return [self.url(p) for p in self._os.glob(self.local(path))]

  def walk(self, top, *, top_down=True, on_error=None):
    for root, dirs, names in self._os.walk(self.local(top), top_down=top_down,
                                           on_error=on_error):
      yield self.url(root), dirs, names

  def makedirs(self, path, *, exist_ok=False, mode=None):
    self._os.makedirs(self.local(path), exist_ok=exist_ok, mode=mode)

  def mkdir(self, path, *, exist_ok=False, mode=None):
    self._os.mkdir(self.local(path), exist_ok=exist_ok, mode=mode)

  def rmtree(self, path):
    self._os.rmtree(self.local(path))

  def remove(self, path):
    self._os.remove(self.local(path))

  def rename(self, path, dst):
    self._os.rename(self.local(path), self.local(dst))

  def replace(self, path, dst):
    self._os.replace(self.local(path), self.local(dst))

  def copy(self, path, dst, overwrite):
    self._os.copy(self.local(path), self.local(dst), overwrite=overwrite)

  def stat(self, path):
    return self._os.stat(self.local(path))


def _storage_client_module():
  """google.cloud.storage as orbax uses it: Client().get_bucket(name) of a flat bucket."""
  bucket = types.SimpleNamespace(hierarchical_namespace_enabled=False)
  client = types.SimpleNamespace(get_bucket=lambda name: bucket)
  module = types.ModuleType("google.cloud.storage")
  module.Client = lambda *args, **kwargs: client
  return module


def install_stand_in(monkeypatch, fs: BucketFolders) -> None:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from orbax.checkpoint._src.path import gcs_utils  # pylint: disable=g-import-not-at-top
  # epath: with TensorFlow installed it would pick TensorFlow's gfile for gs://.
  monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)
  monkeypatch.setitem(gpath._PREFIX_TO_BACKEND, "gs", fs)  # pylint: disable=protected-access
  monkeypatch.setattr(gcs_utils, "get_kvstore_for_gcs",
                      lambda path: {"driver": "file", "path": fs.local(path)})
  storage = _storage_client_module()
  monkeypatch.setitem(sys.modules, "google.cloud.storage", storage)
  # Where google-cloud-storage is installed and already imported, `from google.cloud
  # import storage` reads the package's attribute before sys.modules.
  try:
    import google.cloud  # pylint: disable=g-import-not-at-top
    monkeypatch.setattr(google.cloud, "storage", storage, raising=False)
  except ImportError:
    pass
  gcs_utils.get_bucket.cache_clear()  # orbax caches buckets by name
  create_file_writer = tf.summary.create_file_writer
  monkeypatch.setattr(tf.summary, "create_file_writer", lambda logdir, *a, **k: (
      create_file_writer(fs.local(logdir) if files.is_url(logdir) else logdir, *a, **k)))
