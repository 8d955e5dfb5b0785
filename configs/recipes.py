"""The published recipes of the methods CorInfoMax is compared with, as config changes.

Each function sets config.method, that method's loss weights, its projector and its
optimizer, and nothing else: the views, data, schedule shape and evaluation stay those
of the config it is applied to, so that a comparison is like for like.

Sources (numbers, not code):
  VICReg        facebookresearch/vicreg main_vicreg.py (loss weights 25 / 25 / 1);
                solo-learn scripts/pretrain/{cifar,imagenet-100}/vicreg.yaml
                (projector 2048-2048-2048 with BatchNorm, LARS lr 0.3 per 256 images,
                weight decay 1e-4, eta 0.02, biases and norms excluded).
  Barlow Twins  facebookresearch/barlowtwins main.py (lambda 0.0051);
                solo-learn scripts/pretrain/{cifar,imagenet-100}/barlow.yaml
                (projector 2048-2048-2048 with BatchNorm, scale_loss 0.1, LARS lr 0.3
                per 256 images, weight decay 1e-4, eta 0.02).
solo-learn's LARS also clips each layer's adapted rate at the global one (clip_lr);
optax.lars does not, the one difference from its optimizer.
"""
from corinfomax_jax import methods


def _only_method(c, name: str) -> None:
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


def vicreg(c, hidden: int = 2048, out: int = 2048):
  """VICReg's loss weights, projector and optimizer on config `c` (in place)."""
  _only_method(c, "vicreg")
  c.vicreg.sim_weight, c.vicreg.var_weight, c.vicreg.cov_weight = 25.0, 25.0, 1.0
  _solo_learn_lars(c, hidden, out)
  return c


def barlow_twins(c, hidden: int = 2048, out: int = 2048):
  """Barlow Twins' loss weights, projector and optimizer on config `c` (in place)."""
  _only_method(c, "barlow_twins")
  c.barlow_twins.lambd = 0.0051
  c.barlow_twins.scale = 0.1  # solo-learn's scale_loss
  _solo_learn_lars(c, hidden, out)
  return c
