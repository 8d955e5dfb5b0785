"""main.py as a user meets it: every error is one `error: ...` line and exit status 1."""

import os
import subprocess
import sys

import pytest
from conftest import make_image_folder
from test_faults import ROOT
from test_faults import committed_steps
from test_faults import main_command


def run_main(*args, **kwargs):
  return subprocess.run(main_command(*args), capture_output=True, text=True, timeout=300,
                        **kwargs)


def assert_one_error_line(proc, *fragments):
  """Exit 1; one `error:` line, the last on stderr, with the fragments; no traceback."""
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert [l for l in lines if l.startswith("error:")] == lines[-1:], proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  for fragment in fragments:
    assert fragment in lines[-1], lines[-1]
  return lines[-1]


def test_missing_data_folder(tmp_path):
  proc = run_main(tmp_path / "nowhere", tmp_path / "w")
  assert_one_error_line(proc, "does not exist", str(tmp_path / "nowhere"))


def test_empty_split(tmp_path):
  folder = make_image_folder(tmp_path / "data")
  for p in (folder / "train").glob("*/*"):
    p.unlink()
  proc = run_main(folder, tmp_path / "w")
  assert_one_error_line(proc, "no", "images", "train")


def test_unknown_tfds_name(tmp_path, image_folder):
  proc = run_main(image_folder, tmp_path / "w", "--config.dataset=no_such_dataset_xyz")
  assert_one_error_line(proc, "no_such_dataset_xyz")


def test_batch_larger_than_the_data_set(tmp_path, image_folder):
  proc = run_main(image_folder, tmp_path / "w", "--config.batch_size=64",
                  "--config.eval.batch_size=64")
  assert_one_error_line(proc, "64")


@pytest.mark.parametrize("mode", ["pretrain", "knn_eval", "linear_eval"])
def test_workdir_that_is_a_file_fails_first_in_every_mode(tmp_path, image_folder, mode):
  workdir = tmp_path / "a_file"
  workdir.write_text("")
  # A missing data folder too: the workdir check comes first, before any data or model.
  proc = run_main(tmp_path / "nowhere", workdir, f"--mode={mode}")
  assert_one_error_line(proc, "--workdir", str(workdir), "is a file")


def test_workdir_that_cannot_be_created_names_it(tmp_path, image_folder):
  # A directory under a file: no chmod, which does not stop root (tests may run as root).
  (tmp_path / "a_file").write_text("")
  workdir = tmp_path / "a_file" / "run"
  proc = run_main(tmp_path / "nowhere", workdir)
  assert_one_error_line(proc, "--workdir", str(workdir), "cannot be created")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a chmod 555 directory")
def test_workdir_that_is_not_writable(tmp_path, image_folder):
  workdir = tmp_path / "ro"
  workdir.mkdir()
  workdir.chmod(0o555)
  proc = run_main(image_folder, workdir)
  assert_one_error_line(proc, "--workdir", "not writable")


def test_traceback_goes_to_error_log_and_to_the_log_at_verbosity_1(tmp_path):
  workdir = tmp_path / "w"
  proc = run_main(tmp_path / "nowhere", workdir)
  assert_one_error_line(proc)
  assert "Traceback" in (workdir / "error.log").read_text()
  verbose = run_main(tmp_path / "nowhere", tmp_path / "w2", "--verbosity=1")
  assert verbose.returncode == 1 and "Traceback" in verbose.stderr
  assert sum(l.startswith("error:") for l in verbose.stderr.splitlines()) == 1


@pytest.mark.parametrize("flag, key, closest", [
    ("--config.nonexistent=1", "config.nonexistent", None),
    # The kNN keys live in their section config.eval.knn now.
    ("--config.eval.knn_kk=5", "config.eval.knn_kk", "config.eval.knn.k"),
    ("--config.evall.knn_k=5", "config.evall.knn_k", "config.eval.knn.k"),
    ("--config.eval.knn.kk=5", "config.eval.knn.kk", "config.eval.knn.k"),
    ("--config.eval.online_probe.every_epoch=2", "config.eval.online_probe.every_epoch",
     "config.eval.online_probe.every_epochs"),
])
def test_unknown_config_key_names_the_closest_keys(tmp_path, image_folder, flag, key,
                                                   closest):
  proc = run_main(image_folder, tmp_path / "w", flag)
  line = assert_one_error_line(proc, key, "closest")
  if closest:
    assert closest in line
  assert not (tmp_path / "w").exists()  # refused before anything ran


def test_eval_split_missing_fails_before_any_training(tmp_path):
  """kNN monitor on, no test/ split: fails at once, no checkpoint, no training step."""
  folder = make_image_folder(tmp_path / "data", splits=("train",))
  workdir = tmp_path / "w"
  # The flag of earlier versions: main.py moves it to --config.eval.knn.every_epochs.
  proc = run_main(folder, workdir, "--config.eval.knn_every_epochs=1",
                  "--config.max_steps=4", "--config.checkpoint_every_steps=1")
  assert_one_error_line(proc, "no split 'test'")
  assert not (workdir / "checkpoints").exists() and committed_steps(str(workdir)) == []
  assert "pretrain step" not in proc.stderr  # no progress line: no step ran


@pytest.mark.parametrize("mode", ["knn_eval", "linear_eval"])
def test_eval_modes_open_their_splits_before_the_model(tmp_path, mode):
  """No pretraining in the workdir either: the split error comes first."""
  folder = make_image_folder(tmp_path / "data", splits=("train",))
  workdir = tmp_path / "w"
  workdir.mkdir()
  proc = run_main(folder, workdir, f"--mode={mode}")
  assert_one_error_line(proc, "no split 'test'")


@pytest.mark.parametrize("content", [b"", b"\xff\xd8\xff\xe0 truncated", os.urandom(3000)],
                         ids=["zero_bytes", "truncated", "random_bytes"])
def test_an_unreadable_image_ends_the_process_right_after_its_error_line(
    tmp_path, content):
  """The error line names the image, and the process ends at once: tf.data's and
  orbax's background threads must not hold it at interpreter shutdown."""
  import time  # pylint: disable=g-import-not-at-top
  folder = make_image_folder(tmp_path / "data")
  bad = folder / "train" / "cat" / "bad.jpg"
  bad.write_bytes(content)
  proc = subprocess.Popen(main_command(folder, tmp_path / "w"), stderr=subprocess.PIPE,
                          stdout=subprocess.DEVNULL, text=True)
  lines, error_at = [], None
  for line in proc.stderr:
    lines.append(line)
    if line.startswith("error:"):
      error_at = time.monotonic()
  try:
    returncode = proc.wait(timeout=60)
  except subprocess.TimeoutExpired:
    proc.kill()
    pytest.fail("the process was still running 60 s after closing stderr")
  assert error_at is not None, "".join(lines[-20:])
  assert returncode == 1 and "bad.jpg" in lines[-1], "".join(lines[-5:])
  # Exiting takes no teardown of background threads (it took 14 s and more under load,
  # or never ended, before).
  assert time.monotonic() - error_at < 5.0


FLAG_ERRORS = """
import contextlib, io, json, sys
sys.argv = sys.argv[:1]
import main
from absl import flags
lines = []
for argv in json.loads(sys.stdin.read()):
  err = io.StringIO()
  # As main.py's __main__ block: config_flags reads the overrides from sys.argv.
  sys.argv = main.command_line.record_config_flag(["main.py", *argv],
                                                  main.RECORD_CONFIG_FILE)
  with contextlib.redirect_stderr(err):
    try:
      main._parse_flags(sys.argv)
      status = 0
    except SystemExit as e:
      status = e.code
  flags.FLAGS.unparse_flags()
  lines.append([status, err.getvalue()])
print(json.dumps(lines))
"""


def test_flag_errors_are_one_line_in_the_programs_form(tmp_path):
  """absl's two-line form (and a config file's FATAL block with its traceback) become
  one `error:` line naming the value."""
  import json  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  workdir = f"--workdir={tmp_path}"
  cases = [
      (["--config=configs/imagenet1k.py:semi5", workdir],
       "the config file argument 'semi5' is not known: accepted 'semi1' or 'semi10'"),
      ([f"--config={tmp_path}/config.json", workdir],
       f"--config={tmp_path}/config.json: no such file (pretraining writes "
       "<workdir>/config.json when it starts)"),
      (["--config=configs/cifar10.py", workdir, "--mode=bogus"],
       "flag --mode=bogus: value should be one of <pretrain|"),
      (["--config=configs/cifar10.py"], "--workdir must have a value"),
      (["--config=configs/cifar10.py", workdir, "--config.batch_size=abc"],
       "flag --config.batch_size=abc: invalid literal for int()"),
  ]
  proc = subprocess.run([sys.executable, "-c", FLAG_ERRORS],
                        input=json.dumps([argv for argv, _ in cases]), cwd=root,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  for (status, stderr), (argv, said) in zip(json.loads(proc.stdout.splitlines()[-1]),
                                            cases):
    assert status == 1, (argv, stderr)
    assert stderr.count("\n") == 1 and stderr.startswith("error: "), (argv, stderr)
    assert said in stderr, (argv, stderr)


def test_import_of_weights_that_do_not_fit_is_one_error_line(tmp_path, image_folder):
  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  from torch_layout import torchvision_resnet  # pylint: disable=g-import-not-at-top
  path = tmp_path / "imagenet_stem.safetensors"
  safetensors.numpy.save_file(
      torchvision_resnet("resnet18", width=4, cifar_stem=False, classes=10), str(path))
  proc = run_main(image_folder, tmp_path / "w", "--mode=import", f"--weights={path}")
  assert_one_error_line(proc, "does not fit config.model", "conv1.weight is 7x7",
                        "set config.model.cifar_stem=False")
  assert not os.path.exists(tmp_path / "w" / "checkpoints")


def test_every_mode_reads_the_workdirs_config_json(tmp_path, pretrained_workdir):
  """Pretraining's overrides are recorded in config.json, and --config=<workdir>/config.json
  gives them all to another mode, --config.<key> on top: no override repeated."""
  import json  # pylint: disable=g-import-not-at-top
  import shutil  # pylint: disable=g-import-not-at-top
  # The pretraining of conftest.tiny_config: a dozen keys away from configs/default.py.
  workdir = tmp_path / "w"
  workdir.mkdir()
  os.symlink(pretrained_workdir / "checkpoints", workdir / "checkpoints")
  shutil.copy(pretrained_workdir / "config.json", workdir / "config.json")
  recorded = json.loads((workdir / "config.json").read_text())
  assert (recorded["image_size"], recorded["model"]["width"]) == (16, 4)
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, "main.py"), f"--config={workdir}/config.json",
       f"--workdir={workdir}", "--mode=knn_eval", "--config.eval.knn.k=(5,)"],
      capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads((workdir / "knn_eval.json").read_text())
  assert (result["step"], result["k"], result["dataset"]) == (4, 5, recorded["dataset"])
  # Read whole: the bank is the whole train split of the recorded folder.
  assert result["num_bank_examples"] == 24
