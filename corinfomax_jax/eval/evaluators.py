"""The evaluators pretraining can run as monitors: their registry and the loop action.

An evaluator is a class built from its own settings section (its `settings_class`, a
settings.Monitor) and a features.Context; it has `run_on_state(state) -> dict` of
numbers and `every_steps(steps_per_epoch)` (its own cadence). A new one is a module in
eval/ and one line in REGISTRY, plus its settings: one Monitor class and one field of
settings.Eval, whose name is the registry's (settings.EVAL_SECTIONS lists them, and
config.eval.monitors may name them).
"""
from __future__ import annotations

import time

from absl import logging

from corinfomax_jax.eval import features
from corinfomax_jax.eval import knn
from corinfomax_jax.eval import probe
from corinfomax_jax.run import loop
from corinfomax_jax.run import settings as settings_lib

# Each evaluator by the name of its section of settings.Eval (one line a new one).
REGISTRY = {"knn": knn.KnnEvaluator, "online_probe": probe.OnlineProbeEvaluator}


def monitors_on(ev: settings_lib.Eval) -> bool:
  """Whether pretraining runs any evaluator (listed in ev.monitors, cadence > 0)."""
  return any(getattr(ev, name).every_epochs > 0 for name in ev.monitors)


def create_evaluators(ev: settings_lib.Eval, data: settings_lib.Data, model, mesh,
                      train_source, eval_source) -> list:
  """The evaluators `ev.monitors` lists whose own cadence is on (every_epochs > 0)."""
  context = features.Context(data=data, batch_size=ev.batch_size, model=model, mesh=mesh,
                             train_source=train_source, eval_source=eval_source)
  out = []
  for name in ev.monitors:
    evaluator = REGISTRY[name](getattr(ev, name), context)
    if evaluator.every_steps(1) > 0:
      out.append(evaluator)
  return out


def monitor_action(evaluator, every_steps: int, writer) -> loop.Periodic:
  """A loop action that runs `evaluator` on the train state and logs its numbers."""

  def run(step, state):
    start = time.time()
    result = evaluator.run_on_state(state)
    numbers = {k: v for k, v in result.items() if not k.startswith("num_")}
    # TensorBoard: knn/top1, knn/top1_k20, ... (evaluator names, then its own).
    logging.info("%s monitor at step %d: %s (%.1f s).", evaluator.name, step,
                 " ".join(f"{k} {v:.2f}" for k, v in numbers.items()), time.time() - start)
    writer.scalars(step, {f"{evaluator.name}/{k}": v for k, v in numbers.items()})

  return loop.Periodic(every_steps, run)
