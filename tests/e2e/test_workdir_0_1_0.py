"""A workdir written by version 0.1.0 (flat modules, flat config keys) still resumes,
evaluates, exports and loads.

data/workdir_0.1.0 was written by that version's trainer (`main.py` at commit e1ee9ce,
tiny config: ResNet-18 width 4, projector (32, 8), 16 px, batch 16, two steps):
its checkpoint of step 2 and its config.json. data/workdir_0.1.0_features.npz holds
four fixed images and the features that version's `load_encoder` gave for them.
"""
import json
import logging
import pathlib

import numpy as np
import pytest

from conftest import stored_workdir
from conftest import tiny_config

import corinfomax_jax
from corinfomax_jax.modes import export
from corinfomax_jax.modes import knn_eval
from corinfomax_jax.modes import pretrain

DATA = pathlib.Path(__file__).resolve().parent / "data"


@pytest.fixture
def old_workdir(tmp_path):
  return stored_workdir("workdir_0.1.0", tmp_path)


def _config(image_folder, **overrides):
  # The keys of that run, as its users set them then (flat model keys): 16 px, width 4.
  return tiny_config(f"folder:{image_folder}", width=4, projector=(32, 8), **overrides)


def test_load_encoder_gives_the_features_that_version_gave(old_workdir):
  saved = np.load(DATA / "workdir_0.1.0_features.npz")
  enc = corinfomax_jax.load_encoder(str(old_workdir))
  assert enc.step == 2 and enc.feature_dim == 32
  np.testing.assert_allclose(enc(saved["images"]), saved["features"], rtol=1e-5,
                             atol=1e-5)


def test_it_resumes_from_its_checkpoint_with_the_same_settings(old_workdir, image_folder,
                                                               caplog):
  caplog.set_level(logging.INFO)
  state = pretrain.train_and_evaluate(_config(image_folder, max_steps=4),
                                      str(old_workdir))
  assert int(state.step) == 4
  assert any("Resumed from" in r.getMessage() and "at step 2" in r.getMessage()
             for r in caplog.records)
  # Its record's flat keys (alpha, ...) are compared in their new places: no change of
  # CorInfoMax's settings is reported, and the new record has the new layout.
  changed = [r.getMessage() for r in caplog.records if "change results" in r.getMessage()]
  assert not any("alpha" in m or "corinfomax" in m for m in changed), changed
  record = json.loads((old_workdir / "config.json").read_text())
  assert record["method"] == "corinfomax" and record["corinfomax"]["alpha"] == 250.0


def test_it_evaluates_and_exports(old_workdir, image_folder):
  result = knn_eval.knn_eval(_config(image_folder), str(old_workdir))
  assert result["step"] == 2 and 0 <= result["top1"] <= 100
  out = export.export_backbone(_config(image_folder), str(old_workdir))
  assert out["step"] == 2 and pathlib.Path(out["safetensors"]).stat().st_size > 0
  # Its model card reads that version's flat config.json keys in their new places.
  card = pathlib.Path(out["card"]).read_text()
  assert "- corinfomax: alpha = 250.0, eps = 1e-08, la_R = 0.01" in card
  assert "the checkpoint does not record its steps per epoch" in card


def test_another_method_on_it_is_refused_in_one_line(old_workdir, image_folder):
  from corinfomax_jax.errors import ConfigError  # pylint: disable=g-import-not-at-top
  config = _config(image_folder, max_steps=4)
  config.method = "vicreg"
  with pytest.raises(ConfigError, match=r"config\.method: checkpoint 'corinfomax' vs "
                                        r"config 'vicreg'"):
    pretrain.train_and_evaluate(config, str(old_workdir))
  # The refused run left the record of the run that wrote the checkpoint.
  assert json.loads((old_workdir / "config.json").read_text())["alpha"] == 250.0
