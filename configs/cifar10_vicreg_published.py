"""VICReg as solo-learn published it for CIFAR-10 (configs/recipes.py names each file):
its views, batch 256, 1000 epochs, LARS with the clip, warmup-cosine to 0."""
from configs import cifar10
from configs import default
from configs import recipes


def get_config(arg=None):
  c = recipes.vicreg(cifar10.get_config(), own="cifar")
  return default.with_argument(c, arg)
