"""Data sources: one split of a TFDS data set or an image folder, checked when opened.

`get_source` reads a data set string and opens the split as one of three kinds of
`Source` (base.py): an image folder (folder.py), a TFDS split prepared as ArrayRecord,
read by index (tfds_random_access.py), or a TFDS split in another format, streamed
(tfds_streamed.py); tfds_common.py holds what the TFDS ones share. Opening a source
checks that the data is there and readable in outline; a missing directory, split or
data set fails here with a message that says what does exist.

TensorFlow is imported here, in `pipeline` and in `crops` only; importing this package
hides the GPUs and TPUs from it (`tensorflow_setup.hide_accelerators_from_tensorflow`).
"""
from absl import logging
import tensorflow_datasets as tfds

# pylint: disable=unused-import
from corinfomax_jax.data.sources import tfds_common
from corinfomax_jax.data.sources.base import RandomAccessSource
from corinfomax_jax.data.sources.base import Source
from corinfomax_jax.data.sources.base import StreamedSource
from corinfomax_jax.data.sources.base import Subset
from corinfomax_jax.data.sources.base import as_written
from corinfomax_jax.data.sources.base import decode_image
from corinfomax_jax.data.sources.base import op_message
from corinfomax_jax.data.sources.folder import IMAGE_EXTENSIONS
from corinfomax_jax.data.sources.folder import FolderSource
from corinfomax_jax.data.sources.folder import open_folder
from corinfomax_jax.data.sources.tfds_common import DOWNLOADED_ON_FIRST_USE
from corinfomax_jax.data.sources.tfds_common import IMAGENET100_CLASSES_FILE
from corinfomax_jax.data.sources.tfds_common import imagenet100_classes
from corinfomax_jax.data.sources.tfds_random_access import TfdsRandomAccessSource
from corinfomax_jax.data.sources.tfds_streamed import TfdsStreamedSource


def get_source(dataset: str, data_dir: str | None, split: str,
               skip_bad_images: bool = False,
               random_access: bool | None = None) -> Source:
  """The `split` of `dataset`, checked at once (missing data fails here).

  Args:
    dataset: "folder:<root>" for root/<split>/<class>/<image> (.jpg, .jpeg,
      .png; labels from sorted class names); "imagenet100" for the 100 CMC
      classes of TFDS imagenet2012 (labels in sorted-wnid order); or any TFDS
      name ("cifar10", "imagenet2012", "name:version", ...).
    data_dir: TFDS data_dir (None: TFDS's default); unused for folders.
    split: split name ("train", "test", "validation"; TFDS slicing allowed).
    skip_bad_images: an unreadable image is logged, counted in
      `Source.skipped` and replaced by the next readable example (masked out
      of eval batches) instead of raising an error naming the file.
    random_access: TFDS only. None: use `tfds.data_source` when the data is
      ArrayRecord, else stream with a warning; False: always stream.
  """
  if dataset.startswith("folder:"):
    return open_folder(dataset, dataset[len("folder:"):], split, skip_bad_images)
  if dataset == "imagenet100":
    return _open_tfds(dataset, "imagenet2012", data_dir, split, skip_bad_images,
                      random_access, subset=imagenet100_classes())
  return _open_tfds(dataset, dataset, data_dir, split, skip_bad_images, random_access)


def _open_tfds(dataset, tfds_name, data_dir, split, skip_bad_images, random_access,
               subset=None) -> Source:
  """A TFDS split, by index where it is ArrayRecord (and `random_access` allows)."""
  builder = tfds_common.open_builder(dataset, tfds_name, data_dir)
  features = builder.info.features
  image_keys = [k for k, f in features.items()
                if isinstance(f, tfds.features.Image)]
  image_key = "image" if "image" in image_keys else (image_keys or [None])[0]
  label = features["label"] if "label" in features.keys() else None
  if image_key is None or not isinstance(label, tfds.features.ClassLabel):
    raise ValueError(f"TFDS {tfds_name!r} needs an Image feature and a "
                     f"ClassLabel 'label'; it has {dict(features.items())}.")
  if builder.info.splits and tfds_common.base_split(split) not in builder.info.splits:
    raise ValueError(f"TFDS {tfds_name!r} has no split {split!r}; splits: "
                     f"{list(builder.info.splits)}.")
  decoders = {image_key: tfds.decode.SkipDecoding()}
  classes = tfds_common.classes_of(tfds_name, label, subset)
  if random_access is not False:
    try:
      data_source = builder.as_data_source(split=split, decoders=decoders)
    except NotImplementedError as e:
      if not builder.is_prepared():
        raise tfds_common.not_prepared(dataset, builder, split, e) from None
      logging.warning(
          "%s is not prepared as ArrayRecord (%s); streaming it instead. The "
          "streamed data order depends on the process count and resuming "
          "skips through the stream.", tfds_name, builder.info.file_format)
    except Exception as e:  # pylint: disable=broad-except
      raise tfds_common.not_prepared(dataset, builder, split, e) from None
    else:
      return TfdsRandomAccessSource(
          name=dataset, split=split, builder=builder, data_source=data_source,
          image_key=image_key, classes=classes, skip_bad_images=skip_bad_images)
  return TfdsStreamedSource(name=dataset, split=split, builder=builder, decoders=decoders,
                            image_key=image_key, classes=classes,
                            skip_bad_images=skip_bad_images)
