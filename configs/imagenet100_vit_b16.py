"""ImageNet-100, ViT-B/16 at 224 px: configs/imagenet100_vit_s16.py's recipe with
big_vision's B/16 (width 768, 12 blocks, MLP 3072, 12 heads; docs/vit.md); another
method by the argument, as there (configs/imagenet100_vit_b16.py:vicreg)."""
from configs import imagenet100_vit_s16


def get_config(arg=None):
  c = imagenet100_vit_s16.get_config(arg)
  c.model.backbone = "vit_b16"
  return c
