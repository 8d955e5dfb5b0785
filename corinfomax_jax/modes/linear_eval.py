"""--mode=linear_eval: a linear probe on the frozen backbone (eval/probe.py's trainer).

The paper's protocol trains the probe on random resized crops through the frozen
backbone (resumable); a faster variant trains it on centre-crop features computed once
(`probe.linear_probe_on_centre_crops`).
"""
from __future__ import annotations

import jax
from absl import logging

from corinfomax_jax import files
from corinfomax_jax import models
from corinfomax_jax.eval import features
from corinfomax_jax.eval import probe
from corinfomax_jax.modes import startup
from corinfomax_jax.run import loop
from corinfomax_jax.run import settings as settings_lib
from corinfomax_jax.run import train_state as train_state_lib
from corinfomax_jax.run import workdir_lock
from corinfomax_jax.run import writers

LINEAR_VARIANT = "frozen_backbone_random_resized_crop"  # the paper's protocol
PRECOMPUTED_VARIANT = probe.PRECOMPUTED_VARIANT
LINEAR_DIR = "linear_eval"  # TensorBoard events and probe checkpoints, in the workdir
LINEAR_RESULT_FILE = "linear_eval.json"
# Probe hyperparameters a resumed probe must share with the run that wrote it (the
# flat key names of earlier versions: their probes still resume).
_LINEAR_KEYS = ("linear_epochs", "linear_batch_size", "linear_lr", "linear_min_lr",
                "linear_schedule", "linear_step_epochs", "linear_weight_decay",
                "linear_momentum")


def probe_checkpoint_dir(workdir: str):
  """workdir/linear_eval/checkpoints as an epath Path (workdir a local path or a URL)."""
  return files.as_path(workdir) / LINEAR_DIR / "checkpoints"


def _protocol(lin: settings_lib.Linear) -> dict:
  return {k: getattr(lin, k.removeprefix("linear_")) for k in _LINEAR_KEYS}


def _augmented(run: settings_lib.Settings, workdir, state, mesh, plan: probe.Plan,
               eval_source, writer) -> dict:
  """The paper's protocol: random resized crops through the frozen backbone, resumable."""
  lin = run.eval.linear
  schedule = probe.learning_rate_schedule(
      lin.lr, lin.schedule, steps_per_epoch=plan.steps_per_epoch, epochs=lin.epochs,
      min_lr=lin.min_lr, step_epochs=lin.step_epochs)
  trainer = probe.Trainer(
      name="linear probe", title="Linear probe", prefix="linear/train_",
      train_backbone=False, model=run.model.backbone(),
      tx=probe.sgd(schedule, momentum=lin.momentum, weight_decay=lin.weight_decay),
      learning_rate_fn=schedule, plan=plan, mesh=mesh, data=run.data, seed=run.seed,
      log_every_steps=plan.steps_per_epoch,
      nonfinite_hint=f"Lower config.eval.linear.lr ({lin.lr}).")
  head = lambda rng: models.init_linear_head(
      models.feature_dim(trainer.model, run.data.image_size), plan.source.num_classes,
      init="lecun_normal", rng=rng)
  frozen = probe.backbone_variables(state)
  record = {"pretrain_step": int(state.step), "eval": _protocol(lin)}
  with loop.Resumable(probe_checkpoint_dir(workdir), keep=2) as resumable:
    head_state, _ = trainer.resume(
        resumable, probe.create_state(head, jax.random.PRNGKey(run.seed), trainer.tx, mesh),
        probe.record_check(record, resumable.manager.directory, what="linear probe",
                           afresh="train a new probe", changed=(
                               " (the pretraining checkpoint or config.eval.linear "
                               "changed)")))
    start_step = int(head_state.step)
    logging.info("Linear probe (%s): steps %d to %d, batch %d, %d steps per epoch, lr %g "
                 "%s.", LINEAR_VARIANT, start_step, plan.num_steps, plan.batch_size,
                 plan.steps_per_epoch, lin.lr, lin.schedule)
    if start_step < plan.num_steps:
      head_state, preempted = trainer.fit(head_state, frozen, resumable, lambda: record,
                                          writer)
      if preempted:
        return {"preempted": True, "step": int(head_state.step)}
  test = trainer.test(head_state, frozen, eval_source, run.eval.batch_size)
  return {"top1": test["top1"], "top5": test["top5"], "step": int(head_state.step),
          "trained_steps": int(head_state.step) - start_step,
          "num_steps": plan.num_steps, "steps_per_epoch": plan.steps_per_epoch,
          "num_train_examples": plan.source.num_examples,
          "num_test_examples": test["num_test_examples"]}


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
  train_source, eval_source = features.open_sources(data)
  plan = None if lin.precomputed else probe.make_plan(
      train_source, batch_size=lin.batch_size, epochs=lin.epochs,
      max_steps=lin.max_steps, key="eval.linear.batch_size",
      examples=f"examples of {data.dataset} {data.train_split!r}")
  model = run.model.create()
  state = startup.backbone_state(run, model, mesh, workdir, random_init=False)
  pretrain_step = int(state.step)
  writer = writers.MetricWriter(files.as_path(workdir) / LINEAR_DIR)
  try:
    if lin.precomputed:
      variant, tag = PRECOMPUTED_VARIANT, "linear_precomputed"
      result = probe.linear_probe_on_centre_crops(
          model, train_state_lib.backbone_variables(state), mesh, train_source,
          eval_source, linear=lin, data=data, batch_size=run.eval.batch_size,
          seed=run.seed)
    else:
      variant, tag = LINEAR_VARIANT, "linear"
      result = _augmented(run, workdir, state, mesh, plan, eval_source, writer)
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
                **{k.removeprefix("linear_"): v for k, v in _protocol(lin).items()})
  path = startup.write_result(workdir, LINEAR_RESULT_FILE, result)
  logging.info("Linear probe (%s) on the checkpoint of step %d: top-1 %.2f top-5 %.2f "
               "on %d %s images; written to %s.", variant, result["pretrain_step"],
               result["top1"], result["top5"], result["num_test_examples"],
               data.eval_split, path)
  return result
