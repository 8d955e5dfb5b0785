"""The head trainer's pieces: schedules, the probe on precomputed features, its test."""
import dataclasses
import re
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from corinfomax_jax import errors
from corinfomax_jax.eval import probe
from corinfomax_jax.run import checkpoints


def _separable_clusters(seed, n, dim=16, num_classes=4):
  rng = np.random.default_rng(seed)
  means = 4.0 * np.random.default_rng(123).normal(size=(num_classes, dim))
  labels = rng.integers(0, num_classes, n)
  feats = means[labels] + 0.5 * rng.normal(size=(n, dim))
  return feats.astype(np.float32), labels


def test_linear_probe_separates_separable_features():
  train_feats, train_labels = _separable_clusters(0, 500)  # 500 = 7 full batches + 52
  test_feats, test_labels = _separable_clusters(1, 300)
  params = probe.train_linear_probe_on_features(
      train_feats, train_labels, 4, epochs=10, batch_size=64, lr=0.1, min_lr=0.001,
      weight_decay=1e-4, seed=0)
  assert params["kernel"].shape == (16, 4) and params["bias"].shape == (4,)
  train_acc = probe.linear_probe_accuracy(params, train_feats, train_labels)
  assert train_acc["top1"] == 100.0
  acc = probe.linear_probe_accuracy(params, test_feats, test_labels, chunk_size=128)
  assert acc["top1"] >= 99.0 and acc["top5"] == 100.0


def test_linear_probe_is_seeded_and_learns_from_the_features():
  feats, labels = _separable_clusters(0, 128)
  kwargs = dict(epochs=2, batch_size=32, lr=0.05, schedule="constant")
  a = probe.train_linear_probe_on_features(feats, labels, 4, seed=3, **kwargs)
  b = probe.train_linear_probe_on_features(feats, labels, 4, seed=3, **kwargs)
  c = probe.train_linear_probe_on_features(feats, labels, 4, seed=4, **kwargs)
  jax.tree.map(np.testing.assert_array_equal, a, b)
  assert not np.array_equal(a["kernel"], c["kernel"])
  # Shuffled labels can't be learned to 100%: the probe isn't ignoring its input.
  shuffled = np.random.default_rng(0).permutation(labels)
  d = probe.train_linear_probe_on_features(feats, shuffled, 4, seed=3, **kwargs)
  assert probe.linear_probe_accuracy(d, feats, shuffled)["top1"] < 60.0


def test_linear_probe_bad_schedule_raises():
  feats, labels = _separable_clusters(0, 8)
  with pytest.raises(ValueError, match="'linear'.*'cosine', 'step', 'constant'"):
    probe.train_linear_probe_on_features(feats, labels, 4, epochs=1, batch_size=4,
                                            lr=0.1, schedule="linear")


def test_linear_probe_schedules_by_hand():
  # 10 steps per epoch, 50 epochs. step: x0.1 at epochs 20 and 40 (ImageNet-1K's
  # protocol); cosine: lr at the start, the midpoint of (lr, min_lr) halfway, min_lr
  # at the end.
  step = probe.learning_rate_schedule(25.0, "step", steps_per_epoch=10, epochs=50,
                                        step_epochs=20)
  np.testing.assert_allclose([step(s) for s in (0, 199, 200, 399, 400, 499)],
                             [25.0, 25.0, 2.5, 2.5, 0.25, 0.25], rtol=1e-6)
  cosine = probe.learning_rate_schedule(0.2, "cosine", steps_per_epoch=10, epochs=50,
                                          min_lr=2e-3)
  np.testing.assert_allclose([cosine(0), cosine(250), cosine(500)],
                             [0.2, (0.2 + 2e-3) / 2, 2e-3], rtol=1e-5)
  constant = probe.learning_rate_schedule(0.1, "constant", steps_per_epoch=10,
                                            epochs=50)
  assert float(constant(0)) == float(constant(499)) == pytest.approx(0.1)


def test_linear_probe_step_schedule_trains():
  feats, labels = _separable_clusters(0, 128)
  params = probe.train_linear_probe_on_features(
      feats, labels, 4, epochs=4, batch_size=32, lr=0.1, schedule="step", step_epochs=2)
  assert probe.linear_probe_accuracy(params, feats, labels)["top1"] == 100.0


def test_linear_probe_accuracy_matches_numpy():
  rng = np.random.default_rng(0)
  params = {"kernel": rng.normal(size=(8, 10)).astype(np.float32),
            "bias": rng.normal(size=(10,)).astype(np.float32)}
  feats = rng.normal(size=(203, 8)).astype(np.float32)
  labels = rng.integers(0, 10, 203)
  logits = feats @ params["kernel"] + params["bias"]
  top5 = np.argsort(-logits, axis=1)[:, :5]
  acc = probe.linear_probe_accuracy(params, feats, labels, chunk_size=50)
  assert acc["top1"] == pytest.approx(100 * np.mean(logits.argmax(1) == labels))
  assert acc["top5"] == pytest.approx(100 * np.mean((top5 == labels[:, None]).any(1)))


@pytest.mark.parametrize("schedule", ["cosine", "step"])
def test_one_schedule_serves_both_protocols(schedule):
  # Fine-tuning's parts each step by their own factor at the same epochs; cosine ends
  # at 0 without min_lr.
  lr = probe.learning_rate_schedule(0.5, schedule, steps_per_epoch=7, epochs=20,
                                    step_epochs=5, step_factor=0.2)
  expected = {"cosine": [0.5, 0.25, 0.0], "step": [0.5, 0.5 * 0.2 ** 2, 0.5 * 0.2 ** 3]}
  np.testing.assert_allclose([lr(0), lr(70), lr(140)], expected[schedule], atol=1e-7,
                             rtol=1e-6)


def test_sgd_gives_each_part_its_own_rate():
  params = {"backbone": {"w": np.ones(2, np.float32)}, "head": {"w": np.ones(2, np.float32)}}
  tx = probe.sgd({"backbone": 0.1, "head": 1.0}, momentum=0.0, weight_decay=0.0)
  grads = jax.tree.map(np.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(updates["backbone"]["w"], [-0.1, -0.1])
  np.testing.assert_allclose(updates["head"]["w"], [-1.0, -1.0])


class _Source:
  num_examples = 36


def test_a_batch_larger_than_the_split_is_named():
  plan = probe.make_plan(_Source(), batch_size=16, epochs=3, max_steps=5, key="k",
                         examples="labelled examples")
  assert (plan.steps_per_epoch, plan.schedule_steps, plan.num_steps) == (2, 6, 5)
  with pytest.raises(errors.ConfigError, match=re.escape(
      "config.eval.x.batch_size = 40 exceeds the 36 labelled examples: use a smaller "
      "batch.")):
    probe.make_plan(_Source(), batch_size=40, epochs=1, max_steps=-1,
                    key="eval.x.batch_size", examples="labelled examples")


def test_the_record_check_reads_missing_keys_as_their_defaults():
  expected = {"pretrain_step": 3, "protocol": {"a": 1}}
  check = probe.record_check(expected, "/d", what="fine-tuning", afresh="start afresh",
                             defaults={"protocol": {"a": 1}})
  check({"pretrain_step": 3}, 5)  # written before "protocol" existed: accepted
  with pytest.raises(errors.ConfigError, match=re.escape(
      "The fine-tuning checkpoint of step 5 in /d was written for {'pretrain_step': 4, "
      "'protocol': {'a': 1}}, but this run is")):
    check({"pretrain_step": 4}, 5)


@flax.struct.dataclass
class _EarlierProbeState:  # the linear probe's state of earlier versions
  step: jax.Array
  params: Any
  opt_state: Any


@flax.struct.dataclass
class _EarlierFinetuneState:  # fine-tuning's
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any


@pytest.mark.parametrize("earlier", [_EarlierProbeState, _EarlierFinetuneState])
def test_checkpoints_of_earlier_versions_restore_into_the_head_state(earlier, tmp_path):
  rng = np.random.default_rng(0)
  arrays = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  fields = dict(step=jnp.asarray(3, jnp.int32), params={"kernel": arrays(4, 2)},
                opt_state=({"kernel": arrays(4, 2)},))
  if earlier is _EarlierFinetuneState:
    fields["batch_stats"] = {"bn": {"mean": arrays(4)}}
  saved = earlier(**fields)
  manager = checkpoints.create_manager(tmp_path, keep=2)
  checkpoints.save(manager, 3, saved, {"pretrain_step": 1})
  template = jax.tree.map(jnp.zeros_like, probe.HeadState(**fields))
  restored, record = checkpoints.restore_latest(manager, template, lambda r, s: None)
  manager.close()
  assert isinstance(restored, probe.HeadState) and record["pretrain_step"] == 1
  assert restored.fields() == tuple(f.name for f in dataclasses.fields(earlier))
  jax.tree.map(np.testing.assert_array_equal, jax.tree.leaves(restored),
               jax.tree.leaves(saved))
