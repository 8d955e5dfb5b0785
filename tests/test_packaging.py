"""The package builds into a wheel with its data file and the dependencies it declares.

The wheel is built from a copy of the source tree (setuptools writes build/ and
*.egg-info beside pyproject.toml), without build isolation so that no index is needed.
"""
import importlib.util
import pathlib
import re
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
CORE = ("jax", "flax", "optax", "orbax-checkpoint", "numpy", "etils")
TRAIN = ("tensorflow-cpu", "tensorflow-datasets", "importlib-resources", "tensorboard",
         "ml-collections", "absl-py", "matplotlib", "pillow")


def _name(requirement):
  return re.match(r"[A-Za-z0-9_.-]+", requirement).group(0).lower()


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
  if importlib.util.find_spec("setuptools") is None:
    pytest.skip("setuptools is not installed: cannot build the wheel without an index")
  src = tmp_path_factory.mktemp("src")
  for name in ("pyproject.toml", "README.md"):
    shutil.copy(ROOT / name, src / name)
  shutil.copytree(ROOT / "corinfomax_jax", src / "corinfomax_jax",
                  ignore=shutil.ignore_patterns("__pycache__"))
  out = tmp_path_factory.mktemp("wheel")
  subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                  "-q", "-w", str(out), str(src)], check=True, cwd=src)
  (path,) = out.glob("corinfomax_jax-*.whl")
  return zipfile.ZipFile(path)


def _metadata(wheel):
  (name,) = [n for n in wheel.namelist() if n.endswith(".dist-info/METADATA")]
  return wheel.read(name).decode()


def test_wheel_holds_every_module_and_the_class_list(wheel):
  names = set(wheel.namelist())
  modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "corinfomax_jax").rglob("*.py")}
  assert modules <= names, sorted(modules - names)
  assert "corinfomax_jax/data/imagenet100_classes.txt" in names
  assert not any(n.startswith(("tests/", "configs/")) for n in names)


def test_core_dependencies_plain_and_tensorflow_only_under_the_train_extra(wheel):
  requires = re.findall(r"^Requires-Dist: (.*)$", _metadata(wheel), re.M)
  core = {_name(r) for r in requires if "extra ==" not in r}
  train = {_name(r) for r in requires if 'extra == "train"' in r}
  assert core == set(CORE)
  assert train == set(TRAIN)
  assert not any(name.startswith("tensorflow") for name in core)
  assert re.search(r"^Requires-Python: >=3.11$", _metadata(wheel), re.M)


def test_version_and_licence_agree_with_the_package_and_the_licence_file(wheel):
  import corinfomax_jax  # pylint: disable=g-import-not-at-top
  metadata = _metadata(wheel)
  assert re.search(rf"^Version: {re.escape(corinfomax_jax.__version__)}$", metadata, re.M)
  assert re.search(r"^License: Apache-2.0$", metadata, re.M)
  assert (ROOT / "LICENSE").read_text().split()[:3] == ["Apache", "License", "Version"]
  assert f"## {corinfomax_jax.__version__}" in (ROOT / "CHANGELOG.md").read_text()


def test_requirements_txt_lists_what_pyproject_declares(wheel):
  requires = re.findall(r"^Requires-Dist: ([^;\n]*)", _metadata(wheel), re.M)
  declared = {r.strip().replace(" ", "") for r in requires
              if not r.startswith("corinfomax-jax")}
  listed = {line.split("#")[0].strip() for line in
            (ROOT / "requirements.txt").read_text().splitlines()}
  listed.discard("")

  def normal(requirement):  # setuptools reorders the bounds: compare them as sets
    name = _name(requirement)
    return name, frozenset(re.findall(r"[<>=!]=?[^,]+", requirement[len(name):]))

  assert {normal(r) for r in listed} == {normal(r) for r in declared}


def test_the_accelerator_extras_keep_the_core_jax_range(wheel):
  """jax[cuda12] / jax[tpu] under the core's range: one resolution, matching builds."""
  requires = re.findall(r"^Requires-Dist: (.*)$", _metadata(wheel), re.M)

  def bounds(requirement):
    spec = requirement.split(";")[0]
    return frozenset(re.findall(r"[<>=!]=?[^,\s]+", spec.split("]")[-1]
                                if "]" in spec else spec[len("jax"):]))

  core = [r for r in requires if _name(r) == "jax" and "extra ==" not in r]
  assert len(core) == 1
  for extra in ("cuda12", "tpu"):
    (accelerated,) = [r for r in requires if f'extra == "{extra}"' in r]
    assert accelerated.startswith(f"jax[{extra}]"), accelerated
    assert bounds(accelerated) == bounds(core[0]) != frozenset(), (accelerated, core)
