"""ImageNet-100, ViT-B/16 at 224 px: configs/imagenet100_vit_s16.py's recipe with
big_vision's B/16 (width 768, 12 blocks, MLP 3072, 12 heads; docs/vit.md)."""
from configs import imagenet100_vit_s16


def get_config():
  c = imagenet100_vit_s16.get_config()
  c.model.backbone = "vit_b16"
  return c
