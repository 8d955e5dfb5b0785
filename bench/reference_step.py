"""The PyTorch reference's CorInfoMax train step on synthetic batches (optional: needs torch).

  python bench/reference_step.py --width 8 --projector 512-512-64 --batch_size 256
  python bench/train_step.py --config=configs/cifar10_cpu.py --reference   # ours / this

The step of the authors' code (serdarozsoy/corinfomax-ssl, cifars-tiny/): torchvision's
ResNet-18 with a 3x3 stride-1 stem and no max-pool (zero-initialised residual BN), a
Linear-ReLU projector with a bias-free last layer, each view through the network
separately, L2-normalised outputs (`--normalize_on`), the covariance loss with float64 moving estimates (`loss.py`), the MSE
invariance term and SGD with momentum and weight decay. The same at `--width` other than
64 scales every stage's channels, as `config.model.width` does ours. Views arrive as
normalised float tensors: the reference's augmentation runs in its DataLoader, so this
step does less than ours, which also augments both views.

Imports no JAX; the last line is `images_per_s=<number>`. `make_step` is what
bench/train_step.py calls to time both in one process, round by round.
"""
import argparse
import os
import time

import torch
from torch import nn
import torch.nn.functional as F


class BasicBlock(nn.Module):
  """torchvision's BasicBlock at any width (torchvision fixes 64 per group)."""

  def __init__(self, cin: int, cout: int, stride: int):
    super().__init__()
    self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(cout)
    self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(cout)
    nn.init.zeros_(self.bn2.weight)  # zero_init_residual=True
    self.downsample = None
    if stride != 1 or cin != cout:
      self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                      nn.BatchNorm2d(cout))

  def forward(self, x):
    identity = x if self.downsample is None else self.downsample(x)
    out = F.relu(self.bn1(self.conv1(x)))
    return F.relu(self.bn2(self.conv2(out)) + identity)


class CifarResNet18(nn.Module):
  """The reference's backbone: resnet18 with conv1 3x3/1, maxpool and fc removed."""

  def __init__(self, width: int = 64):
    super().__init__()
    widths = [width, 2 * width, 4 * width, 8 * width]
    self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(width)
    blocks, cin = [], width
    for i, w in enumerate(widths):
      stride = 1 if i == 0 else 2
      blocks += [BasicBlock(cin, w, stride), BasicBlock(w, w, 1)]
      cin = w
    self.layers = nn.Sequential(*blocks)
    self.feature_dim = cin
    for m in self.modules():  # torchvision's ResNet initialisation
      if isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

  def forward(self, x):
    x = self.layers(F.relu(self.bn1(self.conv1(x))))
    return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)


class CovModel(nn.Module):
  """Backbone and projector; each view passes separately (per-view BatchNorm)."""

  def __init__(self, width: int, projector):
    super().__init__()
    self.backbone = CifarResNet18(width)
    sizes = [self.backbone.feature_dim] + list(projector)
    layers = []
    for i in range(len(sizes) - 2):
      layers += [nn.Linear(sizes[i], sizes[i + 1]), nn.ReLU()]
    layers.append(nn.Linear(sizes[-2], sizes[-1], bias=False))
    self.projector = nn.Sequential(*layers)

  def forward(self, y1, y2):
    return self.projector(self.backbone(y1)), self.projector(self.backbone(y2))


class CovarianceLoss:
  """loss.py's CovarianceLoss: float64 moving mean and covariance, logdet of each."""

  def __init__(self, dim: int, r_ini=1.0, la_r=0.01, la_mu=0.01, eps=1e-8,
               device="cpu"):
    eye = torch.eye(dim, dtype=torch.float64, device=device)
    self.r1, self.r2 = r_ini * eye, r_ini * eye.clone()
    self.mu1 = torch.zeros(dim, dtype=torch.float64, device=device)
    self.mu2 = torch.zeros(dim, dtype=torch.float64, device=device)
    self.la_r, self.la_mu, self.eps = la_r, la_mu, eps * eye

  def __call__(self, z1, z2):
    n, d = z1.shape
    mu1 = self.la_mu * self.mu1 + (1 - self.la_mu) * z1.mean(0)
    mu2 = self.la_mu * self.mu2 + (1 - self.la_mu) * z2.mean(0)
    z1h, z2h = z1 - mu1, z2 - mu2
    r1 = self.la_r * self.r1 + (1 - self.la_r) * (z1h.T @ z1h) / n
    r2 = self.la_r * self.r2 + (1 - self.la_r) * (z2h.T @ z2h) / n
    loss = -(torch.logdet(r1 + self.eps) + torch.logdet(r2 + self.eps)) / d
    self.r1, self.r2 = r1.detach(), r2.detach()
    self.mu1, self.mu2 = mu1.detach(), mu2.detach()
    return loss


def make_step(width: int, projector, batch_size: int, image_size: int = 32,
              lr: float = 0.25, momentum: float = 0.9, weight_decay: float = 1e-4,
              alpha: float = 250.0, la_r: float = 0.01, la_mu: float = 0.01,
              r_ini: float = 1.0, eps: float = 1e-8, normalize: bool = True,
              seed: int = 0, device: str = "cpu"):
  """Returns `run(n)`: n reference train steps on one fixed synthetic batch; the loss.

  device: where the network, the batch and the loss's estimates live ("cpu", "cuda").
  `run` returns the last loss as a float, which waits for the device's work.
  """
  torch.manual_seed(seed)
  model = CovModel(width, projector).to(device)
  model.train()
  loss_cov = CovarianceLoss(projector[-1], r_ini=r_ini, la_r=la_r, la_mu=la_mu, eps=eps,
                            device=device)
  opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum,
                        weight_decay=weight_decay)
  y1 = torch.randn(batch_size, 3, image_size, image_size).to(device)
  y2 = torch.randn(batch_size, 3, image_size, image_size).to(device)

  def run(n: int) -> float:
    for _ in range(n):
      z1, z2 = model(y1, y2)
      if normalize:  # the reference's --normalize_on
        z1, z2 = F.normalize(z1, p=2), F.normalize(z2, p=2)
      loss = alpha * F.mse_loss(z1, z2) + loss_cov(z1, z2)
      opt.zero_grad()
      loss.backward()
      opt.step()
    return float(loss.detach())

  return run


def use_affinity_threads() -> int:
  """torch's intra-op threads = the cores this process may run on (taskset's mask)."""
  n = len(os.sched_getaffinity(0))
  torch.set_num_threads(n)
  return n


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--width", type=int, default=8)
  parser.add_argument("--projector", default="512-512-64")
  parser.add_argument("--batch_size", type=int, default=256)
  parser.add_argument("--image_size", type=int, default=32)
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--warmup", type=int, default=1)
  parser.add_argument("--rounds", type=int, default=3)
  args = parser.parse_args()
  threads = use_affinity_threads()
  projector = tuple(int(s) for s in args.projector.split("-"))
  run = make_step(args.width, projector, args.batch_size, args.image_size)
  run(args.warmup)
  best = float("inf")
  for _ in range(args.rounds):
    t0 = time.perf_counter()
    run(args.steps)
    best = min(best, (time.perf_counter() - t0) / args.steps * 1e3)
  print(f"PyTorch {torch.__version__} reference step, ResNet-18 width {args.width} "
        f"{args.image_size}px projector {args.projector} batch {args.batch_size} float32 "
        f"on {threads} CPU thread(s): {best:.1f} ms/step (fastest of {args.rounds} "
        f"rounds of {args.steps} steps)")
  print(f"images_per_s={args.batch_size / best * 1e3:.1f}")


if __name__ == "__main__":
  main()
