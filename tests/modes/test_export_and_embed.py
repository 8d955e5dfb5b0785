"""--mode=export and --mode=embed on a tiny pretraining run."""
import hashlib
import json
import os
import shutil

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from conftest import damaged_copy
from conftest import make_image_folder
from conftest import tiny_config

import corinfomax_jax
from corinfomax_jax import errors
from corinfomax_jax import mesh as mesh_lib
from corinfomax_jax import models
from corinfomax_jax.data import recipe
from corinfomax_jax.data import crops
from corinfomax_jax.data import pipeline
from corinfomax_jax.data import sources
from corinfomax_jax.eval import embedding_map
from corinfomax_jax.eval import features
from corinfomax_jax.interop import torchvision as export
from corinfomax_jax.modes import embed as embed_lib
from corinfomax_jax.modes import export as export_lib
from corinfomax_jax.modes import knn_eval as knn_eval_lib
from corinfomax_jax.run import settings


def _images(n=3):
  return np.random.default_rng(1).normal(size=(n, 16, 16, 3)).astype(np.float32)


def test_export_writes_torchvision_and_flax_files_with_the_encoder_features(
    pretrained_workdir, tmp_path, image_folder):
  os.symlink(pretrained_workdir / "checkpoints", tmp_path / "checkpoints")
  workdir = tmp_path
  out = export_lib.export_backbone(tiny_config(f"folder:{image_folder}"), str(workdir))
  enc = corinfomax_jax.load_encoder(str(workdir))
  expected = enc(_images())
  # The torchvision state_dict, read back, gives the encoder's features.
  tensors = export.load_safetensors(out["safetensors"])
  assert "fc.weight" not in tensors and int(tensors["bn1.num_batches_tracked"]) == 4
  metadata = export.read_safetensors_header(out["safetensors"])["__metadata__"]
  # The evaluation input: ImageNet's statistics for a folder, int(16 * 8 / 7) = 18.
  mean, std = (list(x) for x in recipe.normalization_stats("folder:x"))
  assert json.loads(metadata.pop("preprocessing")) == {
      "image_size": 16, "resize": 18, "crop": 16, "interpolation": "bicubic",
      "mean": mean, "std": std, "layout": "RGB, pixels / 255, then (x - mean) / std"}
  # And key by key, each a JSON string (safetensors metadata values are strings).
  assert {k: json.loads(metadata.pop(f"preprocessing.{k}"))
          for k in ("mean", "std", "resize", "crop")} == {
              "mean": mean, "std": std, "resize": 18, "crop": 16}
  assert metadata == {"backbone": "resnet18", "cifar_stem": "True", "width": "4",
                      "step": "4"}
  # The eval pipeline's view of a test image is that resize and crop.
  source = sources.get_source(f"folder:{image_folder}", None, "test")
  batch = next(pipeline.eval_batches(source, pipeline.BatchSpec(8, 16), recipe.views(
      settings.resolve(tiny_config(f"folder:{image_folder}")).data.recipe)))
  first = np.asarray(Image.open(source.describe(0)).convert("RGB"))
  np.testing.assert_array_equal(batch["image"][0],
                                crops.resize_center_crop_np(first, 16, 18 / 16))
  got = export.torch_layout_features(tensors, jnp.asarray(_images()), backbone="resnet18",
                                     cifar_stem=True)
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-4, atol=1e-4)
  # The msgpack holds the backbone alone: it restores into create_backbone's variables.
  backbone = models.create_backbone("resnet18", cifar_stem=True, width=4)
  template = backbone.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)), train=False)
  with open(out["msgpack"], "rb") as f:
    variables = flax.serialization.from_bytes(template, f.read())
  np.testing.assert_allclose(np.asarray(backbone.apply(variables, _images(), train=False)),
                             expected, rtol=1e-5, atol=1e-5)


def test_export_writes_a_model_card_from_what_the_workdir_records(
    pretrained_workdir, tmp_path, image_folder):
  os.symlink(pretrained_workdir / "checkpoints", tmp_path / "checkpoints")
  shutil.copy(pretrained_workdir / "config.json", tmp_path / "config.json")
  config = tiny_config(f"folder:{image_folder}")
  knn = knn_eval_lib.knn_eval(config, str(tmp_path))
  out = export_lib.export_backbone(config, str(tmp_path))
  with open(out["card"]) as f:
    card = f.read()
  assert out["card"] == str(tmp_path / "export" / "README.md")
  digest = hashlib.sha256(open(out["safetensors"], "rb").read()).hexdigest()
  assert f"- `backbone.safetensors`: sha256 `{digest}`" in card
  digest = hashlib.sha256(open(out["msgpack"], "rb").read()).hexdigest()
  assert f"- `backbone.msgpack`: sha256 `{digest}`" in card
  assert card.startswith(f"# resnet18 (CIFAR stem, width 4), corinfomax, folder:{image_folder}"
                         ", step 4\n")
  # The method's hyperparameters and the optimizer, from the workdir's config.json.
  assert ("- corinfomax: alpha = 250.0, eps = 1e-08, la_R = 0.01, la_mu = 0.01, "
          "normalize = True, r_init = 1.0, stats_dtype = float32.") in card
  assert "peak learning rate 0.1 x batch 16 / 16, momentum 0.9" in card
  assert "(From the workdir's config.json.)" in card
  # 24 training images in batches of 16: one step per epoch; 4 steps.
  assert "- Step 4 of a schedule of 20 epochs (4 steps at most): 4.00 epochs (1 steps " \
      "per epoch, 24 images)." in card
  assert f"as the folder's owner licenses it" in card
  assert (f"- kNN (InstDisc's weighted kNN, k = 200, T = 0.07, bank: 24 "
          f"folder:{image_folder} train images, queries: 24 test images, centre crops): "
          f"top-1 {knn['top1']:.2f}, top-5 {knn['top5']:.2f}.") in card
  assert "Branch 1's projector covariance at step 4: dimension 8, effective rank" in card
  assert ("RGB; resize the shorter side to 18 px (bicubic), centre crop 16 x 16 (the size "
          "the backbone was trained at); divide by 255; subtract mean [0.485, 0.456, "
          "0.406]") in card
  assert '"preprocessing.resize", "preprocessing.crop"' in card
  # The JAX snippet, run as written, gives the encoder's features.
  snippet = card.split("### JAX (Flax)\n\n```python\n")[1].split("```")[0]
  snippet = snippet.replace('"backbone.msgpack"', repr(out["msgpack"]))
  scope = {"images": _images()}
  exec(snippet, scope)  # pylint: disable=exec-used
  np.testing.assert_allclose(np.asarray(scope["features"]),
                             corinfomax_jax.load_encoder(str(tmp_path))(_images()),
                             rtol=1e-5, atol=1e-5)
  assert "torchvision builds its ResNets at width 64 only" in card  # width 4


def test_embed_writes_features_labels_and_indices_of_the_split(pretrained_workdir,
                                                               tmp_path, image_folder,
                                                               one_thread, caplog):
  os.symlink(pretrained_workdir / "checkpoints", tmp_path / "checkpoints")
  config = tiny_config(f"folder:{image_folder}")
  config.eval.batch_size = 8  # 24 test images: 3 batches, each gathered and written
  caplog.set_level("INFO")
  path = embed_lib.embed(config, str(tmp_path))
  assert path == str(tmp_path / embed_lib.EMBEDDINGS_DIR / "test.npz")
  # The map of the 24 test images, coloured by their two classes.
  map_path = tmp_path / embed_lib.EMBEDDINGS_DIR / embed_lib.MAP_FILE
  image = np.asarray(Image.open(map_path).convert("RGB")).astype(int)
  for colour in ((31, 119, 180), (255, 127, 14)):  # matplotlib's C0 and C1
    assert (np.abs(image - colour).sum(-1) < 30).sum() > 20, colour
  assert f"Map of the embedding (t-SNE, 24 of 24 points): {map_path}" in caplog.text
  assert not os.path.exists(tmp_path / embed_lib.EMBEDDINGS_DIR / "test.parts")
  with np.load(path) as npz:  # no pickled objects: plain arrays only
    assert sorted(npz.files) == ["features", "index", "labels", "paths"]
    feats, labels, index, paths = (npz[k] for k in ("features", "labels", "index",
                                                     "paths"))
  assert feats.dtype == np.float32 and labels.dtype == np.int32 and index.dtype == np.int64
  np.testing.assert_array_equal(index, np.arange(24))
  # Each row's image, relative to the folder's root, in the folder's sorted order.
  assert paths.tolist() == [f"test/{c}/{name}" for c in ("cat", "dog")
                            for name in sorted(f"{i}.png" for i in range(12))]
  with Image.open(image_folder / paths[13]) as image:
    assert image.size == (16, 16)
  np.testing.assert_array_equal(labels, np.repeat([0, 1], 12))  # folder sorted by class
  enc = corinfomax_jax.load_encoder(str(tmp_path))
  source = sources.get_source(config.dataset, None, "test")
  expected, expected_labels = features.extract_features(
      enc.model, enc.variables, mesh_lib.make_mesh(), source, batch_size=16,
      data=settings.resolve(config).data)
  np.testing.assert_allclose(feats, expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(labels, expected_labels)


def test_embed_without_a_layout_library_says_how_to_get_the_map(
    pretrained_workdir, tmp_path, image_folder, monkeypatch, caplog):
  os.symlink(pretrained_workdir / "checkpoints", tmp_path / "checkpoints")
  monkeypatch.setattr(embedding_map, "algorithm", lambda: None)
  caplog.set_level("INFO")
  path = embed_lib.embed(tiny_config(f"folder:{image_folder}"), str(tmp_path))
  assert os.path.exists(path)
  assert not os.path.exists(tmp_path / embed_lib.EMBEDDINGS_DIR / embed_lib.MAP_FILE)
  lines = [r.getMessage() for r in caplog.records if "No map of the embedding" in r.getMessage()]
  assert lines == [f"No map of the embedding ({tmp_path / 'embeddings' / 'map.png'}): "
                   "neither umap-learn nor scikit-learn is installed; pip install "
                   "\"corinfomax-jax[map]\" (scikit-learn, for t-SNE) or pip install "
                   "umap-learn."]


def test_embed_of_a_folder_of_one_unlabelled_split_reads_that_split(
    pretrained_workdir, tmp_path, monkeypatch):
  """Pretraining on one's own images: root/train/<image>, no eval split, no classes."""
  root = tmp_path / "mine"
  make_image_folder(root, splits=("train",), classes=("x",), per_class=5)
  for png in sorted((root / "train" / "x").iterdir()):
    png.rename(root / "train" / png.name)
  (root / "train" / "x").rmdir()
  workdir = tmp_path / "w"
  workdir.mkdir()
  os.symlink(pretrained_workdir / "checkpoints", workdir / "checkpoints")
  monkeypatch.setattr(embedding_map, "algorithm", lambda: None)  # no map: faster
  config = tiny_config(f"folder:{root}")
  config.eval.batch_size = 8
  path = embed_lib.embed(config, str(workdir))  # eval_split "test" is not there
  assert path == str(workdir / embed_lib.EMBEDDINGS_DIR / "train.npz")
  with np.load(path) as npz:
    assert npz["paths"].tolist() == [f"train/{i}.png" for i in range(5)]
    assert npz["labels"].tolist() == [0] * 5 and npz["features"].shape[0] == 5


@pytest.mark.parametrize("mode", [export_lib.export_backbone, embed_lib.embed])
def test_without_a_checkpoint_fails_in_one_line(mode, tmp_path, image_folder):
  with pytest.raises(errors.ConfigError, match="No pretraining checkpoint") as e:
    mode(tiny_config(f"folder:{image_folder}"), str(tmp_path))
  assert "\n" not in str(e.value)


def test_export_and_knn_eval_read_the_same_step_of_a_damaged_workdir(
    pretrained_workdir, tmp_path, image_folder):
  workdir = str(damaged_copy(pretrained_workdir, tmp_path / "w", steps=[4]))
  listing = sorted(os.listdir(f"{workdir}/checkpoints"))
  config = tiny_config(f"folder:{image_folder}")
  out = export_lib.export_backbone(config, workdir)
  assert out["step"] == 2
  assert export.read_safetensors_header(out["safetensors"])["__metadata__"]["step"] == "2"
  assert knn_eval_lib.knn_eval(config, workdir)["step"] == 2
  assert sorted(os.listdir(f"{workdir}/checkpoints")) == listing  # nothing set aside


def test_export_without_a_readable_checkpoint_fails_in_one_short_line(
    pretrained_workdir, tmp_path, image_folder):
  workdir = str(damaged_copy(pretrained_workdir, tmp_path / "w", steps=[2, 4]))
  with pytest.raises(errors.ConfigError, match="No readable checkpoint in") as e:
    export_lib.export_backbone(tiny_config(f"folder:{image_folder}"), workdir)
  message = str(e.value)
  assert "\n" not in message and len(message) < 600, message
  assert "step 4 is unreadable" in message and "step 2 is unreadable" in message
  assert not os.path.exists(os.path.join(workdir, export_lib.EXPORT_DIR))
