"""ImageNet-100, ViT-S/16 at 224 px: CorInfoMax by default, any method by --config.method
(docs/vit.md).

No covariance-family (CorInfoMax, VICReg, Barlow Twins) ViT run on ImageNet-100 is
published with its recipe; solo-learn has none. The closest published two-view ViT-S
recipe on ImageNet-100 is solo-learn's (vturrisi/solo-learn,
scripts/pretrain/imagenet-100/mocov3_vit.yaml), whose optimizer and schedule this takes:
  backbone   vit_small (timm's ViT-S/16: class token, learned position embeddings)
             -> vit_s16, pool "tok", posemb "learn"
  optimizer  adamw, lr 3.0e-4, weight_decay 0.1, batch 64 x 8 devices = 512; the lr is
             solo-learn's per 256 images (solo/args/pretrain.py scales it by the global
             batch / 256); betas torch's default (0.9, 0.999)
  scheduler  warmup_cosine: 10 warmup epochs from 3e-5 (here from 0), cosine to 0
             (solo/methods/base.py defaults; here 1e-6)
  epochs     400
  precision  float32 here (solo-learn's ViT rows use 16-bit mixed precision; the
             covariance losses' log-determinant wants float32, config.model.dtype)
Gradients are clipped to global norm 1.0 (big_vision's ViT recipes,
big_vision/configs/vit_s16_i1k.py: grad_clip_norm = 1.0); solo-learn does not clip.
CorInfoMax's own ImageNet-100 settings stay (configs/imagenet100.py: projector
4096-4096-128, alpha 500, the paper's views).

Another method's loss on the same network, optimizer and views: the argument names it,
its section at its defaults and CorInfoMax's alpha 500 dropped (the other arguments are
every config's, semi1 and semi10: default.with_argument),
  python main.py --config=configs/imagenet100_vit_s16.py:vicreg --workdir=DIR
"""
from configs import default
from configs import imagenet100
from configs import recipes
from corinfomax_jax import methods


def get_config(arg=None):
  c = imagenet100.get_config()
  if arg in methods.METHODS:
    recipes.only_method(c, arg)
    arg = None
  default.set_vit(c, "vit_s16", patch_size=16, posemb="learn", pool="tok")
  default.set_adamw(c, learning_rate=3e-4, base_batch_size=256, weight_decay=0.1,
                    warmup_epochs=10.0, grad_clip_norm=1.0)
  c.batch_size = 512
  c.eval.batch_size = 512
  return default.with_argument(c, arg)
