"""The linear probe: a linear classifier on frozen backbone features, and --mode=linear_eval.

The paper's protocol trains the probe on random resized crops through the frozen
backbone (`linear_eval`, through the shared loop skeleton, resumable); a faster variant
trains it on centre-crop features computed once (`train_linear_probe_on_features`).
"""
from __future__ import annotations

import functools
import math
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from corinfomax_jax.data import augment
from corinfomax_jax.data import recipe as recipe_lib
from corinfomax_jax.run import checkpoints
from corinfomax_jax.eval import evaluators
from corinfomax_jax import files
from corinfomax_jax.eval import knn
from corinfomax_jax.run import loop
from corinfomax_jax import mesh as mesh_lib
from corinfomax_jax.run import writers as metrics_lib
from corinfomax_jax import models
from corinfomax_jax.run import train_state as train_state_lib
from corinfomax_jax.run import settings as settings_lib
from corinfomax_jax.run import workdir_lock
from corinfomax_jax.modes import startup
from corinfomax_jax.errors import ConfigError

LINEAR_VARIANT = "frozen_backbone_random_resized_crop"  # the paper's protocol
PRECOMPUTED_VARIANT = "precomputed_center_crop_features"
LINEAR_DIR = "linear_eval"  # TensorBoard events and probe checkpoints, in the workdir
LINEAR_RESULT_FILE = "linear_eval.json"
# Probe hyperparameters a resumed probe must share with the run that wrote it.
_LINEAR_KEYS = ("linear_epochs", "linear_batch_size", "linear_lr", "linear_min_lr",
                "linear_schedule", "linear_step_epochs", "linear_weight_decay",
                "linear_momentum")


def linear_probe_schedule(lr: float, schedule: str, *, steps_per_epoch: int, epochs: int,
                          min_lr: float = 0.0, step_epochs: int = 20) -> optax.Schedule:
  """The probe's per-step learning rate.

  "cosine": from lr to min_lr over epochs * steps_per_epoch steps; "step": lr times 0.1
  every step_epochs epochs (the ImageNet-1K protocol; min_lr unused); "constant": lr.
  """
  if schedule == "cosine":
    return optax.cosine_decay_schedule(lr, max(epochs * steps_per_epoch, 1),
                                       alpha=min_lr / lr)
  if schedule == "step":
    if not isinstance(step_epochs, int) or step_epochs <= 0:
      raise ValueError(f"step_epochs {step_epochs!r} must be a positive integer")
    return optax.piecewise_constant_schedule(
        lr, {e * steps_per_epoch: 0.1 for e in range(step_epochs, epochs, step_epochs)})
  if schedule == "constant":
    return optax.constant_schedule(lr)
  raise ValueError(f"linear probe schedule {schedule!r} is not supported; accepted: "
                   f"{', '.join(repr(s) for s in settings_lib.LINEAR_SCHEDULES)}")


def train_linear_probe_on_features(train_feats, train_labels, num_classes: int, *,
                                   epochs: int, batch_size: int, lr: float,
                                   momentum: float = 0.9, weight_decay: float = 0.0,
                                   schedule: str = "cosine", min_lr: float = 0.0,
                                   step_epochs: int = 20,
                                   seed: int = 0) -> dict[str, jax.Array]:
  """Trains a linear classifier (softmax cross-entropy) on fixed features.

  SGD with momentum; weight decay is added to the gradient before momentum, as in
  torch.optim.SGD. The learning rate follows `linear_probe_schedule` with
  ceil(n / batch_size) steps per epoch (schedule "cosine": per step from lr to min_lr;
  "step": x0.1 every step_epochs epochs; "constant"). Each epoch sees every sample once
  in a fresh random order (the last batch is padded and the padding masked out).
  Returns params {"kernel": (dim, num_classes), "bias": (num_classes,)}.
  """
  feats = jnp.asarray(train_feats, jnp.float32)
  labels = jnp.asarray(train_labels, jnp.int32)
  n, dim = feats.shape
  if labels.shape != (n,):
    raise ValueError(f"train_labels shape {labels.shape} must be ({n},)")
  if n == 0 or epochs <= 0 or batch_size <= 0 or lr <= 0:
    raise ValueError(f"need samples and positive epochs, batch_size, lr; got n={n}, "
                     f"epochs={epochs}, batch_size={batch_size}, lr={lr}")
  batch_size = min(batch_size, n)
  steps_per_epoch = math.ceil(n / batch_size)
  learning_rate = linear_probe_schedule(lr, schedule, steps_per_epoch=steps_per_epoch,
                                        epochs=epochs, min_lr=min_lr,
                                        step_epochs=step_epochs)
  tx = train_state_lib.sgd(learning_rate, momentum=momentum, weight_decay=weight_decay)

  init_key, key = jax.random.split(jax.random.key(seed))
  params = models.init_linear_head(dim, num_classes, init="lecun_normal", rng=init_key)
  opt_state = tx.init(params)

  @jax.jit
  def train_epoch(params, opt_state, feats, labels, key):
    order = jax.random.permutation(key, n)
    padded = jnp.resize(order, steps_per_epoch * batch_size)  # repeats: masked below
    valid = jnp.arange(padded.size) < n
    batches = (padded.reshape(steps_per_epoch, batch_size),
               valid.reshape(steps_per_epoch, batch_size).astype(jnp.float32))

    def step(carry, batch):
      params, opt_state = carry
      idx, weight = batch

      def loss_fn(params):
        losses = optax.softmax_cross_entropy_with_integer_labels(
            models.linear_logits(params, feats[idx]), labels[idx])
        return jnp.sum(losses * weight) / jnp.sum(weight)

      loss, grads = jax.value_and_grad(loss_fn)(params)
      updates, opt_state = tx.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), loss

    (params, opt_state), losses = jax.lax.scan(step, (params, opt_state), batches)
    return params, opt_state, losses.mean()

  for epoch_key in jax.random.split(key, epochs):
    params, opt_state, _ = train_epoch(params, opt_state, feats, labels, epoch_key)
  return params


@jax.jit
def _probe_chunk_hits(params, feats, labels, valid):
  return knn.topk_hits(models.linear_logits(params, feats), labels, valid)


def linear_probe_accuracy(params: dict[str, jax.Array], feats, labels, *,
                          chunk_size: int = 4096) -> dict[str, float]:
  """{"top1", "top5"} accuracy in percent of train_linear_probe_on_features' params."""
  knn.check_chunk_size(chunk_size)
  if np.shape(labels) != (feats.shape[0],):
    raise ValueError(f"labels shape {np.shape(labels)} must be ({feats.shape[0]},)")
  hits = np.zeros(2, np.int64)
  for (chunk, _), (chunk_labels, valid) in zip(
      knn.padded_chunks(feats, chunk_size), knn.labels_and_masks(labels, chunk_size)):
    hits += np.asarray(_probe_chunk_hits(params, chunk, chunk_labels, valid))
  return knn.accuracy(hits, feats.shape[0])


# ---------------------------------------------------------------------------------
# The probe on the frozen backbone, image batches in.
# ---------------------------------------------------------------------------------
@flax.struct.dataclass
class ProbeState:
  """The linear probe's training state; its checkpoint is exactly this pytree."""
  step: jax.Array
  params: Any  # {"kernel": (dim, num_classes), "bias": (num_classes,)}
  opt_state: Any


def create_probe_state(num_features: int, num_classes: int,
                       tx: optax.GradientTransformation, mesh: jax.sharding.Mesh,
                       seed: int) -> ProbeState:
  """The initial probe (flax Dense initialisation), created replicated on `mesh`."""

  def init(rng):
    params = models.init_linear_head(num_features, num_classes, init="lecun_normal",
                                     rng=rng)
    return ProbeState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=tx.init(params))

  return jax.jit(init, out_shardings=mesh_lib.replicated(mesh))(jax.random.PRNGKey(seed))


def probe_train_step(probe: ProbeState, variables, batch, *, model, tx,
                     learning_rate_fn, mean, std):
  """One SGD step of the probe on {"image", "label"}: (new probe, metrics).

  The backbone runs in inference mode (BatchNorm uses its running statistics, which
  stay as they are) and its features are cut from the gradient: only the probe trains.
  """
  images = augment.normalize_uint8(batch["image"], mean, std)
  features = jax.lax.stop_gradient(model.apply(variables, images, train=False)[0])

  def loss_fn(params):
    logits = models.linear_logits(params, features)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
    return loss, logits

  (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(probe.params)
  updates, opt_state = tx.update(grads, probe.opt_state, probe.params)
  metrics = {"loss": loss,
             "top1": 100.0 * jnp.mean(jnp.argmax(logits, -1) == batch["label"]),
             "learning_rate": learning_rate_fn(probe.step)}
  return probe.replace(step=probe.step + 1,
                       params=optax.apply_updates(probe.params, updates),
                       opt_state=opt_state), metrics


def _probe_eval_hits(params, variables, batch, *, model, mean, std):
  """[top-1 hits, top-5 hits, real rows] of one padded eval batch."""
  images = augment.normalize_uint8(batch["image"], mean, std)
  features = model.apply(variables, images, train=False)[0]
  valid = batch["mask"] > 0
  return jnp.concatenate([knn.topk_hits(models.linear_logits(params, features), batch["label"],
                                     valid), valid.sum()[None]])


def probe_checkpoint_dir(workdir: str):
  """workdir/linear_eval/checkpoints as an epath Path (workdir a local path or a URL)."""
  return files.as_path(workdir) / LINEAR_DIR / "checkpoints"


def _probe_record(linear: settings_lib.Linear, pretrain_step: int) -> dict:
  # The record keeps the flat key names of earlier versions: their probes still resume.
  return {"pretrain_step": pretrain_step,
          "eval": {k: getattr(linear, k[len("linear_"):]) for k in _LINEAR_KEYS}}


def _check_probe_record(expected: dict, directory):
  def check(record, step):
    saved = {k: record.get(k) for k in expected}
    if saved != expected:
      raise ConfigError(
          f"The linear probe checkpoint of step {step} in {directory} was written for "
          f"{saved}, but this run is {expected} (the pretraining checkpoint or "
          "config.eval.linear changed). Move that directory away to train a new probe, "
          "or use the original configuration.")
  return check


def _linear_eval_augmented(run: settings_lib.Settings, workdir, model, variables,
                           pretrain_step, mesh, train_source, eval_source, writer) -> dict:
  """The paper's protocol: random resized crops through the frozen backbone, resumable."""
  from corinfomax_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  lin, data = run.eval.linear, run.data
  batch_size = lin.batch_size
  steps_per_epoch = pipeline.steps_per_epoch(train_source.num_examples, batch_size)
  num_steps = lin.epochs * steps_per_epoch
  if lin.max_steps != -1:
    num_steps = min(num_steps, lin.max_steps)
  learning_rate_fn = linear_probe_schedule(
      lin.lr, lin.schedule, steps_per_epoch=steps_per_epoch,
      epochs=lin.epochs, min_lr=lin.min_lr, step_epochs=lin.step_epochs)
  tx = train_state_lib.sgd(learning_rate_fn, momentum=lin.momentum,
                           weight_decay=lin.weight_decay)
  probe = create_probe_state(models.feature_dim(model, data.image_size),
                             train_source.num_classes, tx, mesh, run.seed)

  mean, std = data.mean, data.std

  # --- Resume: the data position is the probe's step.
  manager = checkpoints.create_manager(probe_checkpoint_dir(workdir), keep=2)
  try:
    record = _probe_record(lin, pretrain_step)
    restored, _ = checkpoints.restore_latest(
        manager, probe, _check_probe_record(record, manager.directory))
    if restored is not None:
      probe = restored
      logging.info("Linear probe resumed from %s at step %d of %d.", manager.directory,
                   int(probe.step), num_steps)
    start_step = int(probe.step)

    # --- Train, on the loop skeleton: progress and NaN guard each epoch, checkpoint.
    replicated, sharded = mesh_lib.replicated(mesh), mesh_lib.batch_sharded(mesh)
    step_fn = jax.jit(
        functools.partial(probe_train_step, model=model, tx=tx,
                          learning_rate_fn=learning_rate_fn, mean=mean, std=std),
        in_shardings=(replicated, replicated, sharded),
        out_shardings=(replicated, replicated),
        donate_argnums=(0,))
    logging.info("Linear probe (%s): steps %d to %d, batch %d, %d steps per epoch, lr %g "
                 "%s.", LINEAR_VARIANT, start_step, num_steps, batch_size, steps_per_epoch,
                 lin.lr, lin.schedule)
    if start_step < num_steps:
      batches = pipeline.global_batches(
          pipeline.probe_train_batches(
              train_source, pipeline.BatchSpec(batch_size, data.image_size, run.seed),
              recipe_lib.views(data.recipe), start_step=start_step),
          sharded)
      report = loop.ReportProgress(
          name="linear probe", num_steps=num_steps, every_steps=steps_per_epoch,
          batch_size=batch_size, steps_per_epoch=steps_per_epoch, writer=writer,
          prefix="linear/train_",
          nonfinite_hint=lambda: f"Lower config.eval.linear.lr ({lin.lr}).")
      actions = [report, loop.Checkpoint(manager, steps_per_epoch, lambda: record,
                                         before_save=report.flush)]
      probe, preempted = loop.run(probe, lambda p, b: step_fn(p, variables, b), batches,
                                  start_step=start_step, num_steps=num_steps,
                                  actions=actions)
      if preempted:
        return {"preempted": True, "step": int(probe.step)}
  finally:
    try:
      checkpoints.finish(manager)
    finally:
      manager.close()

  # --- Test: resize + centre crop, padding masked.
  hits = evaluators.eval_split_sums(
      functools.partial(_probe_eval_hits, model=model, mean=mean, std=std),
      (probe.params, variables), mesh, eval_source, data,
      run.eval.batch_size).astype(np.int64)
  return {**knn.accuracy(hits[:2], int(hits[2])), "step": int(probe.step),
          "trained_steps": int(probe.step) - start_step, "num_steps": num_steps,
          "steps_per_epoch": steps_per_epoch,
          "num_train_examples": train_source.num_examples,
          "num_test_examples": int(hits[2])}


def _linear_eval_precomputed(run: settings_lib.Settings, model, variables, mesh,
                             train_source, eval_source) -> dict:
  """The faster variant: one pass of centre-crop features, then the probe on them."""
  lin = run.eval.linear
  kwargs = dict(batch_size=run.eval.batch_size, data=run.data)
  train_feats, train_labels = evaluators.extract_features(model, variables, mesh,
                                                          train_source, **kwargs)
  test_feats, test_labels = evaluators.extract_features(model, variables, mesh,
                                                        eval_source, **kwargs)
  logging.info("Linear probe (%s): %d epochs on %d features, lr %g %s.",
               PRECOMPUTED_VARIANT, lin.epochs, len(train_feats), lin.lr, lin.schedule)
  params = train_linear_probe_on_features(
      train_feats, train_labels, train_source.num_classes, epochs=lin.epochs,
      batch_size=lin.batch_size, lr=lin.lr, momentum=lin.momentum,
      weight_decay=lin.weight_decay, schedule=lin.schedule,
      min_lr=lin.min_lr, step_epochs=lin.step_epochs, seed=run.seed)
  return {**linear_probe_accuracy(params, test_feats, test_labels),
          "num_train_examples": int(len(train_feats)),
          "num_test_examples": int(len(test_feats))}


def linear_eval(config, workdir: str) -> dict:
  """--mode=linear_eval: a linear probe on the frozen backbone of the latest checkpoint.

  The paper's protocol (config.eval.linear): a Dense(num_classes) on the pooled
  backbone features, trained with SGD momentum on random resized crops + flips of the
  train split, the backbone in inference mode and out of the gradient; tested on centre
  crops of config.eval_split. Its checkpoints (<workdir>/linear_eval/checkpoints) are
  written at the end of each epoch and resumed; a preemption notice (SIGTERM) saves and
  stops, and the returned dict then says {"preempted": True}. With
  config.eval.linear.precomputed the probe instead trains on centre-crop features
  extracted once (faster; labelled "variant": "precomputed_center_crop_features").
  config.eval.linear.lr is used as given, not scaled with its batch_size (the
  paper's 0.2 is for batch 256). Logs and writes top-1/top-5 to TensorBoard
  (<workdir>/linear_eval) and <workdir>/linear_eval.json, and returns that dict.
  Holds the workdir's lock (workdir_lock) from start-up until it returns or raises.
  """
  with workdir_lock.WorkdirLock(workdir, "linear_eval") as lock:
    return _linear_eval(config, workdir, lock)


def _linear_eval(config, workdir: str, lock) -> dict:
  def batch_sizes(run):
    sizes = {"eval.batch_size": run.eval.batch_size}
    if not run.eval.linear.precomputed:
      sizes["eval.linear.batch_size"] = run.eval.linear.batch_size
    return sizes

  # The workdir must hold the pretraining: it is not created.
  run, mesh = startup.begin(config, workdir, batch_sizes=batch_sizes,
                            create_workdir=False, lock=lock)
  lin, data = run.eval.linear, run.data
  # Every split and size check comes before the network is built and restored.
  train_source, eval_source = evaluators.open_sources(data)
  if not lin.precomputed and lin.batch_size > train_source.num_examples:
    raise ConfigError(
        f"config.eval.linear.batch_size = {lin.batch_size} exceeds the "
        f"{train_source.num_examples} examples of {data.dataset} "
        f"{data.train_split!r}: use a smaller batch.")
  model = run.model.create()
  state = startup.backbone_state(run, model, mesh, workdir, random_init=False)
  pretrain_step = int(state.step)
  variables = train_state_lib.backbone_variables(state)
  writer = metrics_lib.MetricWriter(files.as_path(workdir) / LINEAR_DIR)
  try:
    if lin.precomputed:
      variant, tag = PRECOMPUTED_VARIANT, "linear_precomputed"
      result = _linear_eval_precomputed(run, model, variables, mesh, train_source,
                                        eval_source)
    else:
      variant, tag = LINEAR_VARIANT, "linear"
      result = _linear_eval_augmented(run, workdir, model, variables, pretrain_step,
                                      mesh, train_source, eval_source, writer)
      if result.get("preempted"):
        logging.warning("Linear probe preempted at step %d; its checkpoint is in %s. Run "
                        "the same command again to resume.", result["step"],
                        probe_checkpoint_dir(workdir))
        return result
    # Test accuracy against the pretraining step: probes of successive checkpoints of a
    # run form one curve.
    writer.scalars(pretrain_step, {f"{tag}/test_top1": result["top1"],
                                   f"{tag}/test_top5": result["top5"]})
  finally:
    writer.close()
  result.update(variant=variant, pretrain_step=pretrain_step, dataset=data.dataset,
                train_split=data.train_split, eval_split=data.eval_split,
                method=run.method.name,
                **{k[len("linear_"):]: getattr(lin, k[len("linear_"):])
                   for k in _LINEAR_KEYS})
  path = startup.write_result(workdir, LINEAR_RESULT_FILE, result)
  logging.info("Linear probe (%s) on the checkpoint of step %d: top-1 %.2f top-5 %.2f "
               "on %d %s images; written to %s.", variant, result["pretrain_step"],
               result["top1"], result["top5"], result["num_test_examples"],
               data.eval_split, path)
  return result
