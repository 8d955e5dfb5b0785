"""Defaults shared by every configuration: the paper's CIFAR-10 ResNet-18 setting.

Each file in configs/ imports this and changes a few keys. Every key is read in one
place: corinfomax_jax/run/settings.py checks them all and turns them into typed
sections, each handed only to the part that uses it. Override any key on the command line:
  python main.py --config=configs/cifar10.py --config.batch_size=256 --workdir=DIR
Every config file takes the argument semi1 or semi10 (`with_argument`), which sets
--mode=finetune to the semi-supervised protocol on 1% or 10% of the labels:
  python main.py --config=configs/imagenet100.py:semi10 --mode=finetune --workdir=DIR
"""

import ml_collections
from ml_collections import config_dict

from corinfomax_jax.data import recipe
from corinfomax_jax.errors import ConfigError

# A config file's argument -> the percentage of labels its fine-tuning uses.
SEMI_PERCENT = {"semi1": 1, "semi10": 10}
# The data set whose images SimCLR's 1%/10% lists name (ImageNet-1K's file names).
SIMCLR_LISTS_DATASET = "imagenet2012"


def get_config(arg=None):
  c = ml_collections.ConfigDict()

  # --- Data --------------------------------------------------------------------------
  # A TFDS name (cifar10, cifar100, imagenet2012, ...), "imagenet100", or
  # "folder:<root>" for an image folder root/<split>/<class>/<image>.
  c.dataset = "cifar10"
  # A key that may be unset is a typed placeholder (None until set): the command line
  # can override it, which it cannot for a plain None.
  c.data_dir = config_dict.placeholder(str)  # TFDS data_dir; unset: TFDS's default
  c.train_split = "train"
  c.eval_split = "test"
  c.image_size = 32
  c.skip_bad_images = False  # True: log and count unreadable images instead of failing
  # The paper's augmentation recipe, every number a key (recipe.paper_config): shared
  # keys apply to both views, view1/view2/probe hold what differs from them. mean/std
  # unset: the data set's own (recipe.normalization_stats decides).
  c.aug = ml_collections.ConfigDict({
      **recipe.paper_config(mean=(), std=()),
      "mean": config_dict.placeholder(tuple), "std": config_dict.placeholder(tuple)})

  # --- Model: models.create_model(**c.model) ------------------------------------------
  c.model = ml_collections.ConfigDict()
  # resnet18 | resnet50, or a ViT (vit_ti16 | vit_s16 | vit_b16, docs/vit.md), whose
  # options replace cifar_stem and width: patch_size, posemb, pool (configs/*_vit_*.py).
  c.model.backbone = "resnet18"
  c.model.cifar_stem = True  # 3x3 stride-1 first convolution, no max-pool (32 px images)
  c.model.width = 64  # channels of the first stage; 64 is torchvision's ResNet
  c.model.projector = (2048, 2048, 64)  # hidden sizes then output dimension D
  c.model.projector_bn = False  # BatchNorm after hidden projector layers (ImageNet-1K)
  c.model.dtype = "float32"  # float32 | bfloat16: the network's compute dtype

  # --- Method: config.method names it; its hyperparameters are its own section -------
  # (corinfomax_jax.methods.METHODS). Sections of the methods not chosen must keep their
  # defaults: setting one is refused, so a run never silently ignores a key.
  c.method = "corinfomax"
  # CorInfoMax (the paper's symbols).
  c.corinfomax = ml_collections.ConfigDict()
  c.corinfomax.alpha = 250.0  # weight of the attraction term
  c.corinfomax.la_R = 0.01  # weight of the OLD covariance estimate in the moving average
  c.corinfomax.la_mu = 0.01  # weight of the OLD mean estimate
  c.corinfomax.eps = 1e-8  # diagonal load in logdet(R + eps I)
  c.corinfomax.r_init = 1.0  # R_ini: initial covariance R_ini * I
  c.corinfomax.normalize = True  # L2-normalise projector outputs
  # dtype of the moving mean and covariance and of the log-determinant: "float32", or
  # "float64" as the reference (turns on JAX's x64 mode; not on TPU; see README).
  c.corinfomax.stats_dtype = "float32"
  # VICReg (Bardes et al., 2022; facebookresearch/vicreg main_vicreg.py defaults).
  c.vicreg = ml_collections.ConfigDict()
  c.vicreg.sim_weight = 25.0  # invariance (mean squared error) weight, lambda
  c.vicreg.var_weight = 25.0  # variance hinge weight, mu
  c.vicreg.cov_weight = 1.0  # off-diagonal covariance weight, nu
  c.vicreg.eps = 1e-4  # inside the standard deviation's square root
  # Barlow Twins (Zbontar et al., 2021; facebookresearch/barlowtwins main.py defaults).
  c.barlow_twins = ml_collections.ConfigDict()
  c.barlow_twins.lambd = 0.0051  # weight of the off-diagonal (redundancy) term
  c.barlow_twins.scale = 1.0  # multiplies the whole loss

  # --- Optimisation ------------------------------------------------------------------
  c.batch_size = 512  # GLOBAL batch, over all devices and processes
  c.num_epochs = 1000
  c.max_steps = -1  # stop after this many steps; -1: num_epochs decides
  # sgd (SGD momentum, the paper's) | lars (solo-learn's) | lars_optax | adamw (ViTs;
  # decay on kernels only: not on biases, norms, position embeddings or class token)
  c.optimizer = "sgd"
  c.momentum = 0.9
  c.weight_decay = 1e-4
  # The paper's peak learning rate for its batch size `base_batch_size`; the trainer
  # scales it linearly to the configured global batch: lr * batch_size / base_batch_size.
  c.learning_rate = 0.5
  c.base_batch_size = 512
  c.min_learning_rate = 1e-6  # end of the cosine decay
  c.warmup_epochs = 10.0  # linear warmup from warmup_start_lr to the peak
  c.warmup_start_lr = 3e-3
  c.lars_eta = 0.02  # LARS trust coefficient (optimizer = "lars")
  c.adam_b1 = 0.9  # AdamW's moment decays (optimizer = "adamw")
  c.adam_b2 = 0.999
  c.grad_clip_norm = 0.0  # > 0: gradients clipped to this global norm (any optimizer)

  # --- Bookkeeping -------------------------------------------------------------------
  c.seed = 0
  c.log_every_steps = 50
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 3
  c.spectrum_every_steps = 1000  # covariance spectrum to TensorBoard; PNG at the end
  c.profile_steps = 0  # > 0: a profiler trace of that many steps to the workdir
  # Before every checkpoint the updated state is checked (corinfomax_jax/run/health.py):
  # NaN or infinite values always stop the run unsaved; with `enabled`, so does a
  # parameter global norm above max_norm_ratio times the initial one, or (CorInfoMax)
  # every covariance eigenvalue below floor_factor * eps (the log-determinant at its floor).
  c.divergence = ml_collections.ConfigDict()
  c.divergence.enabled = True
  c.divergence.max_norm_ratio = 1e3
  c.divergence.floor_factor = 10.0

  # --- Evaluation: shared keys, then one section per evaluator ------------------------
  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 512  # feature extraction (kNN, tests of the probes), embed
  # Evaluators that run during pretraining, each at its own section's every_epochs
  # (0: off): "knn", "online_probe".
  c.eval.monitors = ("knn",)
  c.eval.random_init = False  # knn_eval, linear_eval, finetune: the seeded random network
  # Keys that may be unset are typed placeholders, so the command line can set them.
  c.eval.embed_split = config_dict.placeholder(str)  # --mode=embed's split; unset: eval_split
  # kNN (InstDisc's weighted kNN): every k and temperature in one pass; top1/top5 report
  # k = 200, T = 0.07.
  c.eval.knn = ml_collections.ConfigDict()
  c.eval.knn.every_epochs = 0.0  # monitor cadence during pretraining; 0: off
  c.eval.knn.k = (10, 20, 100, 200)
  c.eval.knn.temperature = (0.07,)  # one or several temperatures
  c.eval.knn.max_train_examples = -1  # memory bank size limit; -1: whole split
  # The monitor during pretraining only (--mode=knn_eval keeps the two keys above): at
  # most this many bank (train) and query (eval) images, spread evenly over each split;
  # -1: as max_train_examples, and the whole eval split.
  c.eval.knn.monitor_max_train_examples = -1
  c.eval.knn.monitor_max_test_examples = -1
  # Online linear probe: a Dense on stop-gradient features of view1, trained alongside
  # pretraining with its own SGD (momentum 0.9, constant lr); train top-1 every log step.
  c.eval.online_probe = ml_collections.ConfigDict()
  c.eval.online_probe.enabled = False
  c.eval.online_probe.lr = 0.1
  c.eval.online_probe.every_epochs = 1.0  # test top-1 cadence, when listed in monitors
  # Linear probe (--mode=linear_eval), the paper's protocol.
  c.eval.linear = ml_collections.ConfigDict()
  c.eval.linear.epochs = 100
  c.eval.linear.batch_size = 256
  c.eval.linear.lr = 0.2
  c.eval.linear.min_lr = 2e-3
  c.eval.linear.schedule = "cosine"  # cosine | step (x0.1 every step_epochs) | constant
  c.eval.linear.step_epochs = 20
  c.eval.linear.weight_decay = 0.0
  c.eval.linear.momentum = 0.9
  c.eval.linear.precomputed = False  # faster variant: train on centre-crop features
  c.eval.linear.max_steps = -1  # stop after this many steps; -1: epochs
  # Semi-supervised fine-tuning (--mode=finetune): the whole network on a subset.
  c.eval.finetune = ml_collections.ConfigDict()
  c.eval.finetune.label_fraction = 0.1  # seeded class-balanced share of train_split
  # Or a text file of image file names, one a line (SimCLR's ImageNet 1%/10% lists).
  c.eval.finetune.label_file = config_dict.placeholder(str)
  c.eval.finetune.epochs = 30
  c.eval.finetune.batch_size = 256
  c.eval.finetune.backbone_lr = 0.01
  c.eval.finetune.head_lr = 0.1
  c.eval.finetune.weight_decay = 0.0
  c.eval.finetune.momentum = 0.9  # SGD momentum
  # cosine: each lr to 0 over the epochs; step: each lr times its step_factor every
  # step_epochs epochs (the reference's StepLR).
  c.eval.finetune.schedule = "cosine"
  c.eval.finetune.step_epochs = 5
  c.eval.finetune.backbone_step_factor = 0.2
  c.eval.finetune.head_step_factor = 0.1
  c.eval.finetune.head_init = "zeros"  # zeros | normal: kernel N(0, 0.01^2), bias 0
  # The resize of the training crops and of the test view: bicubic | bilinear.
  c.eval.finetune.crop_interpolation = "bicubic"
  # True: test after every epoch, and finetune.json also reports the best epoch.
  c.eval.finetune.evaluate_every_epoch = False
  c.eval.finetune.max_steps = -1  # stop after this many steps; -1: epochs
  # The folder in the workdir of its checkpoints and events, and of <subdir>.json, its
  # result: runs with different subdirs (semi1, semi10) of one pretraining coexist.
  c.eval.finetune.subdir = "finetune"
  return with_argument(c, arg)


def with_argument(c, arg: str | None):
  """`c` as a config file's argument sets it (--config=configs/<file>.py:<arg>).

  None: `c` unchanged. "semi1" / "semi10": --mode=finetune on 1% / 10% of the labels
  with the paper's protocol (`set_paper_finetune`), its result and checkpoints in
  <workdir>/finetune_semi1/ (or _semi10) and finetune_semi1.json, beside a linear probe
  and each other. SimCLR's label lists name ImageNet-1K images, so they are used for
  config.dataset "imagenet2012" only; any other data set gets a seeded class-balanced
  label_fraction of 0.01 / 0.1 of its train split.
  """
  if arg is None:
    return c
  if arg not in SEMI_PERCENT:
    raise ConfigError(f"the config file argument {arg!r} is not known: accepted "
                      f"{' or '.join(map(repr, SEMI_PERCENT))} (fine-tuning on 1% or 10% "
                      f"of the labels), or none, e.g. --config=configs/imagenet100.py:semi1")
  percent = SEMI_PERCENT[arg]
  set_paper_finetune(c, percent)
  if c.dataset != SIMCLR_LISTS_DATASET:
    c.eval.finetune.label_file = None
  c.eval.finetune.subdir = f"finetune_{arg}"
  return c


def set_vit(c, backbone: str, *, patch_size: int = 16, posemb: str = "learn",
            pool: str = "gap") -> None:
  """config.model for the ViT `backbone` (vit_ti16 | vit_s16 | vit_b16, docs/vit.md): the
  ResNet keys (cifar_stem, width) replaced by the ViT's (patch_size, posemb, pool); the
  projector, its BatchNorm and the dtype stay as they are."""
  del c.model["cifar_stem"]
  del c.model["width"]
  c.model.backbone = backbone
  c.model.patch_size = patch_size
  c.model.posemb = posemb
  c.model.pool = pool


def set_adamw(c, *, learning_rate: float, base_batch_size: int, weight_decay: float,
              warmup_epochs: float, grad_clip_norm: float, min_learning_rate: float = 1e-6,
              b2: float = 0.999) -> None:
  """AdamW (decay on kernels only) with linear warmup from 0 and cosine decay: the
  optimizer of ViT recipes."""
  c.optimizer = "adamw"
  c.learning_rate = learning_rate
  c.base_batch_size = base_batch_size
  c.weight_decay = weight_decay
  c.warmup_epochs = warmup_epochs
  c.warmup_start_lr = 0.0
  c.min_learning_rate = min_learning_rate
  c.adam_b1, c.adam_b2 = 0.9, b2
  c.grad_clip_norm = grad_clip_norm


def set_paper_finetune(c, percent: int) -> None:
  """Sets c.eval.finetune to the paper's semi-supervised protocol on `percent`% (1 or 10)
  of ImageNet's labels: the reference's semi_supervised/evaluate_step.py.

  20 epochs of batch 256, SGD momentum 0.9 without weight decay, lr 0.005 (backbone)
  and 10 (1%) or 20 (10%) (head), each a step every 5 epochs (x0.2 backbone, x0.1
  head); head N(0, 0.01^2), zero bias; bilinear random resized crops + flips and a
  bilinear Resize(8/7 S) + CenterCrop(S) test view (torchvision's default); tested
  after every epoch (finetune.json's best is the paper's figure). label_file: SimCLR's
  list, 1percent.txt or 10percent.txt, read relative to the working directory: download
  it there or set --config.eval.finetune.label_file=<path>.
  """
  head_lr = {1: 10.0, 10: 20.0}
  if percent not in head_lr:
    raise ValueError(f"the paper's semi-supervised protocol is for 1 or 10 percent of "
                     f"the labels, not {percent!r}")
  c.eval.finetune.update(
      label_fraction=percent / 100, label_file=f"{percent}percent.txt", epochs=20,
      batch_size=256, backbone_lr=0.005, head_lr=head_lr[percent], weight_decay=0.0,
      momentum=0.9, schedule="step", step_epochs=5, backbone_step_factor=0.2,
      head_step_factor=0.1, head_init="normal", crop_interpolation="bilinear",
      evaluate_every_epoch=True)
