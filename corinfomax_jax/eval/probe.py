"""One supervised head on backbone features: the linear probe, fine-tuning, online probe.

A linear head (models.linear_logits) learns with cross-entropy and SGD; one switch,
`train_backbone`, says whether the backbone learns with it:
  - False (the linear probe): the backbone runs in inference mode on frozen variables
    and its features are cut from the gradient;
  - True (fine-tuning): the backbone and the head are one parameter tree
    {"backbone", "head"}, each part with its own learning rate, and BatchNorm runs in
    training mode.
`Trainer` is that loop (plan, resume, jitted step, progress, checkpoint each epoch,
its test); `EpochEndTests` and `LastLosses` are loop actions it takes; `evaluate_head`
is the test path (top-1/top-5 over centre crops); `train_linear_probe_on_features` the
same update on precomputed features (`linear_probe_on_centre_crops` extracts them); and
`OnlineProbeEvaluator` tests the online probe that pretraining trains with
`head_update`. The modes (linear_eval, finetune) only choose the subset, the
optimizer's settings and the result file.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from corinfomax_jax import compiler
from corinfomax_jax import mesh as mesh_lib
from corinfomax_jax import models
from corinfomax_jax.data import augment
from corinfomax_jax.data import recipe as recipe_lib
from corinfomax_jax.errors import ConfigError
from corinfomax_jax.eval import features as features_lib
from corinfomax_jax.eval import metrics
from corinfomax_jax.run import loop
from corinfomax_jax.run import settings as settings_lib
from corinfomax_jax.run import train_state as train_state_lib


@dataclasses.dataclass(frozen=True)
class HeadState:
  """The head's training state; its checkpoint is exactly this pytree.

  params: the head {"kernel", "bias"}, or {"backbone", "head"} when the backbone
  trains; batch_stats: the backbone's BatchNorm statistics when it trains, else None,
  which leaves no entry at all: a probe's checkpoint is {step, params, opt_state}
  and a fine-tuning one {step, params, batch_stats, opt_state}, as in earlier versions.
  """
  step: jax.Array
  params: Any
  opt_state: Any
  batch_stats: Any = None

  def replace(self, **changes) -> HeadState:
    return dataclasses.replace(self, **changes)

  def fields(self) -> tuple[str, ...]:
    if self.batch_stats is None:
      return ("step", "params", "opt_state")
    return ("step", "params", "batch_stats", "opt_state")


jax.tree_util.register_pytree_with_keys(
    HeadState,
    lambda s: ([(jax.tree_util.GetAttrKey(n), getattr(s, n)) for n in s.fields()],
               s.fields()),
    lambda names, children: HeadState(**dict(zip(names, children))),
    flatten_func=lambda s: ([getattr(s, n) for n in s.fields()], s.fields()))


def backbone_variables(state: train_state_lib.TrainState) -> dict:
  """The backbone's part of a pretraining state: variables of `run.model.backbone()`."""
  return {"params": state.params["backbone"],
          "batch_stats": state.batch_stats.get("backbone", {})}


# ---------------------------------------------------------------------------------
# Optimizer, plan, record.
# ---------------------------------------------------------------------------------
def learning_rate_schedule(lr: float, schedule: str, *, steps_per_epoch: int,
                           epochs: int, min_lr: float = 0.0, step_epochs: int = 20,
                           step_factor: float = 0.1) -> optax.Schedule:
  """The per-step learning rate.

  "cosine": from lr to min_lr over epochs * steps_per_epoch steps; "step": lr times
  step_factor every step_epochs epochs (the ImageNet-1K probe protocol; the
  reference's StepLR for fine-tuning; min_lr unused); "constant": lr.
  """
  if schedule == "cosine":
    return optax.cosine_decay_schedule(lr, max(epochs * steps_per_epoch, 1),
                                       alpha=min_lr / lr if lr else 0.0)
  if schedule == "step":
    if not isinstance(step_epochs, int) or step_epochs <= 0:
      raise ValueError(f"step_epochs {step_epochs!r} must be a positive integer")
    return optax.piecewise_constant_schedule(
        lr, {e * steps_per_epoch: step_factor
             for e in range(step_epochs, epochs, step_epochs)})
  if schedule == "constant":
    return optax.constant_schedule(lr)
  raise ValueError(f"linear probe schedule {schedule!r} is not supported; accepted: "
                   f"{', '.join(repr(s) for s in settings_lib.LINEAR_SCHEDULES)}")


def sgd(learning_rates, *, momentum: float,
        weight_decay: float) -> optax.GradientTransformation:
  """SGD with momentum, weight decay joining the gradient first (torch.optim.SGD).

  learning_rates: one schedule for all parameters, or {part: schedule} for parameters
  {part: tree} (fine-tuning's "backbone" and "head"), each part its own.
  """
  one = lambda lr: train_state_lib.sgd(lr, momentum=momentum, weight_decay=weight_decay)
  if not isinstance(learning_rates, dict):
    return one(learning_rates)
  return optax.multi_transform(
      {part: one(lr) for part, lr in learning_rates.items()},
      lambda params: {k: jax.tree.map(lambda _, k=k: k, v) for k, v in params.items()})


@dataclasses.dataclass(frozen=True)
class Plan:
  """What a head trains on, and for how long."""
  source: Any  # the train Source (fine-tuning: its labelled subset)
  batch_size: int
  steps_per_epoch: int
  schedule_steps: int  # the schedule's length: epochs * steps_per_epoch
  num_steps: int  # where training stops (max_steps may cut it short)


def make_plan(source, *, batch_size: int, epochs: int, max_steps: int, key: str,
              examples: str) -> Plan:
  """Full batches of `source` per epoch; ConfigError naming config.<key> when one batch
  is larger than the split (`examples` says which, e.g. "labelled examples")."""
  from corinfomax_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  if batch_size > source.num_examples:
    raise ConfigError(f"config.{key} = {batch_size} exceeds the {source.num_examples} "
                      f"{examples}: use a smaller batch.")
  steps_per_epoch = pipeline.steps_per_epoch(source.num_examples, batch_size)
  schedule_steps = epochs * steps_per_epoch
  num_steps = schedule_steps if max_steps == -1 else min(schedule_steps, max_steps)
  return Plan(source, batch_size, steps_per_epoch, schedule_steps, num_steps)


def record_check(expected: dict, directory, *, what: str, afresh: str,
                 changed: str = "", defaults: dict | None = None):
  """check_record(record, step) for checkpoints.restore_latest: ConfigError unless the
  checkpoint's record has `expected`'s values (a key it lacks reads as `defaults`')."""
  defaults = defaults or {}

  def check(record, step):
    saved = {k: record.get(k, defaults.get(k)) for k in expected}
    if saved != expected:
      raise ConfigError(
          f"The {what} checkpoint of step {step} in {directory} was written for "
          f"{saved}, but this run is {expected}{changed}. Move that directory away to "
          f"{afresh}, or use the original configuration.")
  return check


# ---------------------------------------------------------------------------------
# State, step, test.
# ---------------------------------------------------------------------------------
def create_state(head_fn: Callable[[jax.Array], dict], rng, tx, mesh,
                 backbone: dict | None = None) -> HeadState:
  """The initial state, created replicated on `mesh`: the head head_fn(rng) alone, or
  with `backbone` ({"params", "batch_stats"}) trained beside it."""

  def init(rng, backbone):
    head = head_fn(rng)
    params = head if backbone is None else {"backbone": backbone["params"], "head": head}
    return HeadState(step=jnp.zeros((), jnp.int32), params=params,
                     opt_state=tx.init(params),
                     batch_stats=None if backbone is None else backbone["batch_stats"])

  return jax.jit(init, out_shardings=mesh_lib.replicated(mesh))(rng, backbone)


def head_loss(head, features, labels, weight=None):
  """(mean cross-entropy of the head's logits, the logits); `weight` weighs the rows."""
  logits = models.linear_logits(head, features)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  if weight is None:
    return losses.mean(), logits
  return jnp.sum(losses * weight) / jnp.sum(weight), logits


def _update(params, opt_state, loss_fn, tx):
  """(new params, opt_state, loss, aux): one optimizer step on loss_fn(params)."""
  (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, loss, aux


def head_update(params, opt_state, features, labels, tx):
  """(new params, opt_state, loss, logits): one step of the head on fixed features."""
  return _update(params, opt_state, lambda p: head_loss(p, features, labels), tx)


def top1(logits, labels) -> jax.Array:
  return 100.0 * jnp.mean(jnp.argmax(logits, -1) == labels)


def train_step(state: HeadState, frozen, batch, *, model, tx, learning_rate_fn, mean,
               std, train_backbone: bool):
  """One step on {"image" (uint8), "label"}: (new state, metrics).

  train_backbone False: `model` (the backbone) runs in inference mode on `frozen`
  variables, its features cut from the gradient, and only the head learns.
  True: the backbone's params (state.params["backbone"]) learn with the head, its
  BatchNorm in training mode (state.batch_stats); `frozen` is unused.
  """
  images = augment.normalize_uint8(batch["image"], mean, std)
  labels = batch["label"]
  if train_backbone:
    def loss_fn(params):
      features, updates = model.apply(
          {"params": params["backbone"], "batch_stats": state.batch_stats}, images,
          train=True, mutable=["batch_stats"])
      loss, logits = head_loss(params["head"], features, labels)
      return loss, (logits, updates["batch_stats"])
  else:
    features = jax.lax.stop_gradient(model.apply(frozen, images, train=False))

    def loss_fn(params):
      loss, logits = head_loss(params, features, labels)
      return loss, (logits, state.batch_stats)

  params, opt_state, loss, (logits, batch_stats) = _update(state.params, state.opt_state,
                                                           loss_fn, tx)
  metrics_ = {"loss": loss, "top1": top1(logits, labels),
              "learning_rate": learning_rate_fn(state.step)}
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                       batch_stats=batch_stats), metrics_


def hit_sums(head, frozen, batch, *, model, mean, std):
  """[top-1 hits, top-5 hits, real rows, summed cross-entropy] of one padded batch,
  the backbone `model` in inference mode on `frozen` variables."""
  images = augment.normalize_uint8(batch["image"], mean, std)
  logits = models.linear_logits(head, model.apply(frozen, images, train=False))
  valid = batch["mask"] > 0
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
  return jnp.concatenate([metrics.topk_hits(logits, batch["label"], valid),
                          valid.sum()[None], jnp.sum(jnp.where(valid, ce, 0.0))[None]])


def evaluate_head(head, frozen, *, model, mesh, source, data: settings_lib.Data,
                  batch_size: int, interpolation: str = "bicubic") -> dict:
  """{"top1", "top5"} in percent, "test_loss" (mean cross-entropy) and
  "num_test_examples" of the head on centre crops of `source`, resized with
  `interpolation`."""
  sums = features_lib.eval_split_sums(
      functools.partial(hit_sums, model=model, mean=data.mean, std=data.std),
      (head, frozen), mesh, source, data, batch_size, interpolation)
  count = int(sums[2])
  return {**metrics.accuracy(sums[:2], count), "test_loss": float(sums[3] / count),
          "num_test_examples": count}


# ---------------------------------------------------------------------------------
# The resumable loop of one head.
# ---------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Trainer:
  """The head trainer of a mode: its switch, optimizer, plan, and how it reports."""
  name: str  # the progress lines' name, e.g. "linear probe"
  title: str  # the resume line's, e.g. "Linear probe"
  prefix: str  # TensorBoard's tags of the train metrics, e.g. "linear/train_"
  train_backbone: bool
  model: Any  # the backbone (run.model.backbone())
  tx: optax.GradientTransformation
  learning_rate_fn: optax.Schedule  # the one logged (fine-tuning: the backbone's)
  plan: Plan
  mesh: Any
  data: settings_lib.Data
  seed: int
  log_every_steps: int
  nonfinite_hint: str
  interpolation: str = "bicubic"  # the train crops' resize

  def resume(self, resumable: loop.Resumable, state: HeadState,
             check_record) -> tuple[HeadState, dict]:
    """(the latest checkpoint's state and record, or `state` and {})."""
    restored, record = resumable.restore(state, check_record)
    if restored is None:
      return state, {}
    logging.info("%s resumed from %s at step %d of %d.", self.title,
                 resumable.manager.directory, int(restored.step), self.plan.num_steps)
    return restored, record

  def jit_step(self):
    """train_step jitted over the mesh: (state, frozen, batch), the state donated."""
    replicated = mesh_lib.replicated(self.mesh)
    step = functools.partial(
        train_step, model=self.model, tx=self.tx, learning_rate_fn=self.learning_rate_fn,
        mean=self.data.mean, std=self.data.std, train_backbone=self.train_backbone)
    return jax.jit(step, in_shardings=(replicated, replicated,
                                       mesh_lib.batch_sharded(self.mesh)),
                   out_shardings=(replicated, replicated), donate_argnums=(0,),
                   compiler_options=compiler.step_options(mesh_lib.platform(self.mesh)))

  def fit(self, state: HeadState, frozen, resumable: loop.Resumable, record_fn, writer,
          actions=lambda report: ()) -> tuple[HeadState, bool]:
    """(state, preempted) after steps state.step + 1 .. plan.num_steps on random
    resized crops + flips of the plan's source, a checkpoint each epoch; `actions`
    (a function of the progress report) adds loop actions before the checkpoint."""
    from corinfomax_jax.data import pipeline  # pylint: disable=g-import-not-at-top
    plan, data = self.plan, self.data
    step_fn = self.jit_step()
    batches = pipeline.global_batches(
        pipeline.probe_train_batches(
            plan.source, pipeline.BatchSpec(plan.batch_size, data.image_size, self.seed),
            recipe_lib.views(data.recipe), start_step=int(state.step),
            interpolation=self.interpolation),
        mesh_lib.batch_sharded(self.mesh))
    report = loop.ReportProgress(
        name=self.name, num_steps=plan.num_steps, every_steps=self.log_every_steps,
        batch_size=plan.batch_size, steps_per_epoch=plan.steps_per_epoch, writer=writer,
        prefix=self.prefix, nonfinite_hint=lambda: self.nonfinite_hint)
    return resumable.run(state, lambda s, b: step_fn(s, frozen, b), batches,
                         num_steps=plan.num_steps, report=report,
                         every_steps=plan.steps_per_epoch, record_fn=record_fn,
                         actions=actions(report))

  def test(self, state: HeadState, frozen, source, batch_size: int) -> dict:
    """evaluate_head of the state's head on centre crops of `source` (resized as the
    train crops), with its "step" and "epoch"; the backbone is the state's own when it
    trains, else `frozen`."""
    head = state.params
    if self.train_backbone:
      head = state.params["head"]
      frozen = {"params": state.params["backbone"], "batch_stats": state.batch_stats}
    step = int(state.step)
    return {**evaluate_head(head, frozen, model=self.model, mesh=self.mesh, source=source,
                            data=self.data, batch_size=batch_size,
                            interpolation=self.interpolation),
            "step": step, "epoch": epochs_done(step, self.plan.steps_per_epoch)}

  def write_test(self, writer, result: dict) -> None:
    """A test's top-1 and top-5 to TensorBoard, as <prefix's part>/test_top1, ..."""
    tag = self.prefix.removesuffix("train_") + "test_"
    writer.scalars(result["step"], {f"{tag}top1": result["top1"],
                                    f"{tag}top5": result["top5"]})


# ---------------------------------------------------------------------------------
# Loop actions of a head's training.
# ---------------------------------------------------------------------------------
def epochs_done(step: int, steps_per_epoch: int) -> int | float:
  """Epochs done at `step`: an int at an epoch's end, else a fraction (max_steps)."""
  epoch = step / steps_per_epoch
  return int(epoch) if step % steps_per_epoch == 0 else round(epoch, 4)


class EpochEndTests:
  """A loop action: appends trainer.test(state, ...) to `tests` at each epoch's end and
  at the last step (not at a preemption: the resumed run tests that epoch), and writes
  it to TensorBoard and the log; `before` runs first (the NaN guard's flush: never test
  a state that followed a NaN)."""

  def __init__(self, trainer: Trainer, tests: list, test_fn, writer, before):
    self._trainer, self._tests, self._test_fn = trainer, tests, test_fn
    self._writer, self._before = writer, before

  def __call__(self, step, state, metrics, is_last):
    del metrics, is_last
    plan = self._trainer.plan
    if step % plan.steps_per_epoch == 0 or step == plan.num_steps:
      self._before()
      result = self._test_fn(state)
      self._tests.append(result)
      self._trainer.write_test(self._writer, result)
      logging.info("%s epoch %s: test top-1 %.2f top-5 %.2f.", self._trainer.title,
                   result["epoch"], result["top1"], result["top5"])


class LastLosses:
  """A loop action that keeps the train losses of the last `n` steps (on the device)."""

  def __init__(self, n: int):
    self._n, self._losses = n, []

  def __call__(self, step, state, metrics, is_last):
    del step, state, is_last
    self._losses = (self._losses + [metrics["loss"]])[-self._n:]

  def __bool__(self):
    return bool(self._losses)

  def mean(self) -> float:
    return float(np.mean(jax.device_get(self._losses)))


# ---------------------------------------------------------------------------------
# The probe on precomputed features, and the online probe's test.
# ---------------------------------------------------------------------------------
def train_linear_probe_on_features(train_feats, train_labels, num_classes: int, *,
                                   epochs: int, batch_size: int, lr: float,
                                   momentum: float = 0.9, weight_decay: float = 0.0,
                                   schedule: str = "cosine", min_lr: float = 0.0,
                                   step_epochs: int = 20,
                                   seed: int = 0) -> dict[str, jax.Array]:
  """Trains a linear classifier (softmax cross-entropy) on fixed features.

  `sgd` at `learning_rate_schedule` with ceil(n / batch_size) steps per epoch. Each
  epoch sees every sample once in a fresh random order (the last batch is padded and
  the padding masked out). Returns params {"kernel": (dim, num_classes), "bias":
  (num_classes,)}.
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
  tx = sgd(learning_rate_schedule(lr, schedule, steps_per_epoch=steps_per_epoch,
                                  epochs=epochs, min_lr=min_lr, step_epochs=step_epochs),
           momentum=momentum, weight_decay=weight_decay)
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
      idx, weight = batch
      params, opt_state, loss, _ = _update(
          *carry, lambda p: head_loss(p, feats[idx], labels[idx], weight), tx)
      return (params, opt_state), loss

    (params, opt_state), losses = jax.lax.scan(step, (params, opt_state), batches)
    return params, opt_state, losses.mean()

  for epoch_key in jax.random.split(key, epochs):
    params, opt_state, _ = train_epoch(params, opt_state, feats, labels, epoch_key)
  return params


@jax.jit
def _chunk_hits(params, feats, labels, valid):
  return metrics.topk_hits(models.linear_logits(params, feats), labels, valid)


def linear_probe_accuracy(params: dict[str, jax.Array], feats, labels, *,
                          chunk_size: int = 4096) -> dict[str, float]:
  """{"top1", "top5"} accuracy in percent of train_linear_probe_on_features' params."""
  metrics.check_chunk_size(chunk_size)
  if np.shape(labels) != (feats.shape[0],):
    raise ValueError(f"labels shape {np.shape(labels)} must be ({feats.shape[0]},)")
  hits = np.zeros(2, np.int64)
  for (chunk, _), (chunk_labels, valid) in zip(
      metrics.padded_chunks(feats, chunk_size),
      metrics.labels_and_masks(labels, chunk_size)):
    hits += np.asarray(_chunk_hits(params, chunk, chunk_labels, valid))
  return metrics.accuracy(hits, feats.shape[0])


PRECOMPUTED_VARIANT = "precomputed_center_crop_features"  # linear_eval.json's "variant"


def linear_probe_on_centre_crops(model, variables, mesh, train_source, eval_source, *,
                                 linear: settings_lib.Linear, data: settings_lib.Data,
                                 batch_size: int, seed: int) -> dict:
  """The faster linear probe: one pass of centre-crop features of both splits (batches
  of `batch_size`), `train_linear_probe_on_features` on the train ones with `linear`'s
  settings; {"top1", "top5", "num_train_examples", "num_test_examples"}."""
  (train_feats, train_labels), (test_feats, test_labels) = (
      features_lib.extract_features(model, variables, mesh, source,
                                    batch_size=batch_size, data=data)
      for source in (train_source, eval_source))
  logging.info("Linear probe (%s): %d epochs on %d features, lr %g %s.",
               PRECOMPUTED_VARIANT, linear.epochs, len(train_feats), linear.lr,
               linear.schedule)
  params = train_linear_probe_on_features(
      train_feats, train_labels, train_source.num_classes, epochs=linear.epochs,
      batch_size=linear.batch_size, lr=linear.lr, momentum=linear.momentum,
      weight_decay=linear.weight_decay, schedule=linear.schedule,
      min_lr=linear.min_lr, step_epochs=linear.step_epochs, seed=seed)
  return {**linear_probe_accuracy(params, test_feats, test_labels),
          "num_train_examples": int(len(train_feats)),
          "num_test_examples": int(len(test_feats))}


class OnlineProbeEvaluator:
  """Test accuracy of the online linear probe that pretraining trains (state.probe).

  Centre crops of the eval split through the backbone in inference mode, then the
  probe's Dense layer (`evaluate_head`), every `online_probe.every_epochs` epochs.
  """
  name = "online_probe"
  settings_class = settings_lib.OnlineProbe  # its section of settings.Eval

  def __init__(self, settings: settings_lib.OnlineProbe,
               context: features_lib.Context):
    self._settings, self._context = settings, context

  def every_steps(self, steps_per_epoch: int) -> int:
    return loop.epochs_to_steps(self._settings.every_epochs, steps_per_epoch)

  def run_on_state(self, state) -> dict:
    """{"test_top1", "test_top5"} in percent, and the test count."""
    c = self._context
    result = evaluate_head(state.probe["params"], backbone_variables(state),
                           model=c.model.backbone, mesh=c.mesh, source=c.eval_source,
                           data=c.data, batch_size=c.batch_size)
    return {"test_top1": result["top1"], "test_top5": result["top5"],
            "num_test_examples": result["num_test_examples"]}
