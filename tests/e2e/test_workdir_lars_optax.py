"""A LARS workdir of an earlier version, when config.optimizer="lars" meant optax.lars
(now "lars_optax"; "lars" is solo-learn's rule): every reader reads it, a resume under
its new name continues it, and a resume as "lars" is refused in one line.

data/workdir_lars_optax was written by the trainer at commit b18f546 (conftest's
tiny_config on conftest's image folder, optimizer="lars", two steps): its checkpoint of
step 2 (optax.lars's state; a record without "optimizer_version") and its config.json.
"""
import json
import logging

import pytest
from conftest import stored_workdir
from conftest import tiny_config

import corinfomax_jax
from corinfomax_jax.errors import ConfigError
from corinfomax_jax.modes import knn_eval
from corinfomax_jax.modes import pretrain


@pytest.fixture
def old_workdir(tmp_path):
  return stored_workdir("workdir_lars_optax", tmp_path)


def test_readers_read_it_whatever_optimizer_the_config_names(old_workdir, image_folder):
  for optimizer in ("lars", "sgd"):
    result = knn_eval.knn_eval(tiny_config(f"folder:{image_folder}", optimizer=optimizer),
                               str(old_workdir))
    assert result["step"] == 2 and 0 <= result["top1"] <= 100
  assert corinfomax_jax.load_encoder(str(old_workdir)).step == 2


def test_a_resume_as_lars_is_refused_in_one_line(old_workdir, image_folder):
  config = tiny_config(f"folder:{image_folder}", optimizer="lars", max_steps=4)
  with pytest.raises(ConfigError, match=r"written with optax's LARS.*"
                                        r"--config\.optimizer=lars_optax") as refused:
    pretrain.train_and_evaluate(config, str(old_workdir))
  assert "\n" not in str(refused.value)
  assert json.loads((old_workdir / "config.json").read_text())["optimizer"] == "lars"


def test_it_resumes_as_lars_optax_without_a_change_reported(old_workdir, image_folder,
                                                            caplog):
  caplog.set_level(logging.INFO)
  config = tiny_config(f"folder:{image_folder}", optimizer="lars_optax", max_steps=4)
  state = pretrain.train_and_evaluate(config, str(old_workdir))
  assert int(state.step) == 4
  assert any("Resumed from" in r.getMessage() and "at step 2" in r.getMessage()
             for r in caplog.records)
  changed = [r.getMessage() for r in caplog.records if "change results" in r.getMessage()]
  assert not any("optimizer" in m for m in changed), changed
