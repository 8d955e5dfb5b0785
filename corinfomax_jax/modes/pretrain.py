"""Pretraining: the jitted step of the configured method and the loop that owns it.

Data flows one way: pipeline -> global batch sharded over the mesh's "data" axis ->
train_step(state, batch) -> new state -> checkpoint / metrics. `train_step` and
`jit_train_step` import no TensorFlow (bench/train_step.py runs them without it); the
loop reads data and writes TensorBoard events, through TensorFlow.
"""
from __future__ import annotations

import functools

import jax
import numpy as np
import optax
from absl import logging

from corinfomax_jax import compiler
from corinfomax_jax import errors
from corinfomax_jax import files
from corinfomax_jax import mesh as mesh_lib
from corinfomax_jax.data import augment
from corinfomax_jax.data import recipe as recipe_lib
from corinfomax_jax.eval import evaluators as evaluators_lib
from corinfomax_jax.eval import features
from corinfomax_jax.eval import probe as probe_lib
from corinfomax_jax.methods import corinfomax as objective
from corinfomax_jax.modes import startup
from corinfomax_jax.run import checkpoints
from corinfomax_jax.run import health
from corinfomax_jax.run import loop
from corinfomax_jax.run import run_record
from corinfomax_jax.run import settings as settings_lib
from corinfomax_jax.run import train_state as train_state_lib
from corinfomax_jax.run import workdir_lock
from corinfomax_jax.run import writers as metrics_lib
from corinfomax_jax.run.train_state import TrainState


def make_views(data: settings_lib.Data):
  """batch -> (view 1, view 2): the device's share of the paper's two views.

  The batch holds uint8 crops (already flipped on the host) and each example's draws
  ("view1", "view1_draws", ...); colour jitter, grayscale, blur, solarisation and
  normalisation run here, per example, on the sharded batch.
  """
  mean, std = data.mean, data.std
  settings = {k: recipe_lib.view_config(data.recipe, k) for k in ("view1", "view2")}

  def views(batch):
    return tuple(augment.view(batch[k], batch[f"{k}_draws"], settings[k], mean=mean,
                              std=std) for k in ("view1", "view2"))

  return views


def train_step(state: TrainState, batch, *, model, tx, learning_rate_fn, method,
               views_fn, probe_tx=None):
  """One step of `method` (methods.Method) on the global batch (see make_views):
  (new state, metrics).

  With an online probe in the state (and probe_tx), its Dense layer also takes one
  step of its own optimizer on the pooled backbone features of view1 (the augmented
  view, as solo-learn's online classifier sees it) against batch["label"]; the
  features are cut from the gradient, so the probe never changes the backbone.
  """
  x1, x2 = views_fn(batch)

  def loss_fn(params):
    # Each view passes separately, so BatchNorm statistics are per view (the reference).
    (h1, z1), updates = model.apply({"params": params, "batch_stats": state.batch_stats},
                                    x1, train=True, mutable=["batch_stats"])
    (_, z2), updates = model.apply({"params": params, **updates}, x2,
                                   train=True, mutable=["batch_stats"])
    loss, loss_state, metrics = method.loss(z1, z2, state.loss_state)
    return loss, (updates["batch_stats"], loss_state, metrics, h1)

  grads, (batch_stats, loss_state, metrics, h1) = jax.grad(loss_fn, has_aux=True)(
      state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics["learning_rate"] = learning_rate_fn(state.step)
  probe = state.probe
  if probe:
    probe_params, probe_opt_state, probe_loss, logits = probe_lib.head_update(
        probe["params"], probe["opt_state"], jax.lax.stop_gradient(h1), batch["label"],
        probe_tx)
    probe = {"params": probe_params, "opt_state": probe_opt_state}
    metrics.update(online_probe_loss=probe_loss,
                   online_probe_top1=probe_lib.top1(logits, batch["label"]))
  new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                            opt_state=opt_state, loss_state=loss_state, probe=probe)
  return new_state, metrics


def jit_train_step(run: settings_lib.Settings, model, tx, learning_rate_fn, mesh):
  """train_step jitted over `mesh`: batch sharded on "data", state replicated, donated,
  compiled with the platform's step options (`compiler.step_options`).

  Reads the method, the data's view recipe and the online probe's settings of `run`.
  """
  replicated = mesh_lib.replicated(mesh)
  step = functools.partial(
      train_step, model=model, tx=tx, learning_rate_fn=learning_rate_fn,
      method=run.method, views_fn=make_views(run.data),
      probe_tx=train_state_lib.online_probe_optimizer(run.eval.online_probe))
  return jax.jit(step, in_shardings=(replicated, mesh_lib.batch_sharded(mesh)),
                 out_shardings=(replicated, replicated), donate_argnums=(0,),
                 compiler_options=compiler.step_options(mesh_lib.platform(mesh)))


def total_steps(train: settings_lib.Train, steps_per_epoch: int) -> int:
  steps = train.num_epochs * steps_per_epoch
  return steps if train.max_steps == -1 else min(steps, train.max_steps)


class SpectrumLog:
  """The covariances' spectra: TensorBoard summaries and the points of the PNG.

  The covariances are the method's (`method.covariances`): CorInfoMax's moving
  estimates, or the last batch's for a method whose loss carries no state.
  """

  def __init__(self, writer, spectra, method):
    self._writer = writer
    self.spectra = spectra  # [(step, eigenvalues of branch 1)], carried in checkpoints
    self._fn = jax.jit(lambda s: tuple(objective.covariance_spectrum(c)
                                       for c in method.covariances(s)))

  def __call__(self, step, state):
    spec1, spec2 = jax.device_get(self._fn(state.loss_state))
    self._writer.scalars(step, {**metrics_lib.spectrum_summary(spec1, 1),
                                **metrics_lib.spectrum_summary(spec2, 2)})
    self.spectra.append((step, np.asarray(spec1.eigenvalues)))

  def plot(self, path, title: str) -> None:
    if jax.process_index() != 0 or not self.spectra:
      return
    shown = sorted(set(np.linspace(0, len(self.spectra) - 1, 8).astype(int)))
    metrics_lib.plot_spectra([self.spectra[i] for i in shown], path, title=title)
    logging.info("Covariance spectrum plot: %s", path)


def _monitors(run: settings_lib.Settings, model, mesh, source) -> list:
  """The evaluators pretraining runs, their splits opened and checked now (so that they
  fail before any training), and the online probe's labels checked."""
  if run.eval.online_probe.enabled and source.unlabelled:
    raise errors.ConfigError(
        f"{run.data.dataset} split {run.data.train_split!r} has no class directories, so "
        "the online probe (config.eval.online_probe.enabled=True) has no labels to "
        "learn; give it <split>/<class>/<image>, or set "
        "config.eval.online_probe.enabled=False.")
  if not evaluators_lib.monitors_on(run.eval):
    return []
  mesh_lib.check_batch_divides(run.eval.batch_size, jax.device_count(),
                               jax.process_count(), key="eval.batch_size")
  return evaluators_lib.create_evaluators(
      run.eval, run.data, model, mesh,
      *features.open_sources(run.data, needs_labels="the monitors in eval.monitors"))


def _saved_results(record: dict) -> dict | None:
  """The result values a checkpoint's record keeps, its optimizer by today's name."""
  results, optimizer = record.get("results"), train_state_lib.recorded_optimizer(record)
  if results is None or optimizer is None:
    return results
  return {**results, "optimizer": optimizer}


def _last_checkpoint(manager) -> str:
  """"step N in DIR" of the latest checkpoint, once any save in progress has ended."""
  checkpoints.finish(manager)
  step = manager.latest_step()
  return (f"step {step} in {manager.directory}" if step is not None
          else f"none (no checkpoint in {manager.directory}: a new run starts from scratch)")


def _check_health(detector: health.Detector, manager, opt: settings_lib.Optimizer,
                  step: int, state: TrainState) -> None:
  """Raises DivergenceError, naming the step and the last healthy checkpoint, for a
  state that must not be saved. Every state saved passed this check, so the latest
  checkpoint is the last healthy one."""
  why = detector.why(state)
  if why is None:
    return
  raise errors.DivergenceError(
      f"pretrain: the state after step {step} is not healthy ({why}); it was not saved "
      f"and training stopped. The last healthy checkpoint is {_last_checkpoint(manager)}. "
      f"Lower config.learning_rate (now {opt.learning_rate:g}) and run again to resume "
      "from there.")


def train_and_evaluate(config, workdir: str) -> TrainState:
  """Pretrains with config.method, resuming from the latest checkpoint in `workdir`.

  Holds the workdir's lock (workdir_lock) from start-up until it returns or raises.
  """
  with workdir_lock.WorkdirLock(workdir, "pretrain") as lock:
    return _train_and_evaluate(config, workdir, lock)


def _train_and_evaluate(config, workdir: str, lock) -> TrainState:
  # --- Configuration and mesh: every user error surfaces here, before any work.
  run, mesh = startup.begin(config, workdir,
                            batch_sizes=lambda r: {"batch_size": r.train.batch_size},
                            lock=lock)
  train, data = run.train, run.data

  # --- Input (and the evaluators' splits, opened now so that they fail now).
  source, steps_per_epoch, num_steps = _input(run)
  model = run.model.create()
  evaluators = _monitors(run, model, mesh, source)

  # --- Model, optimizer, state (with the online probe when enabled).
  learning_rate_fn = train_state_lib.create_learning_rate_fn(run.optimizer,
                                                             steps_per_epoch)
  tx = train_state_lib.create_optimizer(run.optimizer, learning_rate_fn)
  probe_classes = train_state_lib.online_probe_classes(run.eval.online_probe,
                                                       source.num_classes)
  writer = None
  try:
    with loop.Resumable(train_state_lib.checkpoint_dir(workdir),
                        keep=train.keep_checkpoints) as resumable:
      manager = resumable.manager
      # A resume the checkpoint refuses stops here: nothing compiled, no events written.
      train_state_lib.check_resume(manager, run, probe_classes=probe_classes)
      state = train_state_lib.create_train_state(run, model, tx, mesh,
                                                 probe_classes=probe_classes)
      # Compares every state it checks with this seeded initialisation.
      detector = health.Detector(run.divergence, run.method, state.params)
      writer = metrics_lib.MetricWriter(files.as_path(workdir))
      state, record = _resume(run, workdir, manager, state, writer, probe_classes,
                              detector)
      start_step = int(state.step)

      # --- Step, batches, periodic actions.
      batches = _batches(run, source, mesh, start_step)
      spectrum = SpectrumLog(writer, [(s, np.asarray(e))
                                      for s, e in record.get("spectra", [])], run.method)
      report = _progress(train, num_steps, steps_per_epoch, writer, manager)
      record_fn = _record_fn(run, record, probe_classes, steps_per_epoch,
                             source.num_examples, spectrum)
      check_health = functools.partial(_check_health, detector, manager, run.optimizer)
      state, preempted = resumable.run(
          state, jit_train_step(run, model, tx, learning_rate_fn, mesh), batches,
          num_steps=num_steps, report=report, every_steps=train.checkpoint_every_steps,
          record_fn=record_fn, check_state=check_health,
          actions=_actions(train, check_health, spectrum, evaluators, steps_per_epoch,
                           writer),
          after=[loop.Profile(str(files.as_path(workdir)), start_step,
                              train.profile_steps)])
  finally:
    if writer is not None:
      writer.close()
  if preempted:
    logging.warning("Preempted: checkpoint at step %d written; exiting.", int(state.step))
  spectrum.plot(files.as_path(workdir) / "spectrum.png",
                title=f"{metrics_lib.dataset_title(data.dataset)}: {run.method.name} covariance "
                      "spectrum, branch 1")
  return state


def _batches(run: settings_lib.Settings, source, mesh, start_step: int):
  """The global batches of two uint8 views from `start_step` on, sharded over `mesh`."""
  from corinfomax_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  train, data = run.train, run.data
  return pipeline.global_batches(
      pipeline.pretrain_batches(
          source, pipeline.BatchSpec(train.batch_size, data.image_size, train.seed,
                                     jax.process_index(), jax.process_count()),
          recipe_lib.views(data.recipe), start_step=start_step),
      mesh_lib.batch_sharded(mesh))


def _actions(train: settings_lib.Train, check_health, spectrum, evaluators,
             steps_per_epoch: int, writer) -> list:
  """The loop's periodic actions: the health check at every report too (so that a
  diverged run stops within log_every_steps), the spectrum, the monitors."""
  return [loop.Periodic(train.log_every_steps, check_health),
          loop.Periodic(train.spectrum_every_steps, spectrum),
          *(evaluators_lib.monitor_action(e, e.every_steps(steps_per_epoch), writer)
            for e in evaluators)]


def _input(run: settings_lib.Settings):
  """(the train split's source, steps per epoch, steps of the run), logged."""
  from corinfomax_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from corinfomax_jax.data import sources  # pylint: disable=g-import-not-at-top
  train, data = run.train, run.data
  source = sources.get_source(data.dataset, data.data_dir, data.train_split,
                              skip_bad_images=data.skip_bad_images)
  steps_per_epoch = pipeline.steps_per_epoch(source.num_examples, train.batch_size)
  num_steps = total_steps(train, steps_per_epoch)
  logging.info("Data %s/%s: %d images, %d classes; %d steps of %d (%d per epoch); "
               "method %s.", data.dataset, data.train_split, source.num_examples,
               source.num_classes, num_steps, train.batch_size, steps_per_epoch,
               run.method)
  return source, steps_per_epoch, num_steps


def _progress(train: settings_lib.Train, num_steps: int, steps_per_epoch: int, writer,
              manager) -> loop.ReportProgress:
  """Progress lines, TensorBoard's train/ scalars and the NaN guard, which names the
  last good checkpoint."""
  return loop.ReportProgress(
      name="pretrain", num_steps=num_steps, every_steps=train.log_every_steps,
      batch_size=train.batch_size, steps_per_epoch=steps_per_epoch, writer=writer,
      prefix="train/",
      nonfinite_hint=lambda: (
          f"The last good checkpoint is {_last_checkpoint(manager)}. Lower "
          "config.learning_rate or check the data."),
      totals=("cholesky_fallbacks",))


def _record_fn(run: settings_lib.Settings, record: dict, probe_classes: int,
               steps_per_epoch: int, num_examples: int, spectrum: SpectrumLog):
  """What each checkpoint records: the run's keys, the values that change results, an
  import's provenance (carried on from `record`), and the spectra so far."""
  results = run_record.result_values(run.record)
  # A backbone imported with --mode=import: every checkpoint keeps saying so.
  imported = ({train_state_lib.IMPORTED: record[train_state_lib.IMPORTED]}
              if train_state_lib.IMPORTED in record else {})
  return lambda: {**train_state_lib.checkpoint_record(run, probe_classes),
                  "results": results, **imported, "steps_per_epoch": steps_per_epoch,
                  "num_train_examples": num_examples,
                  "spectra": [(s, e.tolist()) for s, e in spectrum.spectra]}


def _resume(run: settings_lib.Settings, workdir: str, manager, state: TrainState, writer,
            probe_classes: int, detector: health.Detector) -> tuple[TrainState, dict]:
  """(state, record) of the latest usable checkpoint, or (`state`, {}); the record of
  the run (config.json) written once the checkpoint has accepted this run."""
  restored, record = train_state_lib.restore(manager, state, run,
                                             probe_classes=probe_classes,
                                             check_state=detector.why)
  # A checkpoint keeps the values that change results: a resume is checked against it
  # (config.json may be gone), or against config.json for checkpoints without them.
  compared = restored is not None and run_record.warn_if_results_change(
      _saved_results(record), run.record,
      f"The checkpoint of step {int(restored.step)} in {manager.directory}")
  # Only a run the checkpoint accepts rewrites the record of the run.
  run_record.write_run_config(run.record, workdir, writer, compare=not compared)
  if restored is None:
    return state, {}
  logging.info("Resumed from %s at step %d.", manager.directory, int(restored.step))
  return restored, record
