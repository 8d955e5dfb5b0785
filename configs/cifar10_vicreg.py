"""VICReg on the trainer's cifar10 setting (configs/cifar10.py), with its published
loss weights, projector and optimizer (configs/recipes.py names the sources)."""
from configs import cifar10
from configs import default
from configs import recipes


def get_config(arg=None):
  c = recipes.vicreg(cifar10.get_config())
  return default.with_argument(c, arg)
