"""run_record: workdir/config.json holds the run's configuration; a changed resume says so."""
import json
import logging

from conftest import tiny_config

from corinfomax_jax.modes import pretrain
from corinfomax_jax.run import run_record
from corinfomax_jax.run import settings


def test_changed_result_keys_name_old_and_new_and_skip_bookkeeping():
  old = {"corinfomax.alpha": 250.0, "log_every_steps": 50, "aug.view2.solarize_p": 0.2,
         "model.width": 8, "eval.knn.every_epochs": 1}
  new = {"corinfomax.alpha": 500.0, "log_every_steps": 10, "aug.view2.solarize_p": 0.3,
         "model.width": 8, "model.dtype": "bfloat16", "eval.knn.every_epochs": 2}
  assert run_record.changed_result_keys(old, new) == [
      "aug.view2.solarize_p 0.2 -> 0.3", "corinfomax.alpha 250.0 -> 500.0",
      "model.dtype (absent) -> bfloat16"]


def test_keys_added_later_read_as_what_earlier_runs_did(tmp_path, caplog):
  """A record from before adam_b1, adam_b2 and grad_clip_norm: their defaults are what
  it ran with, so resuming at the defaults warns of nothing, and clipping is named."""
  new = settings.resolve(tiny_config("cifar10")).record
  old = {k: v for k, v in new.items() if k not in ("adam_b1", "adam_b2", "grad_clip_norm")}
  (tmp_path / "config.json").write_text(json.dumps(old))
  with caplog.at_level(logging.WARNING):
    run_record.write_run_config(new, str(tmp_path))
  assert not [r for r in caplog.records if "change results" in r.getMessage()]
  clipped = {**new, "grad_clip_norm": 1.0}
  with caplog.at_level(logging.WARNING):
    run_record.write_run_config(clipped, str(tmp_path))
  warnings = [r.getMessage() for r in caplog.records if "change results" in r.getMessage()]
  assert len(warnings) == 1 and "grad_clip_norm 0.0 -> 1.0" in warnings[0], warnings


def test_a_record_of_an_earlier_version_is_compared_in_the_new_places(tmp_path, caplog):
  (tmp_path / "config.json").write_text(json.dumps(
      {"alpha": 250.0, "model": {"width": 8}, "eval": {"knn_k": 20}}))
  new = {"corinfomax": {"alpha": 500.0}, "model": {"width": 8}, "eval": {"knn": {"k": 20}}}
  with caplog.at_level(logging.WARNING):
    run_record.write_run_config(new, str(tmp_path))
  warnings = [r.getMessage() for r in caplog.records if "change results" in r.getMessage()]
  assert len(warnings) == 1 and "corinfomax.alpha 250.0 -> 500.0" in warnings[0], warnings
  assert "knn" not in warnings[0]  # moved, not changed; and not a result key
  assert json.loads((tmp_path / "config.json").read_text()) == new
  # The record that was there is kept as it was written.
  assert json.loads((tmp_path / "config.json.1").read_text()) == {
      "alpha": 250.0, "model": {"width": 8}, "eval": {"knn_k": 20}}


def test_resume_with_a_changed_alpha_warns_once_and_records_the_new(image_folder, tmp_path,
                                                                   caplog):
  config = tiny_config(f"folder:{image_folder}", max_steps=1)
  pretrain.train_and_evaluate(config, str(tmp_path))
  first = json.loads((tmp_path / "config.json").read_text())
  assert first["corinfomax"]["alpha"] == 250.0 and first["model"]["width"] == 4
  assert first["method"] == "corinfomax" and "alpha" not in first
  assert first["aug"]["view1"]["blur_p"] == 1.0 and first["data_dir"] is None

  config = tiny_config(f"folder:{image_folder}", max_steps=2, alpha=500.0)
  with caplog.at_level(logging.WARNING):
    pretrain.train_and_evaluate(config, str(tmp_path))
  warnings = [r.getMessage() for r in caplog.records if "change results" in r.getMessage()]
  assert len(warnings) == 1, warnings
  assert "corinfomax.alpha 250.0 -> 500.0" in warnings[0]
  assert "max_steps" not in warnings[0]  # bookkeeping, not a result
  assert json.loads((tmp_path / "config.json").read_text())["corinfomax"]["alpha"] == 500.0
  assert json.loads((tmp_path / "config.json.1").read_text()) == first


def test_every_generation_of_the_record_is_kept(tmp_path, caplog):
  records = [{"corinfomax": {"alpha": a}, "seed": 0} for a in (250.0, 500.0, 750.0)]
  for record in records:
    run_record.write_run_config(record, str(tmp_path))
  run_record.write_run_config(records[-1], str(tmp_path))  # unchanged: no new generation
  kept = run_record.record_generations(str(tmp_path))
  assert [p.name for p in kept] == ["config.json.1", "config.json.2"]
  assert [json.loads(p.read_text()) for p in kept] == records[:2]
  assert json.loads((tmp_path / "config.json").read_text()) == records[2]


def test_a_damaged_record_is_kept_and_replaced_with_one_warning(tmp_path, caplog):
  (tmp_path / "config.json").write_text("")  # cut short by a full disk
  with caplog.at_level(logging.WARNING):
    run_record.write_run_config({"seed": 0}, str(tmp_path))
  warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
  assert len(warnings) == 1, warnings
  assert f"{tmp_path / 'config.json'} is not a readable record (JSONDecodeError" in (
      warnings[0]) and "kept as config.json.1" in warnings[0]
  assert json.loads((tmp_path / "config.json").read_text()) == {"seed": 0}
  assert (tmp_path / "config.json.1").read_text() == ""


def test_a_resume_is_checked_against_the_checkpoint_even_without_config_json(
    image_folder, tmp_path, caplog):
  """The checkpoint keeps the values that change results: with config.json gone, a
  resume that changes alpha still says so, once, naming the checkpoint's step."""
  pretrain.train_and_evaluate(tiny_config(f"folder:{image_folder}", max_steps=2),
                              str(tmp_path))
  (tmp_path / "config.json").unlink()
  config = tiny_config(f"folder:{image_folder}", max_steps=3, alpha=500.0)
  with caplog.at_level(logging.WARNING):
    pretrain.train_and_evaluate(config, str(tmp_path))
  warnings = [r.getMessage() for r in caplog.records if "change results" in r.getMessage()]
  assert len(warnings) == 1, warnings
  assert "corinfomax.alpha 250.0 -> 500.0" in warnings[0]
  assert "checkpoint of step 2" in warnings[0]
