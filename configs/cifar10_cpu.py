"""CorInfoMax on real CIFAR-10 with a CPU budget (README: A real-data run).

The paper's method and recipe, scaled down: ResNet-18 at 1/8 width, a 512-512-64
projector, 4 epochs of the whole training set at batch 256. It exists so that a new
user without an accelerator sees the method learn (kNN top-1 against random init).
"""
import os

from absl import logging

from configs import default

# A local convenience: a CIFAR-10 image folder at <repository>/../shared/data/cifar10 is
# read when present (found from this file's place, not the working directory). Without
# it, TFDS cifar10 is downloaded and prepared on first use.
BESIDE_CHECKOUT = os.path.normpath(os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "cifar10"))


def dataset_name() -> str:
  """The folder beside the checkout when it is there, else TFDS cifar10."""
  if os.path.isdir(BESIDE_CHECKOUT):
    logging.info("cifar10_cpu: reading the CIFAR-10 folder %s.", BESIDE_CHECKOUT)
    return f"folder:{BESIDE_CHECKOUT}"
  logging.info("cifar10_cpu: no folder at %s; using TFDS cifar10 (downloaded and "
               "prepared in the TFDS data_dir on first use).", BESIDE_CHECKOUT)
  return "cifar10"


def get_config(arg=None):
  c = default.get_config()
  c.dataset = dataset_name()
  # A folder gets ImageNet's mean/std by default; these images are CIFAR-10's (the
  # same as TFDS cifar10's, so both sources normalise alike).
  c.aug.mean = (0.4914, 0.4822, 0.4465)
  c.aug.std = (0.247, 0.243, 0.261)
  c.model.width = 8  # an eighth of ResNet-18's channels: ~170 images/s on 2 cores
  c.model.projector = (512, 512, 64)
  c.batch_size = 256
  c.base_batch_size = 512  # the paper's lr 0.5 at 512 scales to 0.25
  c.num_epochs = 4
  c.warmup_epochs = 0.2
  c.log_every_steps = 20
  c.checkpoint_every_steps = 100
  c.spectrum_every_steps = 20
  c.eval.batch_size = 500
  c.eval.knn.every_epochs = 1  # kNN monitor on a 10k-image bank after each epoch
  c.eval.knn.max_train_examples = 10000
  return default.with_argument(c, arg)
