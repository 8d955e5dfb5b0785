"""run_record: workdir/config.json holds the run's configuration; a changed resume says so."""
import json
import logging

from conftest import tiny_config

from corinfomax_jax.modes import pretrain
from corinfomax_jax.run import run_record


def test_changed_result_keys_name_old_and_new_and_skip_bookkeeping():
  old = {"alpha": 250.0, "log_every_steps": 50, "aug.view2.solarize_p": 0.2,
         "model.width": 8}
  new = {"alpha": 500.0, "log_every_steps": 10, "aug.view2.solarize_p": 0.3,
         "model.width": 8, "model.dtype": "bfloat16"}
  assert run_record.changed_result_keys(old, new) == [
      "alpha 250.0 -> 500.0", "aug.view2.solarize_p 0.2 -> 0.3",
      "model.dtype (absent) -> bfloat16"]


def test_resume_with_a_changed_alpha_warns_once_and_records_the_new(image_folder, tmp_path,
                                                                   caplog):
  config = tiny_config(f"folder:{image_folder}", max_steps=1)
  pretrain.train_and_evaluate(config, str(tmp_path))
  first = json.loads((tmp_path / "config.json").read_text())
  assert first["alpha"] == 250.0 and first["model"]["width"] == 4
  assert first["aug"]["view1"]["blur_p"] == 1.0 and first["data_dir"] is None

  config = tiny_config(f"folder:{image_folder}", max_steps=2, alpha=500.0)
  with caplog.at_level(logging.WARNING):
    pretrain.train_and_evaluate(config, str(tmp_path))
  warnings = [r.getMessage() for r in caplog.records if "change results" in r.getMessage()]
  assert len(warnings) == 1, warnings
  assert "alpha 250.0 -> 500.0" in warnings[0]
  assert "max_steps" not in warnings[0]  # bookkeeping, not a result
  assert json.loads((tmp_path / "config.json").read_text())["alpha"] == 500.0
  assert json.loads((tmp_path / "config.json.prev").read_text()) == first
