"""configs/cifar10_cpu.py's budget and data with configs/cifar10_vit_ti4.py's network and
optimizer: ViT-Ti/4 at 32 px, 4 epochs of real CIFAR-10 at batch 256 (docs/vit.md).

The same views, steps, projector (512-512-64) and kNN monitor as the ResNet row of
cifar10_cpu, so the two compare like for like; AdamW's lr 5e-4 per 512 images gives
2.5e-4 at batch 256. A ViT-Ti/4 step costs far more than ResNet-18 at 1/8 width: see
docs/vit.md for its images/s and the time the run takes on a CPU.
"""
from configs import cifar10_cpu
from configs import default


def get_config(arg=None):
  c = cifar10_cpu.get_config()
  default.set_vit(c, "vit_ti16", patch_size=4, posemb="sincos2d", pool="gap")
  default.set_adamw(c, learning_rate=5e-4, base_batch_size=512, weight_decay=0.05,
                    warmup_epochs=c.warmup_epochs, grad_clip_norm=1.0)
  return default.with_argument(c, arg)
