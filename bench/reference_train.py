"""The PyTorch reference's CIFAR-10 pretraining loop on real images, timed end to end.

  PYTHONPATH=<torch env> python bench/reference_train.py --steps 30
  python main.py --config=configs/cifar10_cpu.py --workdir=DIR --config.max_steps=N  # ours

What the authors' code (serdarozsoy/corinfomax-ssl, cifars-tiny/) runs per pretraining
step, CPU only: a DataLoader over the training images (shuffle, drop_last, `n_workers`
worker processes, its parser's default 8) whose workers decode each image and make both
views with torchvision on PIL (`transform_utils.PretrainTransform("cifar10")`, rebuilt
below as `PretrainTransform`), then the network on each view (`CovModel` of
bench/reference_step.py), L2-normalised outputs, loss = alpha * MSE + the covariance
loss (`CovarianceLoss` of bench/reference_step.py, float64 moving estimates) and an SGD
step with momentum and weight decay. The numbers are configs/cifar10_cpu.py's: ResNet-18
at width 8, projector 512-512-64, batch 256, alpha 250, la_R = la_mu = 0.01, eps 1e-8,
R_ini 1, momentum 0.9, weight decay 1e-4.

Differences from the reference, none of which changes the work of a step: the images
come from the folder <root>/<class>/<image> through torchvision's ImageFolder instead
of torchvision's CIFAR10 binary (each image is decoded from its file); the learning
rate is a fixed 0.25 (configs/cifar10_cpu.py's peak, 0.5 at batch 512 scaled to 256)
instead of the warmup-cosine schedule, which sets a number per step and costs nothing
measurable; memory is pinned only when CUDA is present, as the reference's
`pin_memory=True` does nothing without it.

Prints the step and the images/s over the last 20 steps every 20 steps. The first
`--skip` steps (default 5: worker start-up, first allocations) are left out of the
steady-state rate. The last two lines are the total wall seconds from start-up (imports,
model, data set index, worker start) to the last step, and `images_per_s=<number>`,
the steady-state rate. Imports no JAX or TensorFlow.
"""
import time

START = time.perf_counter()  # before the heavy imports: total wall time counts them

# pylint: disable=g-import-not-at-top,wrong-import-position
import argparse
import os
import random
import sys

import torch
import torch.nn.functional as F
import torchvision
from PIL import ImageFilter, ImageOps
from torch.utils.data import DataLoader
from torchvision import transforms as T

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
sys.path.insert(0, BENCH)

from reference_step import CovarianceLoss, CovModel

# configs/cifar10_cpu.py's normalisation, the reference's for "cifar10".
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.247, 0.243, 0.261)


class GaussianBlur:
  """The reference's blur: PIL Gaussian blur of a radius uniform in [0.1, 2.0]."""

  def __init__(self, sigma=(0.1, 2.0)):
    self.sigma = sigma

  def __call__(self, image):
    return image.filter(ImageFilter.GaussianBlur(
        radius=random.uniform(self.sigma[0], self.sigma[1])))


class Solarization:
  """The reference's solarisation: PIL's, threshold 128."""

  def __call__(self, image):
    return ImageOps.solarize(image)


def view(size: int, blur_p: float, solarize_p: float):
  """One of the reference's two view recipes; they differ in blur and solarisation.

  Args:
    size: output side in pixels (32 for CIFAR-10).
    blur_p: probability of the Gaussian blur.
    solarize_p: probability of solarisation.

  Returns:
    A torchvision transform from a PIL image to a normalised float tensor.
  """
  return T.Compose([
      T.RandomResizedCrop(size, scale=(0.08, 1.0),
                          interpolation=T.InterpolationMode.BICUBIC),
      T.RandomHorizontalFlip(p=0.5),
      T.RandomApply([T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2,
                                   hue=0.1)], p=0.8),
      T.RandomGrayscale(p=0.2),
      T.RandomApply([GaussianBlur()], p=blur_p),
      T.RandomApply([Solarization()], p=solarize_p),
      T.ToTensor(),
      T.Normalize(CIFAR10_MEAN, CIFAR10_STD),
  ])


class PretrainTransform:
  """The reference's CIFAR-10 view pair.

  The first view is always blurred and never solarised; the second is blurred with
  probability 0.1 and solarised with probability 0.2.
  """

  def __init__(self, size: int = 32):
    self.transform = view(size, blur_p=1.0, solarize_p=0.0)
    self.transform_prime = view(size, blur_p=0.1, solarize_p=0.2)

  def __call__(self, image):
    return self.transform(image), self.transform_prime(image)


def batches(loader):
  """Yields the loader's batches forever, a new epoch (and workers) after each end."""
  while True:
    yield from loader


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data_dir",
                      default=os.path.join(ROOT, "..", "shared", "data", "cifar10", "train"),
                      help="image folder <root>/<class>/<image>")
  parser.add_argument("--steps", type=int, default=30)
  parser.add_argument("--skip", type=int, default=5,
                      help="first steps left out of the steady-state rate")
  parser.add_argument("--num_workers", type=int, default=8,
                      help="DataLoader workers (the reference's --n_workers default: 8)")
  parser.add_argument("--threads", type=int, default=0,
                      help="torch intra-op threads of the main process (0: the cores "
                           "in this process's affinity mask)")
  parser.add_argument("--width", type=int, default=8)
  parser.add_argument("--projector", default="512-512-64")
  parser.add_argument("--batch_size", type=int, default=256)
  parser.add_argument("--image_size", type=int, default=32)
  parser.add_argument("--lr", type=float, default=0.25)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  if args.steps <= args.skip:
    parser.error(f"--steps must exceed --skip ({args.skip})")

  threads = args.threads or len(os.sched_getaffinity(0))
  torch.set_num_threads(threads)
  torch.manual_seed(args.seed)
  random.seed(args.seed)
  projector = tuple(int(s) for s in args.projector.split("-"))

  # The reference's pretraining loader (main_traintest.py).
  data = torchvision.datasets.ImageFolder(args.data_dir,
                                          transform=PretrainTransform(args.image_size))
  loader = DataLoader(data, batch_size=args.batch_size, num_workers=args.num_workers,
                      shuffle=True, pin_memory=torch.cuda.is_available(), drop_last=True)

  model = CovModel(args.width, projector)
  model.train()
  loss_cov = CovarianceLoss(projector[-1], r_ini=1.0, la_r=0.01, la_mu=0.01, eps=1e-8)
  opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=1e-4)
  alpha = 250.0

  print(f"PyTorch {torch.__version__}, torchvision {torchvision.__version__}: reference "
        f"pretraining loop, ResNet-18 width {args.width} {args.image_size}px projector "
        f"{args.projector} batch {args.batch_size}, {len(data)} images in "
        f"{args.data_dir}, {args.num_workers} DataLoader worker(s), {threads} torch "
        f"thread(s)", flush=True)
  stream = batches(loader)
  ends = [time.perf_counter()]  # ends[s]: when step s finished; ends[0]: loop start
  for step in range(1, args.steps + 1):
    (y1, y2), _ = next(stream)
    z1, z2 = model(y1, y2)
    z1, z2 = F.normalize(z1, p=2), F.normalize(z2, p=2)  # the reference's --normalize_on
    loss = alpha * F.mse_loss(z1, z2) + loss_cov(z1, z2)
    opt.zero_grad()
    loss.backward()
    opt.step()
    loss = float(loss.detach())
    ends.append(time.perf_counter())
    if step % 20 == 0 or step == args.steps:
      n = min(20, step - (step - 1) // 20 * 20)
      rate = n * args.batch_size / (ends[step] - ends[step - n])
      print(f"step {step}: loss {loss:.4f}, {rate:.1f} images/s over the last {n} "
            f"step(s)", flush=True)

  steady = (args.steps - args.skip) * args.batch_size / (ends[-1] - ends[args.skip])
  print(f"total_wall_s={ends[-1] - START:.1f} (start-up {ends[0] - START:.1f}s, "
        f"{args.steps} steps {ends[-1] - ends[0]:.1f}s; steady state over steps "
        f"{args.skip + 1}-{args.steps})")
  print(f"images_per_s={steady:.1f}")


if __name__ == "__main__":
  main()
