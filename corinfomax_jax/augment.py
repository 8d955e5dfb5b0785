"""`corinfomax_jax.augment`: the augmentation recipe and its device ops, one public name.

The recipe (the numbers of each view: `data/recipe.py`) and the jax.numpy ops that apply
them on the accelerator (`data/augment.py`) live in two modules; this one names both,
as earlier versions' flat `augment` did:

  from corinfomax_jax import augment
  recipe = augment.resolve("cifar10", None)
  x1 = augment.random_view(crops, key, augment.view_config(recipe, "view1"),
                           mean=recipe["mean"], std=recipe["std"])

No TensorFlow: importing it loads jax only.
"""
# pylint: disable=unused-import
from corinfomax_jax.data.augment import DRAWS
from corinfomax_jax.data.augment import NUM_DRAWS
from corinfomax_jax.data.augment import VIEW_KEYS
from corinfomax_jax.data.augment import blur
from corinfomax_jax.data.augment import color_jitter
from corinfomax_jax.data.augment import gaussian_blur
from corinfomax_jax.data.augment import grayscale
from corinfomax_jax.data.augment import normalize
from corinfomax_jax.data.augment import normalize_uint8
from corinfomax_jax.data.augment import random_view
from corinfomax_jax.data.augment import solarize
from corinfomax_jax.data.augment import view
from corinfomax_jax.data.recipe import ViewSettings
from corinfomax_jax.data.recipe import Views
from corinfomax_jax.data.recipe import check_config
from corinfomax_jax.data.recipe import default_aug_config
from corinfomax_jax.data.recipe import normalization_stats
from corinfomax_jax.data.recipe import paper_config
from corinfomax_jax.data.recipe import resolve
from corinfomax_jax.data.recipe import view_config
from corinfomax_jax.data.recipe import views
from corinfomax_jax.data.recipe import with_overrides
