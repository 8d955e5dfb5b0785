"""ImageNet-1K, ResNet-50 with BatchNorm in the projector (paper: 69.08 linear top-1).

The argument semi1 / semi10 sets --mode=finetune to the paper's semi-supervised
protocol on 1% / 10% of the labels with SimCLR's label lists (default.with_argument),
e.g.
  python main.py --config=configs/imagenet1k.py:semi10 --mode=finetune --workdir=DIR

A cheap kNN monitor runs every 10 epochs during pretraining (TensorBoard knn/top1): a
bank of 10,000 train images and 5,000 validation queries, each spread
evenly over its split (eval.knn.monitor_*; --mode=knn_eval still uses the whole
splits). Expected range: none published for this setting that we know of; a
10,000-image bank reads well below the full 1.28M-image one.
"""
from configs import default


def get_config(arg=None):
  c = default.get_config()
  c.dataset = "imagenet2012"
  c.eval_split = "validation"
  c.image_size = 224
  c.model.backbone = "resnet50"
  c.model.cifar_stem = False
  c.model.projector = (8192, 8192, 512)
  c.model.projector_bn = True
  c.batch_size = c.base_batch_size = 1536
  c.num_epochs = 100
  c.learning_rate = 0.2
  c.min_learning_rate = 1e-6
  c.corinfomax.alpha = 2000.0
  c.corinfomax.la_R = c.corinfomax.la_mu = 0.1
  c.eval.batch_size = 1024
  c.eval.knn.every_epochs = 10
  c.eval.knn.monitor_max_train_examples = 10000
  c.eval.knn.monitor_max_test_examples = 5000
  # The reference's linear protocol for ImageNet-1K: lr 25, x0.1 every 20 epochs.
  c.eval.linear.lr = 25.0
  c.eval.linear.schedule = "step"
  c.eval.linear.step_epochs = 20
  return default.with_argument(c, arg)
