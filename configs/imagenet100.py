"""ImageNet-100, ResNet-18 (paper: 80.48 linear top-1).

imagenet2012 from TFDS restricted to the reference's 100 classes; needs a prepared
--config.data_dir.
"""
from configs import default


def get_config(arg=None):
  c = default.get_config()
  c.dataset = "imagenet100"
  c.eval_split = "validation"
  c.image_size = 224
  c.model.backbone = "resnet18"
  c.model.cifar_stem = False
  c.model.projector = (4096, 4096, 128)
  c.batch_size = c.base_batch_size = 1024
  c.num_epochs = 400
  c.learning_rate = 1.0
  c.min_learning_rate = 5e-3
  c.corinfomax.alpha = 500.0
  c.eval.batch_size = 1024
  return default.with_argument(c, arg)
