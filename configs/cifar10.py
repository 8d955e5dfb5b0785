"""CIFAR-10, ResNet-18 with the CIFAR stem (paper: 93.18 linear top-1)."""
from configs import default


def get_config(arg=None):
  return default.get_config(arg)  # the defaults are this setting
