"""Test setup: 8 simulated CPU devices, so sharded code paths run in every test.

XLA reads XLA_FLAGS once, when jax first initialises its backends, so this must run
before any test module imports jax.
"""
import os

_flag = "--xla_force_host_platform_device_count=8"
if _flag not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# TensorFlow (input pipeline only) should not spam the test log.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


import tempfile  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def compilation_cache():
  """Tests compile the same tiny networks many times: reuse XLA's compilations."""
  import jax  # pylint: disable=g-import-not-at-top
  with tempfile.TemporaryDirectory() as d:
    jax.config.update("jax_compilation_cache_dir", d)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    # Trainers started as subprocesses (fault and multi-process tests) share it.
    os.environ["JAX_COMPILATION_CACHE_DIR"] = d
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
    yield


@pytest.fixture(autouse=True)
def no_label_index_workdir():
  """A start keeps class-subset label indexes in its workdir (data.labels.use_workdir)
  for the rest of the process: each test starts with none, so no test reads another's."""
  yield
  from corinfomax_jax.data import labels  # pylint: disable=g-import-not-at-top
  labels.use_workdir(None)


@pytest.fixture
def one_thread():
  """t-SNE's OpenMP threads spin on an oversubscribed CPU (20 s instead of 1 s for 180
  points on a busy 2-core machine): one thread while a test draws a map."""
  threadpoolctl = pytest.importorskip("threadpoolctl")
  pytest.importorskip("sklearn.manifold")  # loaded first: the limit applies to loaded libraries
  with threadpoolctl.threadpool_limits(limits=1):
    yield


def make_image_folder(root, splits=("train", "test"), classes=("cat", "dog"), per_class=12,
                      size=16):
  """A tiny image folder root/<split>/<class>/<i>.png whose classes differ in colour."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  for split in splits:
    for c, name in enumerate(classes):
      d = root / split / name
      d.mkdir(parents=True)
      for i in range(per_class):
        base = np.zeros((size, size, 3)) + 200 * (np.arange(3) == c % 3)
        img = np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(d / f"{i}.png")
  return root


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory):
  return make_image_folder(tmp_path_factory.mktemp("folder"))


def tiny_config(dataset, **overrides):
  """The default config shrunk to a model and data that train in seconds on a CPU."""
  from configs import default  # pylint: disable=g-import-not-at-top
  c = default.get_config()
  c.dataset = dataset
  c.image_size = 16
  c.model.width = 4
  c.model.projector = (32, 8)  # D = 8 < batch 16: a well-conditioned covariance
  c.batch_size = 16
  c.base_batch_size = 16
  c.num_epochs = 20
  c.warmup_epochs = 1
  c.learning_rate = 0.1
  c.log_every_steps = 1
  c.checkpoint_every_steps = 2
  c.spectrum_every_steps = 2
  c.eval.batch_size = 16
  # Top-level keys of earlier versions (alpha, width, projector, ...) may be given flat:
  # settings.resolve moves them to their sections, as it does for a user's config file.
  c.update(overrides)
  return c


@pytest.fixture(scope="session")
def pretrained_workdir(image_folder, tmp_path_factory):
  """A workdir with tiny pretraining checkpoints of steps 2 and 4 (shared, read-only)."""
  from corinfomax_jax.modes import pretrain  # pylint: disable=g-import-not-at-top
  workdir = tmp_path_factory.mktemp("pretrained")
  pretrain.train_and_evaluate(tiny_config(f"folder:{image_folder}", max_steps=4),
                              str(workdir))
  return workdir


def stored_workdir(name, tmp_path):
  """A copy of tests/e2e/data/<name> (a workdir an earlier version wrote) to run on."""
  import pathlib  # pylint: disable=g-import-not-at-top
  import shutil  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / "workdir"
  shutil.copytree(pathlib.Path(__file__).parent / "e2e" / "data" / name, workdir)
  return workdir


def damaged_copy(workdir, target, steps):
  """A copy of `workdir` at `target` whose checkpoints of `steps` each have their
  biggest state file cut in half (a crash during a save); returns `target`."""
  import glob  # pylint: disable=g-import-not-at-top
  import shutil  # pylint: disable=g-import-not-at-top
  shutil.copytree(workdir, target)
  for step in steps:
    paths = [p for p in glob.glob(f"{target}/checkpoints/{step}/state/**/*", recursive=True)
             if os.path.isfile(p)]
    biggest = max(paths, key=os.path.getsize)
    os.truncate(biggest, os.path.getsize(biggest) // 2)
  return target


def register_tiny_vit(monkeypatch, name="vit_test"):
  """Registers `name`, a ViT of two blocks of width 16 (2 heads, MLP 32), beside
  vit_ti16/s16/b16 for the duration of a test: ViT code paths that compile in seconds."""
  import functools  # pylint: disable=g-import-not-at-top
  from corinfomax_jax import models  # pylint: disable=g-import-not-at-top
  from corinfomax_jax.models import vit  # pylint: disable=g-import-not-at-top
  monkeypatch.setitem(vit.VITS, name, dict(width=16, depth=2, mlp_dim=32, num_heads=2))
  monkeypatch.setitem(models.BACKBONES, name, models.BackboneSpec(
      functools.partial(vit.create_vit, name), vit.OPTIONS, vit.check_image_size))
  return name
