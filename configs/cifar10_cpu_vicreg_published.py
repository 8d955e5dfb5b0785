"""VICReg's published CIFAR recipe (configs/recipes.py, own="cifar": its views, batch 256,
LARS with the clip, warmup from 3e-5, cosine to 0) on the cifar10_cpu budget: the same
network, 512-512-512 projector, data and 780 steps as configs/cifar10_cpu_vicreg.py.
The budget keeps its 4 epochs and 0.2 warmup epochs (the published run: 1000 and 10)."""
from configs import cifar10_cpu
from configs import default
from configs import recipes


def get_config(arg=None):
  c = recipes.published_on_budget(cifar10_cpu.get_config(), "vicreg", hidden=512,
                                  out=512)
  return default.with_argument(c, arg)
