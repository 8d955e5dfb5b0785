"""--mode=knn_eval: kNN accuracy of the workdir's latest checkpoint, or of random init."""
from __future__ import annotations

from absl import logging

from corinfomax_jax.eval import features
from corinfomax_jax.eval import knn
from corinfomax_jax.modes import startup
from corinfomax_jax.run import train_state as train_state_lib

RESULT_FILE = "knn_eval.json"


def knn_eval(config, workdir: str) -> dict:
  """kNN accuracy of the workdir's latest checkpoint (or the random initialisation).

  With config.eval.random_init the network is the seeded initialisation
  (train_state.initial_state with config.seed) and no checkpoint is read. Writes
  <workdir>/knn_eval.json and returns the same dict: top1, top5 (percent) at the
  headline k and temperature (`knn.knn_headline`: 200 and 0.07, InstDisc's),
  "by_k" {k: {top1, top5}} at that temperature, "by_temperature" {T: {k: {top1, top5}}},
  step, random_init, num_bank_examples, num_query_examples, k, temperature, dataset,
  splits.
  """
  # Without random_init the workdir must hold a checkpoint: load_pretrained says so.
  run, mesh = startup.begin(
      config, workdir, batch_sizes=lambda r: {"eval.batch_size": r.eval.batch_size},
      create_workdir=bool(config.eval.random_init))
  train_source, eval_source = features.open_sources(run.data)
  model = run.model.create()
  state = startup.backbone_state(run, model, mesh, workdir)
  evaluator = knn.KnnEvaluator(run.eval.knn, features.Context(
      data=run.data, batch_size=run.eval.batch_size, model=model, mesh=mesh,
      train_source=train_source, eval_source=eval_source))
  table, counts = evaluator.accuracies(train_state_lib.backbone_variables(state))
  ks, temperatures = evaluator.ks, evaluator.temperatures
  k, t = knn.knn_headline(ks, temperatures)
  random_init = run.eval.random_init
  result = {**table[(k, t)], **counts, "k": k, "temperature": t,
            "by_k": {str(kk): table[(kk, t)] for kk in ks},
            "by_temperature": {f"{tt:g}": {str(kk): table[(kk, tt)] for kk in ks}
                               for tt in temperatures},
            "step": int(state.step), "random_init": random_init,
            "method": run.method.name,
            "dataset": run.data.dataset, "train_split": run.data.train_split,
            "eval_split": run.data.eval_split}
  if train_source.num_classes < 2:
    # Every neighbour votes for the one class: 100% says nothing about the features.
    logging.warning("kNN: %s %r has %d class, so top-1 is 100 whatever the features; "
                    "evaluate on a split with at least two classes.", run.data.dataset,
                    run.data.train_split, train_source.num_classes)
    result["trivial"] = True
  path = startup.write_result(workdir, RESULT_FILE, result)
  logging.info("kNN (k=%d, T=%g) of %s at step %d: top-1 %.2f top-5 %.2f (%d bank, %d "
               "queries); written to %s.", result["k"], result["temperature"],
               "the random initialisation" if random_init else "the checkpoint",
               result["step"], result["top1"], result["top5"],
               result["num_bank_examples"], result["num_query_examples"], path)
  return result
