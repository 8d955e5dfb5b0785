"""Semi-supervised fine-tuning of the whole network on a labelled subset (--mode=finetune).

The standard protocol after self-supervised pretraining (SimCLR, Chen et al. 2020): the
backbone and a new linear head are trained together with cross-entropy on 1% or 10% of
the labels (eval/probe.py's trainer with train_backbone), then tested on centre crops
of the eval split.
"""
from __future__ import annotations

import jax
import optax
from absl import logging

from corinfomax_jax import files
from corinfomax_jax import models
from corinfomax_jax.errors import ConfigError
from corinfomax_jax.eval import features
from corinfomax_jax.eval import probe
from corinfomax_jax.modes import startup
from corinfomax_jax.run import encoder as encoder_lib
from corinfomax_jax.run import loop
from corinfomax_jax.run import settings as settings_lib
from corinfomax_jax.run import train_state as train_state_lib
from corinfomax_jax.run import workdir_lock
from corinfomax_jax.run import writers

# The result of config.eval.finetune.subdir's default, "finetune" (`result_file`): the
# TensorBoard events and checkpoints go to <workdir>/<subdir>/.
FINETUNE_RESULT_FILE = "finetune.json"
# Keys a resumed fine-tuning run must share with the run that wrote its checkpoints.
_FINETUNE_KEYS = ("label_fraction", "label_file", "finetune_epochs", "finetune_batch_size",
                  "finetune_backbone_lr", "finetune_head_lr", "finetune_weight_decay",
                  "random_init")
# Keys added later, with the values every earlier run had, so their checkpoints resume.
_PROTOCOL_BEFORE = {"schedule": "cosine", "step_epochs": 5, "backbone_step_factor": 0.2,
                    "head_step_factor": 0.1, "head_init": "zeros",
                    "crop_interpolation": "bicubic", "momentum": 0.9,
                    "evaluate_every_epoch": False}
HEAD_STDDEV = 0.01  # head_init="normal": the reference's N(0, 0.01^2) kernel


def learning_rates(ft: settings_lib.Finetune,
                   steps_per_epoch: int) -> dict[str, optax.Schedule]:
  """{"backbone", "head"}: each part's learning rate by step, ft.schedule "cosine" from
  its lr to 0 over ft.epochs epochs, or "step": its lr times its step factor every
  ft.step_epochs epochs (the reference's StepLR, stepped once per epoch)."""
  return {part: probe.learning_rate_schedule(
      getattr(ft, f"{part}_lr"), ft.schedule, steps_per_epoch=steps_per_epoch,
      epochs=ft.epochs, step_epochs=ft.step_epochs,
      step_factor=getattr(ft, f"{part}_step_factor")) for part in ("backbone", "head")}


def _trainer(run: settings_lib.Settings, mesh, plan: probe.Plan) -> probe.Trainer:
  """The head trainer with the backbone trained: SGD (momentum, weight decay) with each
  part's learning rates (`learning_rates`; the backbone's is logged)."""
  ft = run.eval.finetune
  rates = learning_rates(ft, plan.steps_per_epoch)
  return probe.Trainer(
      name="finetune", title="Fine-tuning", prefix="finetune/train_",
      train_backbone=True, model=run.model.backbone(),
      tx=probe.sgd(rates, momentum=ft.momentum, weight_decay=ft.weight_decay),
      learning_rate_fn=rates["backbone"], plan=plan, mesh=mesh, data=run.data,
      seed=run.seed, log_every_steps=run.train.log_every_steps,
      nonfinite_hint="Lower config.eval.finetune.backbone_lr / head_lr.",
      interpolation=ft.crop_interpolation)


def _check_can_start(config, workdir: str, lock):
  """(settings, mesh), everything checked before any model work; ConfigError in one line."""
  def has_checkpoint(run):
    if not run.eval.random_init and not encoder_lib.checkpoint_steps(workdir):
      raise ConfigError(
          f"No pretraining checkpoint in workdir {workdir!r} (looked in "
          f"{train_state_lib.checkpoint_dir(workdir)}). Pretrain first, or set "
          "config.eval.random_init=True to fine-tune the random initialisation.")

  def label_file(run):
    features.check_label_file(run.eval.finetune.label_file)

  return startup.begin(
      config, workdir, checks=(label_file, has_checkpoint), lock=lock,
      batch_sizes=lambda r: {"eval.batch_size": r.eval.batch_size,
                             "eval.finetune.batch_size": r.eval.finetune.batch_size})


def _initial_state(run: settings_lib.Settings, workdir, mesh, num_classes,
                   tx) -> tuple[probe.HeadState, int]:
  """(The pretrained (or random) backbone with a new head (config.eval.finetune.head_init,
  drawn from config.seed), pretraining step)."""
  model = run.model.create()
  pretrained = startup.backbone_state(run, model, mesh, workdir)
  dim = models.feature_dim(model, run.data.image_size)
  head = lambda rng: models.init_linear_head(
      dim, num_classes, init=run.eval.finetune.head_init, stddev=HEAD_STDDEV, rng=rng)
  state = probe.create_state(head, jax.random.fold_in(jax.random.key(run.seed), 1), tx,
                             mesh, backbone=probe.backbone_variables(pretrained))
  return state, int(pretrained.step)


def _train(run: settings_lib.Settings, workdir, state, trainer: probe.Trainer, record,
           writer, test_fn):
  """(state, the last epoch's losses or None, tests, preempted): resumed, trained, saved.

  tests: with evaluate_every_epoch, test_fn(state) after each epoch (and at the last
  step), each with its "epoch" and "step", those before a resume read from the
  checkpoint's record; otherwise [].
  """
  ft, plan = run.eval.finetune, trainer.plan
  with loop.Resumable(files.as_path(workdir) / ft.subdir / "checkpoints",
                      keep=2) as resumable:
    state, saved = trainer.resume(resumable, state, probe.record_check(
        record, resumable.manager.directory, what="fine-tuning", afresh="fine-tune afresh",
        defaults={"finetune_protocol": _PROTOCOL_BEFORE}))
    # Epoch ends only: a test at a max_steps stop mid-epoch is no epoch of this run.
    tests = [t for t in saved.get("tests", [])
             if t["step"] <= int(state.step) and t["step"] % plan.steps_per_epoch == 0]
    start_step = int(state.step)
    logging.info("Fine-tuning %s on %d labelled examples (%s): steps %d to %d, batch %d.",
                 "the random initialisation" if run.eval.random_init else
                 f"the checkpoint of step {record['pretrain_step']}",
                 plan.source.num_examples,
                 ft.label_file or f"{ft.label_fraction:g} of the labels",
                 start_step, plan.num_steps, plan.batch_size)
    if start_step >= plan.num_steps:
      return state, None, tests, False
    last_epoch = probe.LastLosses(plan.steps_per_epoch)

    def actions(report):
      if not ft.evaluate_every_epoch:
        return [last_epoch]
      return [last_epoch, probe.EpochEndTests(trainer, tests, test_fn, writer,
                                              before=report.flush)]

    # The record carries the tests so far, so a resumed run still knows the best epoch.
    state, preempted = trainer.fit(state, {}, resumable, lambda: {**record, "tests": tests},
                                   writer, actions)
    return state, last_epoch, tests, preempted


def finetune(config, workdir: str) -> dict:
  """--mode=finetune: the whole network fine-tuned on a labelled subset of train_split.

  The subset: config.eval.finetune.label_file (file names, one a line), else a seeded (config.seed)
  class-balanced config.eval.finetune.label_fraction of the labels. The network: the latest
  pretraining checkpoint's backbone (config.eval.random_init: the seeded random one)
  plus a new Dense head (head_init: zeros, or N(0, 0.01^2) with zero bias), trained with
  cross-entropy on random resized crops (bicubic or bilinear: crop_interpolation, also
  the test view's resize) +
  flips (pipeline.probe_train_batches), BatchNorm in training mode, SGD (momentum) with
  learning rates backbone_lr (backbone) and head_lr (head), each cosine to 0 or stepped
  every step_epochs epochs (schedule; `learning_rates`), epochs epochs of the subset
  in batches of batch_size (max_steps caps the steps); the keys are
  config.eval.finetune's, and configs/default.set_paper_finetune sets the paper's
  protocol. Progress, NaN guard, a checkpoint each epoch in
  <workdir>/<subdir>/checkpoints (config.eval.finetune.subdir, "finetune" by default;
  resumed by the same command), preemption: the shared loop. Tested on centre crops of
  eval_split after the last step (evaluate_every_epoch: after every epoch too); writes
  <workdir>/<subdir>.json, e.g. finetune.json (top1, top5, test_loss: the
  last step's; last and best: {top1, top5, test_loss, epoch} of the last epoch and of
  the epoch with the highest test top-1, chosen on the test split as the paper reports
  it (best == last without evaluate_every_epoch); train_loss_last_epoch (None when
  nothing was left to train), label_fraction, label_file, num_labelled, epochs,
  steps, ...) and
  returns it with the final FinetuneState under "state", or {"preempted": True,
  "step": s}. Holds the workdir's lock (workdir_lock) from start-up until it returns or
  raises.
  """
  with workdir_lock.WorkdirLock(workdir, "finetune") as lock:
    return _finetune(config, workdir, lock)


def _finetune(config, workdir: str, lock) -> dict:
  run, mesh = _check_can_start(config, workdir, lock)
  ft, data = run.eval.finetune, run.data
  train_source, eval_source = features.open_sources(data)
  subset = train_source.subset(features.labelled_index(
      train_source, fraction=ft.label_fraction, label_file=ft.label_file, seed=run.seed))
  trainer = _trainer(run, mesh, probe.make_plan(
      subset, batch_size=ft.batch_size, epochs=ft.epochs, max_steps=ft.max_steps,
      key="eval.finetune.batch_size", examples="labelled examples"))
  state, pretrain_step = _initial_state(run, workdir, mesh, train_source.num_classes,
                                        trainer.tx)
  # The record keeps the flat key names of earlier versions: their runs still resume.
  record = {"pretrain_step": pretrain_step, "eval": {
      k: (run.eval.random_init if k == "random_init"
          else getattr(ft, k.removeprefix("finetune_"))) for k in _FINETUNE_KEYS},
            "finetune_protocol": {k: getattr(ft, k) for k in _PROTOCOL_BEFORE}}
  writer = writers.MetricWriter(files.as_path(workdir) / ft.subdir)

  test_at = lambda state: trainer.test(state, {}, eval_source, run.eval.batch_size)
  try:
    state, last_epoch, tests, preempted = _train(run, workdir, state, trainer, record,
                                                 writer, test_at)
    if preempted:
      logging.warning("Fine-tuning preempted at step %d; run the same command again "
                      "to resume.", int(state.step))
      return {"preempted": True, "step": int(state.step)}
    if tests and tests[-1]["step"] == int(state.step):
      last = tests[-1]
    else:
      last = test_at(state)
      tests = tests + [last] if ft.evaluate_every_epoch else [last]
      trainer.write_test(writer, last)
  finally:
    writer.close()
  result = _result(run, state, trainer.plan, last, max(tests, key=lambda t: t["top1"]),
                   last_epoch, pretrain_step)
  path = startup.write_result(workdir, result_file(ft), result)
  logging.info("Fine-tuned on %d labelled examples: top-1 %.2f top-5 %.2f on %d %s "
               "images (best: %.2f at epoch %s); written to %s.", result["num_labelled"],
               result["top1"], result["top5"], result["num_test_examples"],
               data.eval_split, result["best"]["top1"], result["best"]["epoch"], path)
  result["state"] = state
  return result


def _result(run: settings_lib.Settings, state, plan: probe.Plan, last: dict, best: dict,
            last_epoch, pretrain_step: int) -> dict:
  """The result file's dict: the last test, last and best (the first of equal ones),
  and the protocol."""
  ft, data = run.eval.finetune, run.data
  summary = lambda t: {k: t[k] for k in ("top1", "top5", "test_loss", "epoch")}
  return {**{k: v for k, v in last.items() if k not in ("step", "epoch")},
          "last": summary(last),
          "best": {**summary(best), "chosen_on": f"the test split ({data.eval_split}), "
                                                 "as the paper reports it"},
          # The head starts at zero, so the first step's loss is ln(num_classes).
          "train_loss_last_epoch": last_epoch.mean() if last_epoch else None,
          "label_fraction": ft.label_fraction, "label_file": ft.label_file,
          "num_labelled": int(plan.source.num_examples), "epochs": ft.epochs,
          "steps": int(state.step), "steps_per_epoch": plan.steps_per_epoch,
          "batch_size": plan.batch_size, "backbone_lr": ft.backbone_lr,
          "head_lr": ft.head_lr, "weight_decay": ft.weight_decay,
          **{k: getattr(ft, k) for k in _PROTOCOL_BEFORE},
          "random_init": run.eval.random_init, "pretrain_step": pretrain_step,
          "method": run.method.name, "subdir": ft.subdir,
          "dataset": data.dataset, "train_split": data.train_split,
          "eval_split": data.eval_split}


def result_file(ft: settings_lib.Finetune) -> str:
  """The result's file name in the workdir: <subdir>.json (finetune.json by default)."""
  return f"{ft.subdir}.json"
