"""The evaluator registry: one entry per name config.eval.monitors may list."""
from conftest import tiny_config

from corinfomax_jax.eval import evaluators
from corinfomax_jax.run import settings


def test_every_monitor_name_has_an_evaluator_built_from_its_own_section():
  assert set(evaluators.REGISTRY) == set(settings.EVALUATORS)
  for name, evaluator in evaluators.REGISTRY.items():  # each reads its own section
    assert evaluator.name == name
    assert evaluator.settings_class is settings.EVAL_SECTIONS[name]
  config = tiny_config("cifar10")
  config.eval.online_probe.enabled = True
  config.eval.monitors = tuple(settings.EVALUATORS)
  config.eval.knn.every_epochs = 2
  run = settings.resolve(config)
  made = evaluators.create_evaluators(run.eval, run.data, None, None, None, None)
  assert [type(e) for e in made] == [evaluators.REGISTRY[n] for n in run.eval.monitors]
  assert [e.name for e in made] == list(run.eval.monitors)
  assert evaluators.monitors_on(run.eval)
