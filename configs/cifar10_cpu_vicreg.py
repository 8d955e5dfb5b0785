"""VICReg on the cifar10_cpu budget (README: the comparison): the same network, views,
seed, steps and schedule as configs/cifar10_cpu.py, with VICReg's own loss weights and
optimizer (configs/recipes.py) and its 2048-2048-2048 projector scaled to the budget
as CorInfoMax's is (hidden layers a quarter wide): 512-512-512 with BatchNorm."""
from configs import cifar10_cpu
from configs import default
from configs import recipes


def get_config(arg=None):
  c = recipes.vicreg(cifar10_cpu.get_config(), hidden=512, out=512)
  return default.with_argument(c, arg)
