"""Barlow Twins as solo-learn published it for ImageNet-100 (configs/recipes.py names
each file): its views, global batch 256, 400 epochs, LARS with the clip, warmup-cosine
to 0."""
from configs import default
from configs import imagenet100
from configs import recipes


def get_config(arg=None):
  c = recipes.barlow_twins(imagenet100.get_config(), own="imagenet100")
  return default.with_argument(c, arg)
