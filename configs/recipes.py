"""The methods CorInfoMax is compared with, as config changes: like for like, or as
their authors' published runs.

`vicreg(c)` and `barlow_twins(c)` set config.method, that method's loss weights, its
projector and its optimizer, and nothing else: the views, batch, data, schedule shape
and evaluation stay those of the config they are applied to, so that a comparison with
CorInfoMax is like for like.

`vicreg(c, own="cifar")` (or "imagenet100") also takes the rest of the method's
published run whole: its views, global batch, epochs and warmup-cosine schedule. What
`own` changes beyond the like-for-like recipe:

                       like for like (the base config's)   own="cifar" / "imagenet100"
  crop scale           0.08-1                              VICReg 0.2-1; Barlow 0.08-1
  blur p, view 1 / 2   CorInfoMax's 1.0 / 0.1              VICReg 0 / 0 (CIFAR), 0.5 / 0.5
                                                           (IN-100); Barlow 0 / 0 (CIFAR),
                                                           1.0 / 0.1 (IN-100)
  solarise p, 1 / 2    CorInfoMax's 0 / 0.2                VICReg 0.1 / 0.1; Barlow 0 / 0.2
  global batch         the base config's (512, 1024)       256
  epochs               the base config's (1000, 400)       1000 (CIFAR), 400 (IN-100)
  warmup               10 epochs from 3e-3                 10 epochs from 3e-5
  minimum lr           the base config's (1e-6, 5e-3)      0
Colour jitter (p 0.8; 0.4, 0.4, 0.2, 0.1), grayscale (0.2), flips (0.5), the blur's
sigma range (0.1-2) and bicubic crops are the same in both.

Sources (numbers, not code), vturrisi/solo-learn:
  scripts/pretrain/cifar/vicreg.yaml        VICReg CIFAR: views inline, batch 256 on one
                                            device, 1000 epochs, LARS lr 0.3, wd 1e-4,
                                            eta 0.02, clip_lr, exclude_bias_n_norm,
                                            projector 2048-2048-2048
  scripts/pretrain/imagenet-100/vicreg.yaml VICReg IN-100: batch 128 x 2 devices, 400
    + augmentations/vicreg.yaml             epochs, same optimizer and projector
  scripts/pretrain/cifar/barlow.yaml        Barlow Twins CIFAR: batch 256, 1000 epochs,
    + cifar/augmentations/asymmetric.yaml   scale_loss 0.1, same optimizer and projector
  scripts/pretrain/imagenet-100/barlow.yaml Barlow Twins IN-100: batch 128 x 2, 400
    + imagenet-100/augmentations/           epochs
      asymmetric.yaml
  solo/args/pretrain.py                     lr scaled by the global batch / 256
  solo/methods/base.py                      warmup_cosine defaults: 10 warmup epochs from
                                            3e-5, min_lr 0
  solo/utils/lars.py                        the LARS rule (config.optimizer = "lars",
                                            corinfomax_jax.run.optimizers.lars)
Loss weights: facebookresearch/vicreg main_vicreg.py (25 / 25 / 1) and
facebookresearch/barlowtwins main.py (lambda 0.0051; solo-learn's barlow_twins.py has
the same default); Barlow Twins' scale 0.1 is solo-learn's scale_loss. The projector
has BatchNorm after each hidden layer in both (solo-learn's VICReg and Barlow Twins).
"""
from corinfomax_jax import methods

# The published views and runs (the module docstring gives each file).
_VIEWS = {
    ("vicreg", "cifar"): dict(crop_scale=(0.2, 1.0), view1=dict(blur_p=0.0, solarize_p=0.1),
                              view2=dict(blur_p=0.0, solarize_p=0.1)),
    ("vicreg", "imagenet100"): dict(crop_scale=(0.2, 1.0),
                                    view1=dict(blur_p=0.5, solarize_p=0.1),
                                    view2=dict(blur_p=0.5, solarize_p=0.1)),
    ("barlow_twins", "cifar"): dict(crop_scale=(0.08, 1.0),
                                    view1=dict(blur_p=0.0, solarize_p=0.0),
                                    view2=dict(blur_p=0.0, solarize_p=0.2)),
    ("barlow_twins", "imagenet100"): dict(crop_scale=(0.08, 1.0),
                                          view1=dict(blur_p=1.0, solarize_p=0.0),
                                          view2=dict(blur_p=0.1, solarize_p=0.2)),
}
_EPOCHS = {"cifar": 1000, "imagenet100": 400}
OWN = tuple(_EPOCHS)


def only_method(c, name: str) -> None:
  """config.method = name, every other method's section back at its defaults (a base
  config may have tuned CorInfoMax's; a run reads only its own method's section)."""
  c.method = name
  for other in methods.METHODS:
    if other != name:
      c[other].update(methods.hyperparameters(other))


def _solo_learn_lars(c, hidden: int, out: int) -> None:
  c.model.projector = (hidden, hidden, out)
  c.model.projector_bn = True
  c.optimizer = "lars"
  c.learning_rate = 0.3
  c.base_batch_size = 256  # solo-learn scales lr by the global batch / 256
  c.weight_decay = 1e-4
  c.lars_eta = 0.02


def _own_run(c, method: str, own: str) -> None:
  """The rest of the published run: views, batch, epochs, schedule."""
  if own not in OWN:
    raise ValueError(f"own={own!r}: the published runs are {list(OWN)}")
  views = _VIEWS[(method, own)]
  c.aug.crop_scale = views["crop_scale"]
  c.aug.view1.update(views["view1"])
  c.aug.view2.update(views["view2"])
  c.batch_size = 256
  c.num_epochs = _EPOCHS[own]
  c.warmup_epochs = 10.0
  c.warmup_start_lr = 3e-5
  c.min_learning_rate = 0.0


def vicreg(c, hidden: int = 2048, out: int = 2048, own: str | None = None):
  """VICReg's loss weights, projector and optimizer on config `c` (in place); with
  own="cifar" or "imagenet100", its published views, batch and schedule too."""
  only_method(c, "vicreg")
  c.vicreg.sim_weight, c.vicreg.var_weight, c.vicreg.cov_weight = 25.0, 25.0, 1.0
  _solo_learn_lars(c, hidden, out)
  if own is not None:
    _own_run(c, "vicreg", own)
  return c


def published_on_budget(c, method: str, hidden: int, out: int):
  """`method`'s published CIFAR run (own="cifar") on config `c`'s budget: c keeps its
  epochs and warmup epochs, everything else is the published recipe."""
  epochs, warmup = c.num_epochs, c.warmup_epochs
  {"vicreg": vicreg, "barlow_twins": barlow_twins}[method](c, hidden, out, own="cifar")
  c.num_epochs, c.warmup_epochs = epochs, warmup
  return c


def barlow_twins(c, hidden: int = 2048, out: int = 2048, own: str | None = None):
  """Barlow Twins' loss weights, projector and optimizer on config `c` (in place); with
  own="cifar" or "imagenet100", its published views, batch and schedule too."""
  only_method(c, "barlow_twins")
  c.barlow_twins.lambd = 0.0051
  c.barlow_twins.scale = 0.1  # solo-learn's scale_loss
  _solo_learn_lars(c, hidden, out)
  if own is not None:
    _own_run(c, "barlow_twins", own)
  return c
