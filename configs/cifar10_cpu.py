"""CorInfoMax on the real CIFAR-10 folder within about 15 minutes on 2 CPU cores.

The paper's method and recipe with a CPU budget: a ResNet-18 of a quarter width, a
smaller projector, and a few epochs on a subset. It exists so that a new user without
an accelerator sees the method learn (see README: kNN top-1 against random init).
"""
from configs import default


def get_config():
  c = default.get_config()
  c.dataset = "folder:../shared/data/cifar10"
  c.width = 16
  c.projector = "512-512-64"
  c.batch_size = 256
  c.base_batch_size = 512  # lr scales to 0.5 * 256 / 512
  c.num_epochs = 10
  c.warmup_epochs = 1
  c.log_every_steps = 20
  c.checkpoint_every_steps = 200
  c.spectrum_every_steps = 100
  c.eval.batch_size = 500
  return c
