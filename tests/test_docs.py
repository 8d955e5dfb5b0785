"""The README and docs/ cannot drift from the code: every Python block of the README
runs, and every repository path, config file and config key they name exists."""
import pathlib
import re

import pytest

from configs import default
from corinfomax_jax.run import settings

ROOT = pathlib.Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]
# Repository paths as the pages write them: a top-level folder, then a path.
PATH = re.compile(r"(?<![\w./-])((?:corinfomax_jax|configs|tests|bench|tools|docs)/"
                  r"[\w.*{},<>/-]*)")
LINK = re.compile(r"\]\(([^)#:]+)(?:#[^)]*)?\)")
# --config.a.b=... on a command line, or config.a.b in running text.
KEY = re.compile(r"(?<![\w.])(?:--)?config\.([a-z_][\w]*(?:\.[a-z_][\w]*)*)")


def _text(page):
  return page.read_text()


def _named_paths(page):
  """(path as written, path relative to the repository) of each path `page` names."""
  text = _text(page)
  for match in PATH.finditer(text):
    written = match.group(1).rstrip(".,;:")
    if any(c in written for c in "*{}<>"):  # a pattern or a placeholder, not a file
      continue
    yield written, written
  for match in LINK.finditer(text):
    target = match.group(1)
    if target.startswith(("http", "mailto")):
      continue
    yield target, str((page.parent / target).resolve().relative_to(ROOT))


def _named_keys(page):
  for match in KEY.finditer(_text(page)):
    key = match.group(1).rstrip(".")
    if key in ("json", "py") or key.startswith(("json.", "py.")):  # config.json, config.py
      continue
    yield key


def _known(config, key):
  node = config
  for part in key.split("."):
    if not hasattr(node, "keys") or part not in node.keys():
      return False
    node = node[part]
  return True


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_path_a_page_names_exists(page):
  missing = sorted({written for written, path in _named_paths(page)
                    if not (ROOT / path.split(":")[0]).exists()})
  assert not missing, f"{page.name} names paths that do not exist: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_config_key_a_page_names_exists(page):
  config = default.get_config()
  moved = set(settings.MOVED_KEYS)
  unknown = sorted({key for key in _named_keys(page)
                    if not _known(config, key) and key not in moved
                    and key.split(".")[0] not in moved})
  assert not unknown, f"{page.name} names config keys that do not exist: {unknown}"


def test_the_checks_see_what_they_check():
  """The patterns find paths and keys in the pages (a broken pattern passes vacuously)."""
  readme = ROOT / "README.md"
  assert ("configs/cifar10_cpu.py", "configs/cifar10_cpu.py") in set(_named_paths(readme))
  assert ("docs/loss.md", "docs/loss.md") in set(_named_paths(readme))
  assert "eval.knn.max_train_examples" in set(_named_keys(readme))
  assert not _known(default.get_config(), "eval.knn.no_such_key")
  assert len({k for p in PAGES for k in _named_keys(p)}) > 30


def test_the_readme_python_blocks_run():
  """The quick start's blocks, run in order in one namespace, as a reader pastes them."""
  blocks = re.findall(r"```python\n(.*?)```", _text(ROOT / "README.md"), re.S)
  assert len(blocks) >= 3
  namespace = {}
  for block in blocks:
    exec(compile(block, "README.md", "exec"), namespace)  # pylint: disable=exec-used
  assert float(namespace["loss"]) == float(namespace["loss"])  # finite, not NaN
  assert namespace["cov_state"].cov1.shape == (8, 8)
