"""CIFAR-100, ResNet-18 with the CIFAR stem (paper: 71.61 linear top-1)."""
from configs import default


def get_config(arg=None):
  c = default.get_config()
  c.dataset = "cifar100"
  c.model.projector = (4096, 4096, 128)
  c.corinfomax.alpha = 1000.0
  return default.with_argument(c, arg)
