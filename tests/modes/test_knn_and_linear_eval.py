"""End-to-end tests of the evaluation modes: kNN monitor, knn_eval, linear_eval.

A tiny ResNet-18 (width 4) is pretrained for 3 steps once per module on a folder of
16 px PNGs whose 3 classes differ in colour (so a probe can learn them); each test
works on a copy of that workdir.
"""
import functools
import json
import os
import shutil

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from conftest import make_image_folder
from conftest import tiny_config
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from corinfomax_jax import errors
from corinfomax_jax import mesh as mesh_lib
from corinfomax_jax import models
from corinfomax_jax.data import pipeline
from corinfomax_jax.data import recipe
from corinfomax_jax.data import sources
from corinfomax_jax.eval import features
from corinfomax_jax.eval import knn
from corinfomax_jax.eval import probe
from corinfomax_jax.modes import embed as embed_lib
from corinfomax_jax.modes import export as export_lib
from corinfomax_jax.modes import knn_eval as knn_eval_lib
from corinfomax_jax.modes import linear_eval
from corinfomax_jax.modes import pretrain
from corinfomax_jax.run import checkpoints
from corinfomax_jax.run import settings
from corinfomax_jax.run import train_state as train_state_lib

_NUM_CLASSES = 3
_PER_CLASS = 12  # in each split: 36 train and 36 test images, sorted by class
_PRETRAIN_STEPS = 3
_FEATURE_DIM = 32  # ResNet-18 of width 4: 4 * 8
# 2 steps per epoch. After 3 pretraining steps BatchNorm's running statistics are far
# from the batch ones, features are large, and the probe needs a few dozen steps.
_PROBE_STEPS = 24


def _config(root):
  c = tiny_config(f"folder:{root}", max_steps=_PRETRAIN_STEPS,
                  checkpoint_every_steps=_PRETRAIN_STEPS, spectrum_every_steps=100)
  c.eval.batch_size = 16  # 36 images: 3 batches, the last with 12 padding rows
  c.eval.linear_batch_size = 16  # 2 steps per epoch
  c.eval.linear_epochs = _PROBE_STEPS // 2
  return c


@pytest.fixture(scope="module")
def image_root(tmp_path_factory):
  return str(make_image_folder(tmp_path_factory.mktemp("images"),
                               classes=("red", "green", "blue"), per_class=_PER_CLASS))


@pytest.fixture(scope="module")
def pretrained(image_root, tmp_path_factory):
  """(config, workdir, state) after _PRETRAIN_STEPS pretraining steps."""
  workdir = str(tmp_path_factory.mktemp("pretrain"))
  config = _config(image_root)
  state = pretrain.train_and_evaluate(config, workdir)
  assert int(state.step) == _PRETRAIN_STEPS
  return config, workdir, state


def _copy(workdir, tmp_path, name="workdir"):
  return shutil.copytree(workdir, tmp_path / name, ignore=shutil.ignore_patterns(
      "linear_eval*", "knn_eval*"))


def _read_json(path):
  with open(path) as f:
    return json.load(f)


def _probe_params(workdir, step):
  manager = checkpoints.create_manager(linear_eval.probe_checkpoint_dir(workdir), keep=2)
  probe = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore()))["state"]
  manager.close()
  return probe["params"]


def test_linear_eval_trains_checkpoints_and_resumes(pretrained, tmp_path):
  config, pretrain_dir, _ = pretrained
  workdir = str(_copy(pretrain_dir, tmp_path, "a"))
  result = linear_eval.linear_eval(config, workdir)
  written = _read_json(os.path.join(workdir, "linear_eval.json"))
  assert written == result
  assert result["variant"] == linear_eval.LINEAR_VARIANT
  assert result["pretrain_step"] == _PRETRAIN_STEPS
  assert result["step"] == result["trained_steps"] == _PROBE_STEPS
  assert (result["num_train_examples"], result["num_test_examples"]) == (36, 36)
  assert 0 <= result["top1"] <= result["top5"] <= 100
  assert result["top1"] > 50  # chance: 33; the classes differ in colour
  assert result["top5"] == 100.0  # 3 classes
  probe_dir = os.path.join(workdir, "linear_eval")
  assert os.path.isdir(os.path.join(probe_dir, "checkpoints", str(_PROBE_STEPS)))
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(probe_dir))

  # Done: a second call restores the finished probe, trains nothing, same numbers.
  again = linear_eval.linear_eval(config, workdir)
  assert again["trained_steps"] == 0 and again["step"] == _PROBE_STEPS
  assert (again["top1"], again["top5"]) == (result["top1"], result["top5"])

  # Interrupted after 1 step, then resumed: the same probe as the uninterrupted run
  # (the data position is the probe's step).
  other = str(_copy(pretrain_dir, tmp_path, "b"))
  first = config.copy_and_resolve_references()
  first.eval.linear_max_steps = 1
  assert linear_eval.linear_eval(first, other)["step"] == 1
  resumed = linear_eval.linear_eval(config, other)
  assert resumed["trained_steps"] == _PROBE_STEPS - 1 and resumed["step"] == _PROBE_STEPS
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               _probe_params(other, _PROBE_STEPS), _probe_params(workdir, _PROBE_STEPS))
  assert (resumed["top1"], resumed["top5"]) == (result["top1"], result["top5"])

  # A probe of another protocol is not resumed silently.
  changed = config.copy_and_resolve_references()
  changed.eval.linear_lr = 0.5
  # (The probe's record keeps the flat key names of earlier versions; the message
  # names the section, config.eval.linear.)
  with pytest.raises(errors.ConfigError, match=r"linear_lr.*config\.eval\.linear changed"):
    linear_eval.linear_eval(changed, other)


def test_probe_step_leaves_the_backbone_alone(pretrained):
  config, _, state = pretrained
  mesh = mesh_lib.make_mesh()
  run = settings.resolve(config)
  backbone = run.model.backbone()
  tx = optax.sgd(0.5, momentum=0.9)
  head = probe.create_state(
      lambda rng: models.init_linear_head(_FEATURE_DIM, _NUM_CLASSES, init="lecun_normal",
                                          rng=rng), jax.random.PRNGKey(0), tx, mesh)
  variables = probe.backbone_variables(state)
  before = jax.device_get(variables)
  rng = np.random.default_rng(0)
  batch = {"image": rng.integers(0, 256, size=(16, 16, 16, 3), dtype=np.uint8),
           "label": rng.integers(0, _NUM_CLASSES, 16).astype(np.int32)}
  mean, std = run.data.mean, run.data.std
  train_step = functools.partial(probe.train_step, model=backbone, tx=tx,
                                 learning_rate_fn=lambda s: 0.5, mean=mean, std=std,
                                 train_backbone=False)
  step = jax.jit(train_step, in_shardings=(NamedSharding(mesh, P()),
                                           NamedSharding(mesh, P()),
                                           NamedSharding(mesh, P("data"))))
  head0 = jax.device_get(head.params)
  new_head, metrics = step(head, variables, batch)
  new_head, _ = step(new_head, variables, batch)
  # The backbone's parameters and BatchNorm statistics are unchanged.
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(variables), before)
  # The loss is that of the inference-mode features (running statistics, not the
  # batch's) of the whole model, and the probe moved.
  images = (batch["image"] / 255.0 - np.array(mean)) / np.array(std)
  features_ = run.model.create().apply(
      {"params": state.params, "batch_stats": state.batch_stats},
      images.astype(np.float32), train=False)[0]
  logits = features_ @ head0["kernel"] + head0["bias"]
  expected = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
  np.testing.assert_allclose(metrics["loss"], expected.mean(), rtol=1e-4)
  assert not np.allclose(new_head.params["kernel"], head0["kernel"])
  assert new_head.batch_stats is None and int(new_head.step) == 2
  # No gradient reaches the backbone.
  grads = jax.grad(lambda v: train_step(head, v, batch)[1]["loss"])(variables)
  assert all(not np.any(g) for g in jax.tree.leaves(grads))


def test_knn_monitor_matches_features_computed_directly(pretrained):
  config, _, state = pretrained
  mesh = mesh_lib.make_mesh()
  run = settings.resolve(config)
  model = run.model.create()
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  train_source = sources.get_source(config.dataset, None, "train")
  test_source = sources.get_source(config.dataset, None, "test")

  # 36 test images in 3 global batches of 16, the last with 12 padding rows: sharded
  # extraction drops the padding and equals a plain, unsharded forward pass.
  feats, labels = features.extract_features(model, variables, mesh, test_source,
                                              batch_size=16, data=run.data)
  batches = list(pipeline.eval_batches(test_source, pipeline.BatchSpec(16, 16),
                                       recipe.views(run.data.recipe)))
  images = np.concatenate([b["image"][b["mask"] > 0] for b in batches])
  mean, std = run.data.mean, run.data.std
  images = ((images / 255.0 - np.array(mean)) / np.array(std)).astype(np.float32)
  direct = model.apply(jax.device_get(variables), images, train=False)[0]
  assert feats.shape == (_NUM_CLASSES * _PER_CLASS, _FEATURE_DIM)
  np.testing.assert_allclose(feats, direct, rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(labels, np.repeat(np.arange(_NUM_CLASSES), _PER_CLASS))

  bank, bank_labels = features.extract_features(model, variables, mesh, train_source,
                                                  batch_size=16, data=run.data)
  result = knn.KnnEvaluator(run.eval.knn, features.Context(
      run.data, run.eval.batch_size, model, mesh, train_source, test_source)).run(variables)
  ks = (10, 20, 100, 200)
  assert set(result) == {"top1", "top5", "num_bank_examples", "num_query_examples",
                         *(f"top{i}_k{k}" for i in (1, 5) for k in ks)}
  assert {k: result[k] for k in ("top1", "top5")} == knn.knn_accuracy(
      bank, bank_labels, feats, labels, _NUM_CLASSES)
  for k in ks:  # one pass for all k equals a run per k
    assert {n: result[f"{n}_k{k}"] for n in ("top1", "top5")} == knn.knn_accuracy(
        bank, bank_labels, feats, labels, _NUM_CLASSES, k=k)
  assert 0 <= result["top1"] <= result["top5"] <= 100


def test_max_train_examples_spreads_over_the_classes(pretrained):
  config, _, state = pretrained
  mesh = mesh_lib.make_mesh()
  run = settings.resolve(config)
  model = run.model.create()
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  source = sources.get_source(config.dataset, None, "train")
  all_feats, _ = features.extract_features(model, variables, mesh, source,
                                             batch_size=16, data=run.data)
  # The folder is sorted by class (12 each): every 6th image covers all classes.
  feats, labels = features.extract_features(model, variables, mesh, source,
                                              batch_size=16, data=run.data,
                                              max_examples=6)
  np.testing.assert_array_equal(labels, [0, 0, 1, 1, 2, 2])
  np.testing.assert_allclose(feats, all_feats[::6], rtol=1e-5, atol=1e-6)


def test_the_knn_monitor_alone_takes_its_own_bank_and_query_sizes(image_root):
  config = _config(image_root)
  config.eval.knn.update(monitor_max_train_examples=12, monitor_max_test_examples=9)
  run, mesh = settings.resolve(config), mesh_lib.make_mesh()
  model = run.model.create()
  variables = train_state_lib.backbone_variables(
      train_state_lib.initial_state(run, model, mesh))
  train_source, test_source = (sources.get_source(config.dataset, None, split)
                               for split in ("train", "test"))
  evaluator = knn.KnnEvaluator(run.eval.knn, features.Context(
      run.data, 16, model, mesh, train_source, test_source))
  monitor = evaluator.run(variables)
  assert (monitor["num_bank_examples"], monitor["num_query_examples"]) == (12, 9)
  # --mode=knn_eval's: the whole splits.
  assert evaluator.accuracies(variables)[1] == {"num_bank_examples": 36,
                                                "num_query_examples": 36}
  # Both spread evenly over their splits (sorted by class): every class in each.
  bank, bank_labels, queries, query_labels = (
      x for source, n in ((train_source, 12), (test_source, 9))
      for x in features.extract_features(model, variables, mesh, source, batch_size=16,
                                           data=run.data, max_examples=n))
  assert set(bank_labels) == set(query_labels) == {0, 1, 2}
  assert {k: monitor[k] for k in ("top1", "top5")} == knn.knn_accuracy(
      bank, bank_labels, queries, query_labels, 3)


def test_knn_eval_without_checkpoint_names_the_workdir(image_root, tmp_path):
  workdir = str(tmp_path / "empty")
  with pytest.raises(errors.ConfigError, match=f"{workdir}.*random_init"):
    knn_eval_lib.knn_eval(_config(image_root), workdir)
  with pytest.raises(errors.ConfigError, match="No pretraining checkpoint"):
    linear_eval.linear_eval(_config(image_root), workdir)


def test_knn_eval_of_random_init(image_root, tmp_path):
  config = _config(image_root)
  config.eval.random_init = True
  config.eval.max_train_examples = 20
  workdir = str(tmp_path / "random")
  result = knn_eval_lib.knn_eval(config, workdir)
  assert _read_json(os.path.join(workdir, knn_eval_lib.RESULT_FILE)) == result
  assert result["random_init"] is True and result["step"] == 0
  assert (result["num_bank_examples"], result["num_query_examples"]) == (20, 36)
  assert 0 <= result["top1"] <= result["top5"] <= 100


def test_a_one_class_knn_eval_says_its_top1_is_trivial(tmp_path, caplog):
  root = make_image_folder(tmp_path / "images", classes=("red",), per_class=4)
  config = _config(str(root))
  config.eval.random_init = True
  config.eval.batch_size = 8
  with caplog.at_level("WARNING"):
    result = knn_eval_lib.knn_eval(config, str(tmp_path / "w"))
  assert result["top1"] == 100.0 and result["trivial"] is True
  warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
  assert any("has 1 class, so top-1 is 100 whatever the features" in w
             for w in warnings), warnings


def test_knn_eval_of_the_checkpoint(pretrained, tmp_path):
  config, pretrain_dir, _ = pretrained
  workdir = str(_copy(pretrain_dir, tmp_path))
  result = knn_eval_lib.knn_eval(config, workdir)
  assert _read_json(os.path.join(workdir, knn_eval_lib.RESULT_FILE)) == result
  assert result["random_init"] is False and result["step"] == _PRETRAIN_STEPS
  assert (result["num_bank_examples"], result["num_query_examples"]) == (36, 36)
  assert (result["k"], result["temperature"]) == (200, 0.07)
  assert list(result["by_k"]) == ["10", "20", "100", "200"]
  assert result["by_k"]["200"] == {"top1": result["top1"], "top5": result["top5"]}
  assert result["by_temperature"] == {"0.07": result["by_k"]}
  assert 0 <= result["top1"] <= result["top5"] <= 100


def test_linear_eval_precomputed_variant(pretrained, tmp_path):
  config, pretrain_dir, _ = pretrained
  workdir = str(_copy(pretrain_dir, tmp_path))
  config = config.copy_and_resolve_references()
  config.eval.linear_precomputed = True
  config.eval.linear_epochs = 20
  result = linear_eval.linear_eval(config, workdir)
  assert _read_json(os.path.join(workdir, "linear_eval.json")) == result
  assert result["variant"] == "precomputed_center_crop_features"
  assert (result["num_train_examples"], result["num_test_examples"]) == (36, 36)
  assert 50 < result["top1"] <= result["top5"] <= 100  # chance: 33
  assert not os.path.exists(os.path.join(workdir, "linear_eval", "checkpoints"))


def test_eval_config_errors(image_root, tmp_path):
  config = _config(image_root)
  config.eval.linear_batch_size = 12  # 8 devices
  with pytest.raises(errors.ConfigError, match=r"config.eval.linear.batch_size = 12 .*8 "
                     "devices"):
    linear_eval.linear_eval(config, str(tmp_path))
  config = _config(image_root)
  config.eval.linear_schedule = "linear"
  with pytest.raises(errors.ConfigError, match="config.eval.linear.schedule"):
    linear_eval.linear_eval(config, str(tmp_path))
  config = _config(image_root)
  config.eval.max_train_examples = 0
  with pytest.raises(errors.ConfigError, match="config.eval.knn.max_train_examples"):
    knn_eval_lib.knn_eval(config, str(tmp_path))


@pytest.mark.parametrize("method", ["vicreg"])
def test_evaluation_modes_read_a_workdir_of_another_method(method, image_root, tmp_path):
  """knn_eval, linear_eval, export and embed read the backbone whatever the objective.

  The readers do not depend on which stateless objective wrote the workdir; a Barlow
  Twins workdir is read by fine-tuning in tests/modes/test_finetune.py."""
  config = _config(image_root)
  config.method = method
  workdir = str(tmp_path / method)
  state = pretrain.train_and_evaluate(config, workdir)
  assert int(state.step) == _PRETRAIN_STEPS

  result = knn_eval_lib.knn_eval(config, workdir)
  assert _read_json(os.path.join(workdir, knn_eval_lib.RESULT_FILE)) == result
  assert result["method"] == method and result["step"] == _PRETRAIN_STEPS
  assert (result["num_bank_examples"], result["num_query_examples"]) == (36, 36)
  assert 0 <= result["top1"] <= result["top5"] <= 100

  # The checkpoint says which objective wrote it: another method's config is refused.
  with pytest.raises(errors.ConfigError, match=f"method.*{method!r}.*'corinfomax'"):
    knn_eval_lib.knn_eval(_config(image_root), workdir)

  linear = config.copy_and_resolve_references()
  linear.eval.linear.precomputed = True
  linear.eval.linear.epochs = 2
  result = linear_eval.linear_eval(linear, workdir)
  assert _read_json(os.path.join(workdir, linear_eval.LINEAR_RESULT_FILE)) == result
  assert result["variant"] == linear_eval.PRECOMPUTED_VARIANT
  assert result["method"] == method and result["pretrain_step"] == _PRETRAIN_STEPS
  assert (result["num_train_examples"], result["num_test_examples"]) == (36, 36)
  assert 0 <= result["top1"] <= result["top5"] == 100.0  # 3 classes

  out = export_lib.export_backbone(config, workdir)
  assert out["step"] == _PRETRAIN_STEPS
  assert os.path.isfile(out["safetensors"]) and os.path.isfile(out["msgpack"])

  path = embed_lib.embed(config, workdir)
  assert path == os.path.join(workdir, embed_lib.EMBEDDINGS_DIR, "test.npz")
  with np.load(path) as npz:
    feats, labels = npz["features"], npz["labels"]
  assert feats.shape == (_NUM_CLASSES * _PER_CLASS, _FEATURE_DIM)
  assert np.all(np.isfinite(feats))
  np.testing.assert_array_equal(labels, np.repeat(np.arange(_NUM_CLASSES), _PER_CLASS))
