"""ImageNet-100, ResNet-50 (paper: 82.64 linear top-1)."""
from configs import imagenet100


def get_config(arg=None):
  c = imagenet100.get_config()
  c.model.backbone = "resnet50"
  c.num_epochs = 200
  c.warmup_epochs = 5
  return default.with_argument(c, arg)
