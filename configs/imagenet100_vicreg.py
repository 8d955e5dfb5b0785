"""VICReg on the trainer's imagenet100 setting (configs/imagenet100.py), with its published
loss weights, projector and optimizer (configs/recipes.py names the sources)."""
from configs import default
from configs import imagenet100
from configs import recipes


def get_config(arg=None):
  c = recipes.vicreg(imagenet100.get_config())
  return default.with_argument(c, arg)
