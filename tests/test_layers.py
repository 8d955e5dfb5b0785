"""The package's layers only point down, and no two modules import each other.

The layers are the subpackages, bottom to top (README, Layout):
  (bottom)   compiler, errors, files, mesh, tensorflow_setup: used by every layer above
  maths      methods/, models/, interop/
  data       data/
  run        run/
  eval       eval/
  modes      modes/
A module may import modules of its own layer or below, and the import graph is acyclic.
The package root (`__init__`, and `augment`, the public name of data/recipe and
data/augment) only re-exports.
"""
import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "corinfomax_jax"
LAYERS = [
    ("bottom", {"compiler", "errors", "files", "mesh", "tensorflow_setup"}),
    ("maths", {"methods", "models", "interop"}),
    ("data", {"data"}),
    ("run", {"run"}),
    ("eval", {"eval"}),
    ("modes", {"modes"}),
]
ROOT_ALIASES = {"__init__", "augment"}  # re-exports for users, not a layer


def _unit(dotted: str) -> str:
  """corinfomax_jax.run.loop -> "run"; corinfomax_jax.files -> "files"."""
  return dotted.split(".")[1]


def _module_name(path: pathlib.Path) -> str:
  rel = path.relative_to(ROOT).with_suffix("")
  return ".".join(rel.parts)


def _layer_of(unit: str) -> int:
  for index, (_, members) in enumerate(LAYERS):
    if unit in members:
      return index
  raise AssertionError(f"corinfomax_jax/{unit} is in no layer: add it to LAYERS (and to "
                       "the README's layout)")


def _imports(path):
  """Dotted corinfomax_jax modules (or packages) that `path` imports, anywhere in it."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.ImportFrom) and node.module:
      if node.module == "corinfomax_jax":
        found.update(f"corinfomax_jax.{alias.name}" for alias in node.names)
      elif node.module.startswith("corinfomax_jax."):
        # `from corinfomax_jax.run import loop` imports corinfomax_jax.run.loop (or a name
        # of corinfomax_jax.run): either way the unit is "run".
        found.update(f"{node.module}.{alias.name}" for alias in node.names)
    elif isinstance(node, ast.Import):
      for alias in node.names:
        if alias.name.startswith("corinfomax_jax."):
          found.add(alias.name)
  return found


def _modules():
  return {_module_name(p): p for p in PACKAGE.rglob("*.py")
          if _module_name(p).split(".")[1] not in ROOT_ALIASES}


def _graph():
  """Module -> the modules it imports (a package's name stands for its __init__)."""
  modules = _modules()
  graph = {}
  for name, path in modules.items():
    targets = set()
    for imported in _imports(path):
      while imported not in modules and "." in imported[len("corinfomax_jax."):]:
        imported = imported.rsplit(".", 1)[0]  # a name inside a module
      if imported in modules:
        targets.add(imported)
      elif imported + ".__init__" in modules:
        targets.add(imported + ".__init__")
    graph[name] = targets - {name}
  return graph


def test_every_module_is_in_a_layer():
  for module in _modules():
    _layer_of(_unit(module))


@pytest.mark.parametrize("module", sorted(_modules()))
def test_imports_point_down(module):
  mine = _layer_of(_unit(module))
  for other in _graph()[module]:
    assert _layer_of(_unit(other)) <= mine, (
        f"{module} ({LAYERS[mine][0]}) imports {other} "
        f"({LAYERS[_layer_of(_unit(other))][0]}), a layer above it")


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
  bad.write_text("from corinfomax_jax.modes import pretrain\nimport corinfomax_jax.run.loop\n")
  assert _imports(bad) == {"corinfomax_jax.modes.pretrain", "corinfomax_jax.run.loop"}
  assert _layer_of(_unit("corinfomax_jax.modes.pretrain")) > _layer_of("run")


def test_the_public_augment_names_the_recipe_and_the_device_ops():
  import corinfomax_jax  # pylint: disable=g-import-not-at-top
  from corinfomax_jax import augment  # pylint: disable=g-import-not-at-top
  from corinfomax_jax.data import augment as device_ops  # pylint: disable=g-import-not-at-top
  from corinfomax_jax.data import recipe  # pylint: disable=g-import-not-at-top
  assert corinfomax_jax.augment is augment and "augment" in corinfomax_jax.__all__
  assert augment.view is device_ops.view and augment.NUM_DRAWS == device_ops.NUM_DRAWS
  assert augment.resolve is recipe.resolve and augment.view_config is recipe.view_config
  assert augment.VIEW_KEYS == recipe.DEVICE_KEYS  # the keys `view` reads, as before


def test_loss_models_and_step_import_without_tensorflow():
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  code = ("import sys; import corinfomax_jax.modes.pretrain, corinfomax_jax.modes.linear_eval, "
          "corinfomax_jax.modes.finetune, corinfomax_jax.eval.evaluators, "
          "corinfomax_jax.eval.probe, corinfomax_jax.eval.features, corinfomax_jax.augment; "
          "assert 'tensorflow' not in sys.modules, 'tensorflow was imported'")
  subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
