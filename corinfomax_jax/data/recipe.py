"""The augmentation recipe: the numbers of each view, resolved and checked once.

The paper's recipe (Ozsoy et al., 2022, after BYOL), per view: random resized crop and
flip (on the host), colour jitter with p=0.8 and strengths (brightness 0.4, contrast
0.4, saturation 0.2, hue 0.1), grayscale p=0.2, Gaussian blur sigma in (0.1, 2.0) with
p=1.0 in view 1 and p=0.1 in view 2, solarisation (threshold 0.5) with p=0 in view 1
and p=0.2 in view 2 (on the device, `augment`).

A recipe is a dict with every number a key (`paper_config`): shared keys apply to every
view, and `view1` / `view2` / `probe` hold what differs. `resolve` applies a run's
`config.aug` to the paper's recipe for its data set and checks it; settings do that once
(`settings.Data.recipe`). `views` then gives each view's `ViewSettings`, which is what the
pipeline (crop and flip) and the train step (`augment.view`) read. Pure Python: no jax,
no TensorFlow.
"""
import dataclasses
from typing import Any, Mapping

_CIFAR10_STATS = ((0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261))
_CIFAR100_STATS = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
_IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))

_HOST = {"host": True}  # a field the host reads (crop and flip); the others: the device


@dataclasses.dataclass(frozen=True)
class ViewSettings:
  """The numbers one view uses (hashable: compiled functions are cached by it)."""
  crop_scale: tuple[float, float] = dataclasses.field(metadata=_HOST)
  crop_ratio: tuple[float, float] = dataclasses.field(metadata=_HOST)
  flip_p: float = dataclasses.field(metadata=_HOST)
  jitter_p: float
  brightness: float
  contrast: float
  saturation: float
  hue: float
  grayscale_p: float
  blur_p: float
  blur_sigma: tuple[float, float]
  solarize_p: float
  solarize_threshold: float


# The keys a view may set (`view1` / `view2` / `probe` may override any shared one), and
# those of them the device ops read (`augment.view`): both from the fields above.
VIEW_KEYS = tuple(f.name for f in dataclasses.fields(ViewSettings))
DEVICE_KEYS = tuple(f.name for f in dataclasses.fields(ViewSettings)
                    if not f.metadata.get("host"))


@dataclasses.dataclass(frozen=True)
class Views:
  """A resolved recipe's per-view settings: what the pipelines read."""
  view1: ViewSettings
  view2: ViewSettings
  probe: ViewSettings  # the linear probe's training view (crop and flip only)
  test_resize_ratio: float  # the test view: resize to int(S * ratio), centre crop S


def normalization_stats(dataset: str) -> tuple[tuple[float, ...],
                                               tuple[float, ...]]:
  """(mean, std) per RGB channel for `dataset` (a `get_source` data set name).

  CIFAR-10 and CIFAR-100 have their own; everything else (ImageNet, ImageNet-100,
  image folders) gets ImageNet's. Override `mean`/`std` in the aug config for a
  folder of another distribution.
  """
  name = "" if dataset.startswith("folder:") else dataset.split(":")[0]
  return {"cifar10": _CIFAR10_STATS,
          "cifar100": _CIFAR100_STATS}.get(name, _IMAGENET_STATS)


def default_aug_config(dataset: str) -> dict[str, Any]:
  """The paper's augmentation numbers with `dataset`'s normalisation."""
  return paper_config(*normalization_stats(dataset))


def paper_config(mean, std) -> dict[str, Any]:
  """The paper's two-view recipe (CorInfoMax reference code), every number a key.

  Shared keys apply to both views; `view1` and `view2` hold what differs and may
  override any shared key. `probe` is the linear-probe training view (crop and
  flip only; it too may override any shared key) and `test_resize_ratio` the
  resize-then-centre-crop ratio of the test view.
  """
  return dict(
      mean=tuple(mean),
      std=tuple(std),
      crop_scale=(0.08, 1.0),
      crop_ratio=(3 / 4, 4 / 3),
      flip_p=0.5,
      jitter_p=0.8,
      brightness=0.4,
      contrast=0.4,
      saturation=0.2,
      hue=0.1,
      grayscale_p=0.2,
      blur_p=0.0,  # set per view below
      blur_sigma=(0.1, 2.0),  # PIL GaussianBlur(radius=sigma), sigma uniform in range
      solarize_p=0.0,  # set per view below
      solarize_threshold=0.5,
      view1=dict(blur_p=1.0, solarize_p=0.0),
      view2=dict(blur_p=0.1, solarize_p=0.2),
      probe=dict(crop_scale=(0.08, 1.0), crop_ratio=(3 / 4, 4 / 3),
                 flip_p=0.5),
      test_resize_ratio=8 / 7,
  )


def _as_dict(config) -> dict[str, Any]:
  return config.to_dict() if hasattr(config, "to_dict") else dict(config)


def view_config(config: Mapping[str, Any], view: str) -> ViewSettings:
  """The numbers one view uses: shared keys updated by `config[view]`."""
  config = _as_dict(config)
  if view not in config:
    raise ValueError(f"Augmentation config has no {view!r} entry; it has "
                     f"{sorted(config)}.")
  overrides = _as_dict(config[view])
  unknown = sorted(set(overrides) - set(VIEW_KEYS))
  if unknown:
    raise ValueError(f"Augmentation config {view!r} has unknown keys {unknown};"
                     f" a view may set {list(VIEW_KEYS)}.")
  merged = {k: config[k] for k in VIEW_KEYS}
  merged.update(overrides)
  return ViewSettings(**{k: tuple(v) if isinstance(v, (list, tuple)) else v
                         for k, v in merged.items()})


def views(config: Mapping[str, Any]) -> Views:
  """The per-view settings of a resolved recipe (`resolve`, `settings.Data.recipe`)."""
  return Views(*(view_config(config, name) for name in ("view1", "view2", "probe")),
               test_resize_ratio=_as_dict(config)["test_resize_ratio"])


def with_overrides(config: Mapping[str, Any],
                   overrides: Mapping[str, Any] | None) -> dict[str, Any]:
  """`config` with the keys of `overrides` replaced (view1/view2/probe merged).

  Raises ValueError for a key `config` does not have.
  """
  out = _as_dict(config)
  for key, value in _as_dict(overrides or {}).items():
    if key not in out:
      raise ValueError(f"Unknown augmentation key {key!r}; the keys are "
                       f"{sorted(out)}.")
    if key in ("view1", "view2", "probe"):
      out[key] = {**_as_dict(out[key]), **_as_dict(value)}
    else:
      out[key] = value
  return out


def resolve(dataset: str, overrides: Mapping[str, Any] | None) -> dict[str, Any]:
  """The paper's recipe for `dataset` with `overrides` (config.aug), checked."""
  config = with_overrides(default_aug_config(dataset), overrides)
  check_config(config)
  return config


def check_config(config: Mapping[str, Any]) -> None:
  """Raises ValueError naming the first out-of-range number of `config`."""
  config = _as_dict(config)
  for key in ("mean", "std"):
    if len(config[key]) != 3:
      raise ValueError(f"aug config {key}={config[key]!r}: need 3 numbers.")
  if min(config["std"]) <= 0:
    raise ValueError(f"aug config std={config['std']!r}: must be > 0.")
  if config["test_resize_ratio"] < 1:
    raise ValueError(f"aug config test_resize_ratio="
                     f"{config['test_resize_ratio']}: must be >= 1.")
  settings = {name: view_config(config, name) for name in ("view1", "view2", "probe")}
  for name, view in settings.items():
    _check_view(name, view)


def _check_view(name: str, view: ViewSettings) -> None:
  for key, value in dataclasses.asdict(view).items():
    where = f"aug config {name}.{key}={value!r}"
    if key.endswith("_p") and not 0 <= value <= 1:
      raise ValueError(f"{where}: a probability must lie in [0, 1].")
    if key in ("crop_scale", "crop_ratio", "blur_sigma"):
      if len(value) != 2 or not 0 < value[0] <= value[1]:
        raise ValueError(f"{where}: need (low, high) with 0 < low <= high.")
    if key in ("brightness", "contrast", "saturation") and not 0 <= value:
      raise ValueError(f"{where}: must be >= 0.")
  if not 0 <= view.hue <= 0.5:
    raise ValueError(f"aug config {name}.hue={view.hue}: need [0, 0.5].")
  if view.crop_scale[1] > 1:
    raise ValueError(f"aug config {name}.crop_scale={view.crop_scale}: "
                     "the area fraction cannot exceed 1.")
