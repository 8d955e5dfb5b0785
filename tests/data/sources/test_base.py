"""sources.base: TensorFlow kept off the accelerators, JPEGs decoded to PIL's pixels,
subsets of a source by index."""
import io
import pathlib
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from corinfomax_jax import tensorflow_setup
from corinfomax_jax.data import sources

ROOT = pathlib.Path(__file__).resolve().parents[3]
MAKE_JPEGS = ROOT.parent / "shared" / "tools" / "make_imagenet_sized_jpegs.py"


class _RecordingTfConfig:
  """A stand-in for tf.config with a GPU and a TPU, recording what is hidden."""

  def __init__(self, devices=("GPU", "TPU"), initialised=False):
    self.visible = {kind: [f"/physical_device:{kind}:0"] for kind in devices}
    self.initialised = initialised
    self.calls = []

  def list_physical_devices(self, kind):
    return list(self.visible.get(kind, []))

  def get_visible_devices(self, kind):
    return list(self.visible.get(kind, []))

  def set_visible_devices(self, devices, kind):
    self.calls.append((list(devices), kind))
    if self.initialised:
      raise RuntimeError("Visible devices cannot be modified after being initialized")
    self.visible[kind] = list(devices)


def test_helper_hides_gpus_and_tpus():
  config = _RecordingTfConfig()
  tensorflow_setup.hide_accelerators_from_tensorflow(config)
  assert config.calls == [([], "GPU"), ([], "TPU")]
  assert config.visible == {"GPU": [], "TPU": []}
  tensorflow_setup.hide_accelerators_from_tensorflow(config)  # already hidden: no second call
  assert len(config.calls) == 2


def test_helper_leaves_absent_kinds_alone_and_survives_initialised_tf(caplog):
  config = _RecordingTfConfig(devices=("GPU",), initialised=True)
  tensorflow_setup.hide_accelerators_from_tensorflow(config)
  assert config.calls == [([], "GPU")]  # no TPU listed: not touched
  assert config.visible["GPU"]  # too late, and said so
  assert "GPU devices" in caplog.text


def test_importing_the_pipeline_leaves_tensorflow_no_gpu():
  code = ("import corinfomax_jax.data.pipeline, tensorflow as tf; "
          "assert tf.config.get_visible_devices('GPU') == [], "
          "tf.config.get_visible_devices('GPU')")
  subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


@pytest.fixture(scope="session")
def imagenet_sized_jpegs(tmp_path_factory):
  """12 photograph-like JPEGs at ImageNet's sizes (quality 90, 4:2:0), sorted paths."""
  if not MAKE_JPEGS.exists():
    pytest.skip(f"{MAKE_JPEGS} not found")
  out = tmp_path_factory.mktemp("imagenet_sized")
  subprocess.run([sys.executable, str(MAKE_JPEGS), str(out), "--n", "12"], check=True,
                 capture_output=True)
  paths = sorted(out.glob("train/*/*.jpg"))
  assert len(paths) == 12
  return paths


def _pil_rgb(data: bytes) -> np.ndarray:
  """The reference's loader: Image.open(f).convert("RGB")."""
  return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _encoded(image: Image.Image, fmt: str, **options) -> bytes:
  out = io.BytesIO()
  image.save(out, fmt, **options)
  return out.getvalue()


def _without_adobe_marker(jpeg: bytes) -> bytes:
  """The JPEG less its APP14 (Adobe) segment: a CMYK file PIL reads as not inverted."""
  at = jpeg.index(b"\xff\xee")
  return jpeg[:at] + jpeg[at + 2 + int.from_bytes(jpeg[at + 2:at + 4], "big"):]


def test_real_jpegs_decode_to_pils_pixels_where_tf_decode_image_does_not(
    imagenet_sized_jpegs):
  paths = [str(p) for p in imagenet_sized_jpegs]
  # As the pipeline decodes: inside tf.data, from the file.
  decoded = tf.data.Dataset.from_tensor_slices(paths).map(
      lambda p: sources.decode_image(tf.io.read_file(p)))
  fast_idct_off = []
  for path, image in zip(paths, decoded.as_numpy_iterator()):
    with open(path, "rb") as f:
      data = f.read()
    want = _pil_rgb(data)
    assert image.dtype == np.uint8 and np.array_equal(image, want), path
    plain = tf.io.decode_image(data, channels=3, expand_animations=False).numpy()
    fast_idct_off.append(int(np.abs(plain.astype(int) - want).max()))
  # libjpeg's fast IDCT (tf.io.decode_image's) is off somewhere in every file.
  assert min(fast_idct_off) >= 1, fast_idct_off


def test_grayscale_and_cmyk_jpegs_and_pngs_decode_to_pils_pixels():
  rng = np.random.default_rng(0)
  rgb = rng.integers(0, 256, (37, 29, 3), np.uint8)
  cmyk = _encoded(Image.fromarray(rng.integers(0, 256, (37, 29, 4), np.uint8), "CMYK"),
                  "JPEG", quality=95)
  cases = {
      "grayscale JPEG": _encoded(Image.fromarray(rgb[..., 0]), "JPEG", quality=90),
      "progressive 4:4:4 JPEG": _encoded(Image.fromarray(rgb), "JPEG", quality=90,
                                         subsampling=0, progressive=True),
      "CMYK JPEG (Adobe marker, inverted)": cmyk,
      "CMYK JPEG without the Adobe marker": _without_adobe_marker(cmyk),
      "RGB PNG": _encoded(Image.fromarray(rgb), "PNG"),
      "palette PNG": _encoded(Image.fromarray(rgb).convert("P"), "PNG"),
  }
  for name, data in cases.items():
    image = sources.decode_image(tf.constant(data)).numpy()
    assert image.dtype == np.uint8 and np.array_equal(image, _pil_rgb(data)), name
  assert Image.open(io.BytesIO(cmyk)).mode == "CMYK"
  for name in ("CMYK JPEG (Adobe marker, inverted)", "CMYK JPEG without the Adobe marker"):
    # TensorFlow's own CMYK -> RGB is not PIL's: what the detour through PIL is for.
    tf_rgb = tf.io.decode_jpeg(cases[name], channels=3,
                               dct_method="INTEGER_ACCURATE").numpy()
    assert not np.array_equal(tf_rgb, _pil_rgb(cases[name])), name


def test_unreadable_jpeg_bytes_raise_a_tensorflow_error():
  cmyk = _encoded(Image.new("CMYK", (16, 16), (1, 2, 3, 4)), "JPEG")
  for data in (b"\xff\xd8\xff junk after a JPEG's magic", cmyk[:200], b"not an image"):
    with pytest.raises(tf.errors.InvalidArgumentError):
      sources.decode_image(tf.constant(data))


def test_a_subset_reads_describes_and_names_the_examples_of_its_index(tmp_path):
  for label in ("a", "b"):
    for i in range(3):
      path = tmp_path / "train" / label / f"{i}.png"
      path.parent.mkdir(parents=True, exist_ok=True)
      Image.fromarray(np.full((4, 4, 3), 40 * i, np.uint8)).save(path)
  source = sources.get_source(f"folder:{tmp_path}", None, "train", skip_bad_images=True)
  index = np.array([4, 0, 5], np.int64)
  subset = source.subset(index)
  assert (subset.num_examples, subset.class_names, subset.random_access) == (
      3, ("a", "b"), True)
  assert [subset.describe(i) for i in range(3)] == [source.describe(i) for i in index]
  assert subset.file_names() == ["1.png", "0.png", "2.png"]
  assert subset.paths() == ["train/b/1.png", "train/a/0.png", "train/b/2.png"]
  _, labels = subset.load_batch(tf.constant([0, 1, 2], tf.int64))
  assert labels.numpy().tolist() == [1, 0, 1]
  again = subset.subset(np.array([2, 0], np.int64))  # a subset of a subset
  assert [again.describe(i) for i in range(2)] == [source.describe(5), source.describe(4)]
  subset.mark_bad(1, "broken")  # the subset's own list; the source's stays empty
  assert subset.skipped == [source.describe(0)] and source.skipped == []
  indices, mask = subset.substitute(tf.constant([0, 1, 2], tf.int64), tf.ones([3]))
  assert indices.numpy().tolist() == [0, 2, 2] and mask.numpy().tolist() == [1, 0, 1]
