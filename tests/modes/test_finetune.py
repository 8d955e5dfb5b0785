"""--mode=finetune: learning, the result file, resume, early errors."""
import json
import math
import os
import re

import jax
import numpy as np
import pytest
from conftest import tiny_config
from etils import epath

from configs import default as default_config
from corinfomax_jax import errors
from corinfomax_jax import models
from corinfomax_jax.modes import export as export_lib
from corinfomax_jax.modes import finetune
from corinfomax_jax.run import settings


def _config(image_folder, **eval_overrides):
  config = tiny_config(f"folder:{image_folder}", log_every_steps=1)
  config.eval.update({**dict(label_fraction=0.5, finetune_batch_size=8, finetune_epochs=2,
                             finetune_head_lr=0.5, finetune_backbone_lr=0.05),
                      **eval_overrides})
  return config


@pytest.mark.parametrize("key,value,message", [
    ("label_fraction", 0.0, "config.eval.finetune.label_fraction = 0.0 is invalid"),
    ("label_fraction", 1.5, "config.eval.finetune.label_fraction = 1.5 is invalid"),
    ("label_file", "/no/such/file.txt",
     "config.eval.finetune.label_file = '/no/such/file.txt'"),
    (None, None, "No pretraining checkpoint"),
])
def test_fails_before_any_work_in_one_line(key, value, message, image_folder, tmp_path):
  config = _config(image_folder, **({key: value} if key else {}))
  workdir = tmp_path / "never_created"
  with pytest.raises(errors.ConfigError, match=re.escape(message)) as e:
    finetune.finetune(config, str(workdir))
  assert "\n" not in str(e.value) and not workdir.exists()


def test_learns_writes_json_and_resumes_as_one_run(pretrained_workdir, image_folder,
                                                   tmp_path):
  runs = {}
  for name in ("one", "two"):
    (tmp_path / name).mkdir()
    os.symlink(pretrained_workdir / "checkpoints", tmp_path / name / "checkpoints")
  # 12 labelled images, batch 8: 1 step per epoch, a checkpoint each step.
  config = _config(image_folder, finetune_epochs=4)
  runs["one"] = finetune.finetune(config, str(tmp_path / "one"))
  stopped = finetune.finetune(_config(image_folder, finetune_epochs=4, finetune_max_steps=2),
                              str(tmp_path / "two"))
  assert stopped["steps"] == 2
  runs["two"] = finetune.finetune(config, str(tmp_path / "two"))
  one, two = runs["one"], runs["two"]
  written = json.loads((tmp_path / "one" / "finetune.json").read_text())
  assert written == {k: v for k, v in one.items() if k != "state"}
  assert (one["steps"], one["num_labelled"], one["label_fraction"], one["epochs"],
          one["pretrain_step"], one["num_test_examples"]) == (4, 12, 0.5, 4, 4, 24)
  # The head starts at zero, so the loss starts at ln(2) on every image: it fell.
  assert one["train_loss_last_epoch"] < math.log(2) - 0.05
  assert 0 <= one["top1"] <= one["top5"] == 100  # 2 classes
  for a, b in zip(jax.tree.leaves(jax.device_get(one["state"])),
                  jax.tree.leaves(jax.device_get(two["state"]))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  flat = lambda r: {k: v for k, v in r.items() if k not in ("state", "last", "best")}
  assert flat(one) == pytest.approx(flat(two))
  for key in ("last", "best"):
    assert one[key] == pytest.approx(two[key])
  # Tested after the last epoch only: best is last.
  assert one["best"]["epoch"] == one["last"]["epoch"] == 4
  assert one["best"]["top1"] == one["last"]["top1"] == one["top1"]


def test_another_methods_pretraining_trains_the_online_probe_and_fine_tunes(
    image_folder, tmp_path):
  """Barlow Twins through the same trainer: the online probe learns beside it, the
  spectrum is logged from its batch covariances, and fine-tuning starts from it."""
  from corinfomax_jax.modes import pretrain  # pylint: disable=g-import-not-at-top
  config = tiny_config(f"folder:{image_folder}", max_steps=2, spectrum_every_steps=1)
  config.method = "barlow_twins"
  config.eval.online_probe.enabled = True
  state = pretrain.train_and_evaluate(config, str(tmp_path))
  assert int(state.step) == 2 and state.probe["params"]["kernel"].shape == (32, 2)
  assert (tmp_path / "spectrum.png").stat().st_size > 0
  config = _config(image_folder, finetune_epochs=1)
  config.method = "barlow_twins"
  result = finetune.finetune(config, str(tmp_path))
  assert result["pretrain_step"] == 2 and result["method"] == "barlow_twins"
  assert 0 <= result["top1"] <= 100 and math.isfinite(result["test_loss"])


def test_the_paper_protocol_steps_and_initialises_as_the_reference():
  """semi_supervised/evaluate_step.py: StepLR(5) per epoch, x0.2 backbone from 0.005,
  x0.1 head from 10 (1%); head N(0, 0.01^2), bias 0."""
  config = default_config.get_config()
  default_config.set_paper_finetune(config, 1)
  ft = settings.resolve(config).eval.finetune
  steps_per_epoch = 7
  rates = finetune.learning_rates(ft, steps_per_epoch)
  backbone, head = rates["backbone"], rates["head"]
  for epoch in (0, 4, 5, 9, 10, 15, 19):
    for step in (epoch * steps_per_epoch, (epoch + 1) * steps_per_epoch - 1):
      k = epoch // 5
      np.testing.assert_allclose(float(backbone(step)), 0.005 * 0.2 ** k, rtol=1e-6)
      np.testing.assert_allclose(float(head(step)), 10 * 0.1 ** k, rtol=1e-6)
  head = models.init_linear_head(2048, 1000, init=ft.head_init,
                                 stddev=finetune.HEAD_STDDEV, rng=jax.random.key(0))
  assert abs(float(np.std(head["kernel"])) - 0.01) < 2e-4
  assert abs(float(np.mean(head["kernel"]))) < 1e-4 and not np.any(head["bias"])
  assert (ft.epochs, ft.batch_size, ft.weight_decay, ft.momentum, ft.crop_interpolation,
          ft.evaluate_every_epoch) == (20, 256, 0.0, 0.9, "bilinear", True)
  default_config.set_paper_finetune(config, 10)
  assert config.eval.finetune.head_lr == 20 and config.eval.finetune.backbone_lr == 0.005
  assert config.eval.finetune.label_file == "10percent.txt"


def test_evaluated_every_epoch_reports_the_last_and_the_best(pretrained_workdir,
                                                             image_folder, tmp_path):
  for name in ("one", "two"):
    (tmp_path / name).mkdir()
    os.symlink(pretrained_workdir / "checkpoints", tmp_path / name / "checkpoints")
  config = _config(image_folder, finetune_epochs=3)  # 1 step per epoch
  config.eval.finetune.update(evaluate_every_epoch=True, schedule="step", step_epochs=1,
                              head_init="normal", crop_interpolation="bilinear")
  result = finetune.finetune(config, str(tmp_path / "one"))
  written = json.loads((tmp_path / "one" / "finetune.json").read_text())
  last, best = written["last"], written["best"]
  assert last["epoch"] == 3 and best["epoch"] in (1, 2, 3)
  assert best["top1"] >= last["top1"] and last["top1"] == written["top1"] == result["top1"]
  assert "test split" in best["chosen_on"]
  assert (written["schedule"], written["head_init"]) == ("step", "normal")
  # Stopped after epoch 2 and resumed: the checkpoint's record kept epochs 1 and 2.
  config.eval.finetune.max_steps = 2
  finetune.finetune(config, str(tmp_path / "two"))
  saved = json.loads((tmp_path / "two" / "finetune" / "checkpoints" / "2" / "run" /
                      "metadata").read_text())
  assert [t["epoch"] for t in saved["tests"]] == [1, 2]
  config.eval.finetune.max_steps = -1
  resumed = finetune.finetune(config, str(tmp_path / "two"))
  assert resumed["last"] == pytest.approx(last) and resumed["best"]["epoch"] == best["epoch"]
  assert resumed["best"]["top1"] == pytest.approx(best["top1"])


def test_two_subdirs_of_one_pretraining_write_side_by_side(pretrained_workdir, image_folder,
                                                            tmp_path):
  os.symlink(pretrained_workdir / "checkpoints", tmp_path / "checkpoints")
  results = {}
  for subdir, fraction in (("finetune", 0.5), ("finetune_semi1", 0.34)):
    config = _config(image_folder, label_fraction=fraction, finetune_epochs=1)
    config.eval.finetune.subdir = subdir
    results[subdir] = finetune.finetune(config, str(tmp_path))
  for subdir, labelled in (("finetune", 12), ("finetune_semi1", 8)):  # 6 or 4 per class
    written = json.loads((tmp_path / f"{subdir}.json").read_text())
    assert written == {k: v for k, v in results[subdir].items() if k != "state"}
    assert (written["num_labelled"], written["subdir"], written["steps"]) == (
        labelled, subdir, 1)
    assert (tmp_path / subdir / "checkpoints").is_dir()
  # The export's model card finds both.
  found = export_lib._evaluations(epath.Path(tmp_path))  # pylint: disable=protected-access
  assert found["finetune"]["subdir"] == "finetune"
  assert found["finetune:finetune_semi1"]["num_labelled"] == 8
  assert found["knn"] is None and found["linear"] is None
