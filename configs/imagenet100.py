"""ImageNet-100, ResNet-18 (paper: 80.48 linear top-1).

imagenet2012 from TFDS restricted to the reference's 100 classes; needs a prepared
--config.data_dir.

A cheap kNN monitor runs every 20 epochs during pretraining (TensorBoard knn/top1): a
bank of 10,000 train images and 5,000 validation queries (the whole ImageNet-100
validation split), each spread evenly over its split (eval.knn.monitor_*;
--mode=knn_eval still uses the whole train split). Expected range: no online-kNN figures
are published for this setting that we know of; solo-learn's README publishes the
online linear probe's top-1 after 400 epochs of ResNet-18 (Barlow Twins 79.70, VICReg
79.22), which is not a kNN figure, and a 10,000-image bank reads lower than the full
126,689-image one.
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
  c.eval.knn.every_epochs = 20
  c.eval.knn.monitor_max_train_examples = 10000
  c.eval.knn.monitor_max_test_examples = 5000
  return default.with_argument(c, arg)
