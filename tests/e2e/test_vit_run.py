"""A tiny ViT through the whole library: two steps of pretraining with AdamW and the kNN
monitor, a resume that continues exactly, and every reader of the workdir (knn_eval,
linear_eval, finetune, embed, load_encoder); export and import of torchvision weights
refuse it in one line."""
import json
import pathlib

import jax
import numpy as np
import pytest
from conftest import register_tiny_vit
from conftest import tiny_config
from test_faults import read_scalars

import corinfomax_jax
from configs import default
from corinfomax_jax.errors import ConfigError
from corinfomax_jax.modes import embed as embed_lib
from corinfomax_jax.modes import export as export_lib
from corinfomax_jax.modes import finetune
from corinfomax_jax.modes import import_weights
from corinfomax_jax.modes import knn_eval
from corinfomax_jax.modes import linear_eval
from corinfomax_jax.modes import pretrain


def _config(image_folder, **overrides):
  c = tiny_config(f"folder:{image_folder}", **overrides)  # 16 px images, batch 16
  default.set_vit(c, "vit_test", patch_size=4, posemb="learn", pool="tok")
  default.set_adamw(c, learning_rate=1e-3, base_batch_size=16, weight_decay=0.05,
                    warmup_epochs=1.0, grad_clip_norm=1.0)
  c.eval.knn.every_epochs = 1.0  # one step per epoch on the 24-image folder
  c.eval.linear.update(max_steps=2, batch_size=8)
  c.eval.finetune.update(max_steps=2, batch_size=8, label_fraction=1.0)
  return c


@pytest.fixture(scope="module")
def vit_workdir(image_folder, tmp_path_factory):
  """A tiny ViT pretrained for two steps, then resumed to four (shared, read-only)."""
  with pytest.MonkeyPatch.context() as mp:
    register_tiny_vit(mp)
    workdir = str(tmp_path_factory.mktemp("vit"))
    two = pretrain.train_and_evaluate(_config(image_folder, max_steps=2), workdir)
    # The monitor reads the state and changes nothing: off in the other two runs.
    def quiet():
      c = _config(image_folder, max_steps=4)
      c.eval.knn.every_epochs = 0.0
      return c

    four = pretrain.train_and_evaluate(quiet(), workdir)
    straight = pretrain.train_and_evaluate(quiet(),
                                           str(tmp_path_factory.mktemp("vit_straight")))
    yield {"workdir": workdir, "two": jax.device_get(two), "four": jax.device_get(four),
           "straight": jax.device_get(straight)}


@pytest.fixture
def tiny_vit(monkeypatch):
  return register_tiny_vit(monkeypatch)


def test_two_steps_train_the_vit_and_a_resume_continues_exactly(vit_workdir):
  two, four, straight = vit_workdir["two"], vit_workdir["four"], vit_workdir["straight"]
  assert int(two.step) == 2 and int(four.step) == 4
  assert two.batch_stats == {}  # no BatchNorm anywhere
  before = two.params["backbone"]["Transformer"]["encoderblock_1"]["MlpBlock_0"]
  after = four.params["backbone"]["Transformer"]["encoderblock_1"]["MlpBlock_0"]
  assert not np.allclose(before["Dense_0"]["kernel"], after["Dense_0"]["kernel"])
  # Stopped at 2 and resumed (AdamW's moments and count restored) == 4 steps at once.
  for a, b in zip(jax.tree.leaves(four.params), jax.tree.leaves(straight.params)):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)
  for a, b in zip(jax.tree.leaves(four.opt_state), jax.tree.leaves(straight.opt_state)):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)


def test_the_run_record_and_the_monitor(vit_workdir):
  workdir = vit_workdir["workdir"]
  record = json.loads(open(f"{workdir}/config.json").read())
  assert record["model"]["backbone"] == "vit_test" and record["optimizer"] == "adamw"
  assert record["grad_clip_norm"] == 1.0 and "width" not in record["model"]
  assert (pathlib.Path(workdir) / "spectrum.png").exists()
  top1 = read_scalars(workdir, "knn/top1")
  assert sorted(top1) == [1, 2] and all(0 <= v <= 100 for v in top1.values())


def test_every_reader_reads_the_vit_workdir(vit_workdir, image_folder, tiny_vit,
                                            one_thread, tmp_path):
  del tiny_vit, one_thread
  workdir, config = vit_workdir["workdir"], _config(image_folder)
  enc = corinfomax_jax.load_encoder(workdir)
  assert enc.step == 4 and enc.feature_dim == 16
  images = np.random.default_rng(0).normal(size=(3, 16, 16, 3)).astype(np.float32)
  features = enc(images)
  assert features.shape == (3, 16) and np.isfinite(features).all()
  knn = knn_eval.knn_eval(config, workdir)
  assert knn["step"] == 4 and 0 <= knn["top1"] <= 100
  linear = linear_eval.linear_eval(config, workdir)
  assert 0 <= linear["top1"] <= 100
  tuned = finetune.finetune(config, workdir)
  assert 0 <= tuned["top1"] <= 100
  path = embed_lib.embed(config, workdir)
  with np.load(path) as npz:
    assert npz["features"].shape == (24, 16) and np.isfinite(npz["features"]).all()
  with pytest.raises(ConfigError, match="backbone 'vit_test' has none and is not "
                                        "exported") as refused:
    export_lib.export_backbone(config, workdir)
  assert "\n" not in str(refused.value)
  with pytest.raises(ConfigError, match="backbone 'vit_test' has none: a big_vision ViT "
                                        ".npz loads with") as refused:
    import_weights.import_weights(config, str(tmp_path / "imported"), "resnet.pth")
  assert "\n" not in str(refused.value)
