"""The host pipeline: sources -> per-process batches of views -> global jax.Arrays.

The data order is a pure function of (seed, global step), whatever the number of
processes: epoch e = step // steps_per_epoch visits the examples in a stateless
permutation drawn from (seed, e) (remainder dropped); global step s takes rows
[(s % spe) * B, (s % spe + 1) * B) of it, and process p of P the contiguous
slice [p * B / P, (p + 1) * B / P) of those rows. Augmentation draws come from
stateless TF random ops seeded by (seed, step, view) and indexed by the row in
the global batch, so every example looks the same whatever the process count,
and resuming is starting at a global step.

Random access needs an indexable source (`sources`). A TFDS data set in another
format is streamed instead (`tfds.even_splits` per process, seeded shuffle, skip
to resume); that order depends on the process count.

Each pipeline takes a `BatchSpec` (sizes, seed, this process's share) and the views of
the run's resolved recipe (`recipe.views`); it resolves nothing itself.
"""
import atexit
import collections
import dataclasses
import math
import weakref
from typing import Any, Iterable, Iterator, Mapping

import numpy as np
import tensorflow as tf

from corinfomax_jax.data import augment
from corinfomax_jax.data import crops
from corinfomax_jax.data import recipe as recipe_lib
from corinfomax_jax import mesh as mesh_lib
from corinfomax_jax.errors import ConfigError
from corinfomax_jax.data.sources import Source
from corinfomax_jax.data.sources import as_written
from corinfomax_jax.data.sources import decode_image

# Tags folded into the seed so that data order and augmentation never share
# random numbers.
_ORDER_TAG, _AUG_TAG = 1, 2
# View ids folded into the augmentation seed.
_VIEW_IDS = {"view1": 1, "view2": 2, "probe": 3}
_SHUFFLE_BUFFER = 10_000  # examples; the streaming fallback's shuffle
_NUM_DRAWS = crops.HOST_DRAWS + augment.NUM_DRAWS


# ----------------------------------------------------------------- data order


def _fold(seed: int, *data) -> tf.Tensor:
  """A stateless seed (shape [2]) from an integer seed and integer data."""
  key = tf.constant([seed, 0], tf.int64)
  for d in data:
    key = tf.random.experimental.stateless_fold_in(key, tf.cast(d, tf.int64))
  return key


def steps_per_epoch(num_examples: int, global_batch_size: int) -> int:
  """Full global batches per epoch (the remainder is dropped)."""
  steps = num_examples // global_batch_size
  if steps == 0:
    raise ValueError(f"Global batch size {global_batch_size} exceeds the "
                     f"{num_examples} examples of the split.")
  return steps


def eval_steps(num_examples: int, global_batch_size: int) -> int:
  """Global batches of one padded pass (`eval_batches`)."""
  return -(-num_examples // global_batch_size)


def _shuffled(positions, num_examples: int, seed: int, epoch):
  return tf.random.experimental.index_shuffle(
      positions, _fold(seed, _ORDER_TAG, epoch),
      tf.constant(num_examples - 1, tf.int64))


def _train_order(num_examples: int, global_batch_size: int, seed: int):
  spe = steps_per_epoch(num_examples, global_batch_size)

  def order(step, rows):
    positions = (step % spe) * global_batch_size + rows
    indices = _shuffled(positions, num_examples, seed, step // spe)
    return indices, tf.ones(tf.shape(rows), tf.float32)
  return order


def _eval_order(num_examples: int, global_batch_size: int, seed: int | None,
                epoch: int):
  first_step = epoch * eval_steps(num_examples, global_batch_size)

  def order(step, rows):
    positions = (step - first_step) * global_batch_size + rows
    mask = tf.cast(positions < num_examples, tf.float32)
    positions = tf.minimum(positions, num_examples - 1)  # padding rows
    if seed is not None:
      positions = _shuffled(positions, num_examples, seed, epoch)
    return positions, mask
  return order


def batch_indices(num_examples: int, global_batch_size: int, seed: int,
                  step: int) -> np.ndarray:
  """Example indices [global_batch_size] of global step `step` (pretraining
  and probe training order)."""
  order = _train_order(num_examples, global_batch_size, seed)
  indices, _ = order(tf.constant(step, tf.int64),
                     tf.range(global_batch_size, dtype=tf.int64))
  return indices.numpy()


# ------------------------------------------------------------------ pipelines


@dataclasses.dataclass(frozen=True)
class BatchSpec:
  """What every pipeline's batches are: sizes, seed and this process's share.

  Attributes:
    global_batch_size: rows of a global batch, over all processes.
    image_size: S, the side of each square crop.
    seed: the data order's and the augmentation's seed.
    process_index, process_count: this process's slice of each global batch
      (None: jax's).
    num_threads: caps tf.data's threads (None: tf.data's default).
  """
  global_batch_size: int
  image_size: int
  seed: int = 0
  process_index: int | None = None
  process_count: int | None = None
  num_threads: int | None = None


@dataclasses.dataclass(frozen=True)
class RandomCrop:
  """torchvision's RandomResizedCrop to size x size."""
  scale: tuple[float, float]
  ratio: tuple[float, float]
  size: int
  interpolation: str = "bicubic"  # a key of crops.INTERPOLATIONS


@dataclasses.dataclass(frozen=True)
class CenterCrop:
  """Shorter side to int(size * resize_ratio), then the centre size x size."""
  resize_ratio: float
  size: int
  interpolation: str = "bicubic"  # a key of crops.INTERPOLATIONS


@dataclasses.dataclass(frozen=True)
class View:
  """One output image of a pipeline; hashable, so compiled functions are cached by it."""
  key: str  # output key
  view_id: int | None  # folded into the augmentation seed; None: no draws
  crop: RandomCrop | CenterCrop
  recipe: recipe_lib.ViewSettings | None = None  # the two-view recipe after the crop
  flip_p: float = 0.0  # a flip only (the probe's view); ignored when `recipe` is set


def _crop(image, u, crop, flip_p):
  """A view's host part: the random crop and flip, or the deterministic centre crop."""
  if isinstance(crop, RandomCrop):
    return crops.random_resized_crop(image, u[:crops.HOST_DRAWS], crop.size, crop.scale,
                                     crop.ratio, flip_p, crop.interpolation)
  return crops.resize_center_crop(image, crop.size, crop.resize_ratio, crop.interpolation)


def _flip_p(view: View) -> float:
  return view.recipe.flip_p if view.recipe is not None else view.flip_p


def draws_key(view_key: str) -> str:
  """The batch key of a view's device draws: "view1" -> "view1_draws"."""
  return f"{view_key}_draws"


def view_draws(seed: tf.Tensor, rows: tf.Tensor, global_batch_size: int) -> tf.Tensor:
  """Uniform draws [len(rows), HOST_DRAWS + augment.NUM_DRAWS] of rows of a global batch.

  `seed` is a stateless seed (shape [2]) specific to (step, view); a row's draws do not
  depend on which process asks for it. The first crops.HOST_DRAWS columns crop and flip
  on the host, the rest travel with the batch to the device ops of `augment`.
  """
  u = tf.random.stateless_uniform([global_batch_size, _NUM_DRAWS], seed=seed)
  return tf.gather(u, rows)


def _process_slice(spec: BatchSpec) -> tuple[int, int, int]:
  """(process index, process count, rows per process) of `spec`."""
  process_index, process_count = spec.process_index, spec.process_count
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index = (jax.process_index() if process_index is None
                     else process_index)
    process_count = (jax.process_count() if process_count is None
                     else process_count)
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} is not in "
                     f"[0, {process_count}).")
  mesh_lib.check_batch_divides(spec.global_batch_size, 1, process_count)
  return process_index, process_count, spec.global_batch_size // process_count


def _options(num_threads: int | None) -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True
  if num_threads:
    options.threading.private_threadpool_size = num_threads
    options.threading.max_intra_op_parallelism = 1
  return options


def _add_draws(element, views, seed, global_batch_size, rows):
  for v in views:
    if v.view_id is not None:
      element["u_" + v.key] = view_draws(
          _fold(seed, _AUG_TAG, element["step"], v.view_id), rows, global_batch_size)
  return element


def _without_step(element):
  return {k: v for k, v in element.items() if k != "step"}


def _examples_to_batches(ds, source, views, local_batch):
  """Unbatched step elements -> decoded once, cropped and flipped per view, uint8."""

  # Two or more random crops of one image (the two views) go to the host in one call.
  together = [v for v in views if isinstance(v.crop, RandomCrop)]
  together = together if len(together) > 1 else []

  def per_example(ex):
    image = decode_image(source.load_example(ex["data"]))
    out = dict(label=ex["label"], mask=ex["mask"])
    if together:
      specs = tuple((v.crop.size, v.crop.scale, v.crop.ratio, _flip_p(v),
                     v.crop.interpolation) for v in together)
      draws = [ex["u_" + v.key][:crops.HOST_DRAWS] for v in together]
      out.update(zip([v.key for v in together],
                     crops.random_resized_crops(image, draws, specs)))
    for v in views:
      u = ex.get("u_" + v.key)
      if v not in together:
        out[v.key] = _crop(image, u, v.crop, _flip_p(v))
      if v.recipe is not None:
        out[draws_key(v.key)] = u[crops.HOST_DRAWS:]
    return out

  ds = ds.unbatch().map(as_written(per_example), num_parallel_calls=tf.data.AUTOTUNE)
  return ds.batch(local_batch, drop_remainder=True)


_LIVE_ITERATORS = weakref.WeakSet()


@atexit.register
def _close_live_iterators():
  # A tf.data iterator still running Python (tf.numpy_function) at interpreter
  # exit deadlocks the exit; close them first.
  for batches in list(_LIVE_ITERATORS):
    batches.close()


class _Batches:
  """Iterator of per-process numpy batches that names unreadable images.

  On a decode error it finds the bad file among the current step's examples;
  then it raises naming it, or (skip_bad_images) logs and counts it and
  rebuilds the pipeline from the same step with the file replaced.
  """

  def __init__(self, build, source, start_step, indices_for_step, keys):
    self._build = build
    self._source = source
    self._step = start_step
    self._indices_for_step = indices_for_step
    self._keys = keys
    self._it = None
    _LIVE_ITERATORS.add(self)

  def close(self) -> None:
    """Stops the background pipeline; a later next() restarts at .step."""
    self._it = None

  @property
  def step(self) -> int:
    """The global step of the next batch."""
    return self._step

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    while True:
      if self._it is None:
        self._it = self._build(self._step).as_numpy_iterator()
      try:
        batch = next(self._it)
      except tf.errors.OpError as e:
        self._it = None
        self._recover(e)
        continue
      self._step += 1
      return {k: batch[k] for k in self._keys}

  def _recover(self, error):
    source = self._source
    if self._indices_for_step is None:
      raise ValueError(f"Reading {source.name} {source.split!r} (streamed) "
                       f"failed near step {self._step}: {error}") from error
    bad = []
    for i in sorted(set(self._indices_for_step(self._step).tolist())):
      reason = source.unreadable_reason(i)
      if reason is not None:
        bad.append((i, reason))
    if not bad:
      raise error
    if not source.skip_bad_images:
      i, reason = bad[0]
      raise ConfigError(
          f"Cannot read image {source.describe(i)}: {reason}. Fix or remove "
          "it, or set skip_bad_images to skip unreadable images (each is "
          "logged and counted).") from None
    for i, reason in bad:
      source.mark_bad(i, reason)


def _batches(source: Source, spec: BatchSpec, views: list[View], keys, *, order,
             start_step: int, first_step: int = 0, stop_step: int | None = None):
  """Global steps [first_step, stop_step) of `source` (stop_step None: endless; a finite
  range is one padded pass, for evaluation), read by index or streamed."""
  if source.random_access:
    return _random_access_batches(source, spec, views, keys, order, start_step, stop_step)
  return _streamed_batches(source, spec, views, keys, start_step, first_step, stop_step)


def _random_access_batches(source, spec: BatchSpec, views, keys, order, start_step,
                           stop_step):
  """Step s reads the examples `order(s, rows)` of this process's rows."""
  p, _, b = _process_slice(spec)
  rows = tf.range(p * b, (p + 1) * b, dtype=tf.int64)

  def step_element(step):
    indices, mask = order(step, rows)
    indices, mask = source.substitute(indices, mask)
    data, label = source.load_batch(indices)
    element = dict(step=step, data=data, label=label, mask=mask)
    return _add_draws(element, views, spec.seed, spec.global_batch_size, rows)

  def build(start):
    end = np.iinfo(np.int64).max if stop_step is None else stop_step
    ds = tf.data.Dataset.range(start, end)
    ds = ds.map(as_written(step_element), num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.map(as_written(_without_step))
    return _to_batches(ds, source, views, b, spec.num_threads)

  def indices_for_step(step):
    indices, mask = order(tf.constant(step, tf.int64), rows)
    return source.substitute(indices, mask)[0].numpy()

  return _Batches(build, source, start_step, indices_for_step, keys)


def _streamed_batches(source, spec: BatchSpec, views, keys, start_step, first_step,
                      stop_step):
  """This process's part of the stream: shuffled and endless, or one padded pass."""
  p, num_p, b = _process_slice(spec)
  rows = tf.range(p * b, (p + 1) * b, dtype=tf.int64)
  seed = spec.seed

  def build(start):
    if stop_step is not None:  # one pass, padded to the same step count
      local = source.stream(p, num_p, 0, False).map(as_written(
          lambda ex: dict(ex, mask=tf.constant(1.0))))
      pad = local.take(1).map(as_written(lambda ex: dict(ex, mask=tf.constant(0.0))))
      ds = local.concatenate(pad.repeat()).take((stop_step - first_step) * b)
    else:
      ds = source.stream(p, num_p, seed, True).repeat()
      ds = ds.shuffle(min(_SHUFFLE_BUFFER, source.num_examples), seed=seed)
      ds = ds.map(as_written(lambda ex: dict(ex, mask=tf.constant(1.0))))
    ds = ds.batch(b, drop_remainder=True).skip(start - first_step)
    ds = ds.enumerate(start).map(as_written(
        lambda step, e: _add_draws(dict(e, step=step), views, seed,
                                   spec.global_batch_size, rows)))
    ds = ds.map(as_written(_without_step))
    return _to_batches(ds, source, views, b, num_threads=spec.num_threads)

  return _Batches(build, source, start_step, None, keys)


def _to_batches(ds, source, views, local_batch, num_threads):
  ds = _examples_to_batches(ds, source, views, local_batch)
  return ds.prefetch(tf.data.AUTOTUNE).with_options(_options(num_threads))


def _views_or_paper(source: Source, views: recipe_lib.Views | None) -> recipe_lib.Views:
  """`views`, or the paper's recipe for `source`'s data set where None."""
  if views is None:
    views = recipe_lib.views(recipe_lib.default_aug_config(source.name))
  return views


def _random_crop(view: recipe_lib.ViewSettings, image_size: int,
                 interpolation: str = "bicubic") -> RandomCrop:
  return RandomCrop(view.crop_scale, view.crop_ratio, image_size, interpolation)


def pretrain_batches(source: Source, spec: BatchSpec,
                     views: recipe_lib.Views | None = None, *, start_step: int = 0
                     ) -> Iterator[dict[str, np.ndarray]]:
  """Endless two-view batches of this process, from global step `start_step`.

  Yields dict(view1=uint8 [b, S, S, 3], view1_draws=float32 [b, augment.NUM_DRAWS],
  view2=..., view2_draws=..., label=int32 [b]) with b = global_batch_size /
  process_count: each view cropped and flipped on the host as `views.view1` /
  `views.view2` say (`recipe.views` of the run's resolved recipe; None: the paper's for
  this data set), with the draws of the device ops that make the rest of it
  (`augment.view`). The iterator's `.step` is the global step of the next batch.
  """
  views = _views_or_paper(source, views)
  crops_ = [View(key, _VIEW_IDS[key], _random_crop(view, spec.image_size), recipe=view)
            for key, view in (("view1", views.view1), ("view2", views.view2))]
  return _batches(
      source, spec, crops_,
      ("view1", draws_key("view1"), "view2", draws_key("view2"), "label"),
      order=_train_order(source.num_examples, spec.global_batch_size, spec.seed),
      start_step=start_step)


def _probe_view(views: recipe_lib.Views, image_size, interpolation="bicubic"):
  crop = _random_crop(views.probe, image_size, interpolation)
  return View("image", _VIEW_IDS["probe"], crop, flip_p=views.probe.flip_p)


def probe_train_batches(source: Source, spec: BatchSpec,
                        views: recipe_lib.Views | None = None, *, start_step: int = 0,
                        interpolation: str = "bicubic"
                        ) -> Iterator[dict[str, np.ndarray]]:
  """Endless linear-probe training batches (random resized crop + flip, `views.probe`).

  Same order and resumption as `pretrain_batches`. Yields dict(image=uint8
  [b, S, S, 3], label=int32 [b]), to be normalised on the device
  (`augment.normalize_uint8`). interpolation: the crop's resize, a key of
  crops.INTERPOLATIONS.
  """
  views = _views_or_paper(source, views)
  return _batches(
      source, spec, [_probe_view(views, spec.image_size, interpolation)],
      ("image", "label"),
      order=_train_order(source.num_examples, spec.global_batch_size, spec.seed),
      start_step=start_step)


def eval_batches(source: Source, spec: BatchSpec, views: recipe_lib.Views | None = None,
                 *, train_augment: bool = False, epoch: int = 0,
                 interpolation: str = "bicubic") -> Iterator[dict[str, np.ndarray]]:
  """One pass over the whole split: `eval_steps(...)` batches.

  Yields dict(image=uint8 [b, S, S, 3], label=int32 [b], mask=float32 [b]);
  the last global batch is padded and mask is 1 on real rows, 0 on padding
  (and on images skipped as unreadable), so each example counts exactly once.
  train_augment=False: index order, resize to int(S * views.test_resize_ratio)
  (`interpolation`: bicubic, or bilinear as torchvision's default Resize) and centre
  crop. True: the probe training view (random resized crop + flip) in an order
  shuffled by (spec.seed, epoch), augmented by (spec.seed, step).
  """
  views = _views_or_paper(source, views)
  if train_augment:
    view = _probe_view(views, spec.image_size)
  else:
    view = View("image", None, CenterCrop(views.test_resize_ratio, spec.image_size,
                                          interpolation))
  num_steps = eval_steps(source.num_examples, spec.global_batch_size)
  epoch = epoch if train_augment else 0
  order = _eval_order(source.num_examples, spec.global_batch_size,
                      spec.seed if train_augment else None, epoch)
  # Epoch e is steps [e * num_steps, (e + 1) * num_steps) of its own stream,
  # so the augmentation differs between epochs.
  return _batches(source, spec, [view], ("image", "label", "mask"), order=order,
                  start_step=epoch * num_steps, first_step=epoch * num_steps,
                  stop_step=(epoch + 1) * num_steps)


# ------------------------------------------------------------------- devices


def global_batches(local_batches: Iterable[Mapping[str, np.ndarray]],
                   sharding, prefetch: int = 2) -> Iterator[dict[str, Any]]:
  """Per-process numpy batches -> global jax.Arrays, `prefetch` batches ahead.

  `sharding` (e.g. NamedSharding(mesh, P("data"))) splits the leading axis;
  each process's rows become its slice of the global batch.
  """
  import jax  # pylint: disable=g-import-not-at-top

  def to_global(batch):
    return {k: jax.make_array_from_process_local_data(sharding, v)
            for k, v in batch.items()}

  queue = collections.deque()
  checked = False
  for batch in local_batches:
    if not checked:
      rows = len(next(iter(batch.values())))
      mesh_lib.check_batch_divides(rows * jax.process_count(), _batch_shards(sharding),
                                   jax.process_count())
      checked = True
    queue.append(to_global(batch))
    if len(queue) > prefetch:
      yield queue.popleft()
  while queue:
    yield queue.popleft()


def _batch_shards(sharding) -> int:
  """How many pieces `sharding` cuts the leading (batch) axis into."""
  spec, mesh = getattr(sharding, "spec", None), getattr(sharding, "mesh", None)
  if spec is None or mesh is None:
    return len(sharding.device_set)
  axes = spec[0] if len(spec) else None
  if axes is None:
    return 1
  axes = axes if isinstance(axes, tuple) else (axes,)
  return math.prod(mesh.shape[a] for a in axes)
