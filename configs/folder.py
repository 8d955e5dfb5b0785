"""Your own images: an image folder, ResNet-18 at 224 px with ImageNet's views.

  python main.py --config=configs/folder.py:/data/my_images --workdir=DIR

The folder holds root/<split>/<class>/<image> (.jpg, .jpeg, .png), or root/train/<image>
without class folders: unlabelled images serve for pretraining and --mode=embed, while
kNN, the linear probe and fine-tuning need classes. The settings are those of
configs/imagenet100.py (ResNet-18, 4096-4096-128 projector, batch 1024, 400 epochs, the
paper's views and ImageNet's mean and std) without its kNN monitor, which needs labels;
eval_split is "val". --mode=embed reads eval.embed_split, else eval_split, else (when the
folder has no such split) train_split. The path may also be given as
--config.dataset=folder:/data/my_images; after the path, :semi1 or :semi10 as in every
config (configs/folder.py:/data/my_images:semi10).
"""
from configs import default
from configs import imagenet100


def get_config(arg=None):
  root, semi = arg, None
  if arg is not None and arg.rpartition(":")[2] in default.SEMI_PERCENT:
    root, _, semi = arg.rpartition(":")
  elif arg in default.SEMI_PERCENT:
    root, semi = None, arg
  c = imagenet100.get_config()
  # No folder given: settings.resolve says, in one line, how to give it.
  c.dataset = f"folder:{root or ''}"
  c.eval_split = "val"
  c.eval.knn.every_epochs = 0.0  # labelled folders: --config.eval.knn.every_epochs=20
  return default.with_argument(c, semi)
