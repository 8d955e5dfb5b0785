"""CIFAR-10, ViT-Ti/4 at 32 px (8x8 patches of 4 px): CorInfoMax by default, any method
by --config.method (docs/vit.md).

The paper's CIFAR-10 setting (views, batch 512, 1000 epochs, projector 2048-2048-64,
alpha 250) with a ViT instead of the ResNet-18, and the ViT's optimizer:
  network    big_vision's ViT-Ti sizes (width 192, depth 12, MLP 768, 3 heads) with
             patch 4; global-average pooling and fixed sincos2d position embeddings, as
             big_vision's plain ViT baseline (big_vision/configs/vit_s16_i1k.py, Beyer
             et al. 2022, arXiv:2205.01580), which trains well from scratch
  optimizer  AdamW, lr 5e-4 per 512 images and weight decay 0.05 (DeiT, Touvron et al.
             2021, arXiv:2012.12877: lr 5e-4 x batch / 512, wd 0.05), betas (0.9, 0.999);
             decay on kernels only; 10 warmup epochs from 0, cosine to 1e-6; gradients
             clipped to global norm 1.0 (big_vision's grad_clip_norm)
No CorInfoMax ViT run is published: these numbers are a starting point, not a tuned
recipe.
"""
from configs import default


def get_config(arg=None):
  c = default.get_config()
  default.set_vit(c, "vit_ti16", patch_size=4, posemb="sincos2d", pool="gap")
  default.set_adamw(c, learning_rate=5e-4, base_batch_size=512, weight_decay=0.05,
                    warmup_epochs=10.0, grad_clip_norm=1.0)
  return default.with_argument(c, arg)
