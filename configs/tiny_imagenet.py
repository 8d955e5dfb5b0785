"""Tiny ImageNet (64 px) from an image folder, ResNet-50 (paper: 54.86 linear top-1).

Reads data/tiny-imagenet, the folder root/{train,val,test}/<wnid>/<image> that
  python tools/prepare_tiny_imagenet.py downloads/tiny-imagenet-200 data/tiny-imagenet
writes from the unpacked archive; --config.dataset=folder:<root> names another. The
unpacked archive itself is refused in one line (its val/ has no class folders).
"""
from configs import default


def get_config(arg=None):
  c = default.get_config()
  c.dataset = "folder:data/tiny-imagenet"
  c.eval_split = "val"
  c.image_size = 64
  c.model.backbone = "resnet50"
  c.model.cifar_stem = False
  c.model.projector = (4096, 4096, 128)
  c.batch_size = c.base_batch_size = 1024
  c.num_epochs = 800
  c.corinfomax.alpha = 500.0
  c.corinfomax.la_R = c.corinfomax.la_mu = 0.1
  return default.with_argument(c, arg)
