"""Tests for corinfomax_jax.interop.torch_files: torch.save files read without torch."""
import io
import os
import pickle
import zipfile

import numpy as np
import pytest
from torch_layout import save_torch_file

from corinfomax_jax.interop import torch_files

FIXTURE = os.path.join(os.path.dirname(__file__), "data", "tiny_torch_checkpoint.pth")


def test_reads_the_file_torch_2_13_wrote():
  tree = torch_files.read_torch_file(FIXTURE)
  assert tree["epoch"] == 3 and tree["note"] == "fixture"
  sd = tree["model_state_dict"]
  assert list(sd) == [f"module.backbone.{k}" for k in (
      "conv1.weight", "bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var",
      "bn1.num_batches_tracked")] + ["module.projector.0.weight"]
  conv = sd["module.backbone.conv1.weight"]
  assert conv.dtype == np.float32 and conv.shape == (4, 3, 3, 3)
  np.testing.assert_array_equal(
      conv, (np.arange(108, dtype=np.float32) / np.float32(7)).reshape(4, 3, 3, 3))
  np.testing.assert_array_equal(sd["module.backbone.bn1.weight"], [1.5, -2.0, 0.25, 3.0])
  np.testing.assert_array_equal(sd["module.backbone.bn1.running_var"], [0.5, 1, 2, 4])
  tracked = sd["module.backbone.bn1.num_batches_tracked"]
  assert tracked.shape == () and tracked.dtype == np.int64 and int(tracked) == 7

  extras = tree["extras"]
  # A transposed view: storage order is not the array's order.
  np.testing.assert_array_equal(extras["transposed"],
                                np.arange(12, dtype=np.float32).reshape(3, 4).T)
  assert extras["transposed"].flags.c_contiguous
  # Two tensors of one storage, the second at an offset.
  np.testing.assert_array_equal(extras["shared"], np.arange(10))
  np.testing.assert_array_equal(extras["shared_tail"], np.arange(4, 10))
  assert extras["half"].dtype == np.float16
  np.testing.assert_array_equal(extras["half"], np.array([0.5, -1.25, 65504], np.float16))
  bf16 = extras["bfloat16"]
  assert bf16.dtype == np.float32
  # bfloat16 keeps float32's upper 16 bits: exact for 1 and -3.5, 1e30 rounded.
  np.testing.assert_array_equal(bf16[:2], [1.0, -3.5])
  assert (bf16[2:].view(np.uint32) & 0xFFFF) == 0 and abs(bf16[2] / 1e30 - 1) < 2 ** -8
  np.testing.assert_array_equal(extras["parameter"], [0.75, 0.75])
  assert extras["long"].dtype == np.int64 and int(extras["long"]) == -5
  # A Module's state_dict pickles its _metadata as the OrderedDict's attribute.
  assert list(extras["module_state_dict"]) == ["conv1.weight", "bn1.weight", "bn1.bias",
                                               "bn1.running_mean", "bn1.running_var",
                                               "bn1.num_batches_tracked"]


def test_the_test_writer_matches_the_reader(tmp_path):
  rng = np.random.default_rng(0)
  tree = {"epoch": 9, "state_dict": {"w": rng.normal(size=(3, 2, 5)).astype(np.float32),
                                     "n": np.array(12, np.int64),
                                     "h": rng.normal(size=(4,)).astype(np.float16)}}
  save_torch_file(tree, tmp_path / "t.pth")
  back = torch_files.read_torch_file(tmp_path / "t.pth")
  assert back["epoch"] == 9 and list(back["state_dict"]) == ["w", "n", "h"]
  for key, value in tree["state_dict"].items():
    got = back["state_dict"][key]
    assert got.dtype == value.dtype and got.shape == value.shape
    assert got.tobytes() == value.tobytes()


def test_a_pickle_that_names_code_is_refused(tmp_path):
  path = tmp_path / "evil.pth"
  with zipfile.ZipFile(path, "w") as archive:
    archive.writestr("evil/data.pkl", pickle.dumps({"x": os.getcwd}, protocol=2))
  with pytest.raises(ValueError, match=r"names posix\.getcwd.*state_dict alone") as e:
    torch_files.read_torch_file(path)
  assert "\n" not in str(e.value)


def test_a_legacy_or_foreign_file_is_refused_in_one_line(tmp_path):
  legacy = tmp_path / "legacy.pth"
  legacy.write_bytes(pickle.dumps(0x1950a86a20f9469cfc6c, protocol=2))  # torch < 1.6 magic
  with pytest.raises(ValueError, match="legacy format"):
    torch_files.read_torch_file(legacy)
  other = tmp_path / "other.pth"
  buffer = io.BytesIO()
  with zipfile.ZipFile(buffer, "w") as archive:
    archive.writestr("readme.txt", "hello")
  other.write_bytes(buffer.getvalue())
  with pytest.raises(ValueError, match="0 data.pkl entries"):
    torch_files.read_torch_file(other)
