"""The package's layers only point down, and no two modules import each other.

The layers, bottom to top (README, Layout):
  maths        errors, files, mesh, objective, models, augment, knn, export
  data         sources, crops, pipeline
  run          configuration, checkpoints, metrics, loop, train_state, workdir, run_record,
               encoder
  loops        evaluators, linear_probe, pretrain, exporting, finetune
  main.py
A module may import modules of its own layer or below, and the import graph is acyclic.
"""
import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "corinfomax_jax"
LAYERS = [
    ("maths", {"errors", "files", "mesh", "objective", "models", "augment", "knn",
               "export"}),
    ("data", {"sources", "crops", "pipeline"}),
    ("run", {"configuration", "checkpoints", "metrics", "loop", "train_state",
             "workdir", "run_record", "encoder"}),
    ("loops", {"evaluators", "linear_probe", "pretrain", "exporting", "finetune"}),
]


def _layer_of(module):
  for index, (_, members) in enumerate(LAYERS):
    if module in members:
      return index
  raise AssertionError(f"corinfomax_jax/{module}.py is in no layer: add it to LAYERS "
                       "(and to the README's layout)")


def _imports(path):
  """corinfomax_jax modules that `path` imports, anywhere in the file."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.ImportFrom) and node.module:
      if node.module == "corinfomax_jax":
        found.update(alias.name for alias in node.names)
      elif node.module.startswith("corinfomax_jax."):
        found.add(node.module.split(".")[1])
    elif isinstance(node, ast.Import):
      for alias in node.names:
        if alias.name.startswith("corinfomax_jax."):
          found.add(alias.name.split(".")[1])
  return found


def _graph():
  return {p.stem: _imports(p) for p in PACKAGE.glob("*.py") if p.stem != "__init__"}


def test_every_module_is_in_a_layer():
  for module in _graph():
    _layer_of(module)


@pytest.mark.parametrize("module", sorted(_graph()))
def test_imports_point_down(module):
  mine = _layer_of(module)
  for other in _graph()[module]:
    assert _layer_of(other) <= mine, (
        f"{module} ({LAYERS[mine][0]}) imports {other} ({LAYERS[_layer_of(other)][0]}), "
        "a layer above it")


def test_import_graph_is_acyclic():
  graph = _graph()
  state = {}

  def visit(module, path):
    if state.get(module) == "done":
      return
    assert state.get(module) != "open", f"import cycle: {' -> '.join(path + [module])}"
    state[module] = "open"
    for other in graph.get(module, ()):
      visit(other, path + [module])
    state[module] = "done"

  for module in graph:
    visit(module, [])


def test_the_check_itself_sees_an_upward_import(tmp_path):
  bad = tmp_path / "bad.py"
  bad.write_text("from corinfomax_jax import pretrain\nimport corinfomax_jax.loop\n")
  assert _imports(bad) == {"pretrain", "loop"}


def test_loss_models_and_step_import_without_tensorflow():
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  code = ("import sys; import corinfomax_jax.pretrain, corinfomax_jax.linear_probe, "
          "corinfomax_jax.evaluators; "
          "assert 'tensorflow' not in sys.modules, 'tensorflow was imported'")
  subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
