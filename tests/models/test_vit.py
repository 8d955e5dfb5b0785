"""The ViT backbones: big_vision's sizes and parameter names, their counts against timm's
published ones, the pooling and position-embedding options, and the npz loader."""
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import register_tiny_vit

from corinfomax_jax import errors
from corinfomax_jax import models
from corinfomax_jax.interop import big_vision
from corinfomax_jax.models import vit
from corinfomax_jax.run import settings
from configs import default


def _shapes(backbone, size):
  return jax.eval_shape(functools.partial(backbone.init, train=False),
                        jax.random.key(0), jnp.zeros((1, size, size, 3)))["params"]


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


# timm's published totals with the 1000-class head (timm model cards: vit_tiny 5.7M,
# vit_small 22.1M, vit_base 86.6M; exact: sum of numel of timm.create_model(name)).
TIMM = {"vit_ti16": (5_717_416, 192), "vit_s16": (22_050_664, 384),
        "vit_b16": (86_567_656, 768)}


@pytest.mark.parametrize("name", sorted(TIMM))
def test_parameter_counts_are_timm_s_less_its_head_and_the_class_token_s_posemb(name):
  timm_total, width = TIMM[name]
  head = width * 1000 + 1000
  # big_vision adds no position embedding to the class token; timm has one more row.
  tok = _count(_shapes(models.create_backbone(name, pool="tok"), 224))
  assert tok == timm_total - head - width
  gap = _count(_shapes(models.create_backbone(name, pool="gap"), 224))
  assert gap == tok - width  # no class token
  # sincos2d: the position embeddings are no parameters (196 patches at 224 px).
  fixed = _count(_shapes(models.create_backbone(name, posemb="sincos2d"), 224))
  assert fixed == gap - 196 * width
  with_head = _count(_shapes(models.create_backbone(name, pool="tok", num_classes=1000),
                             224))
  assert with_head == tok + head


def test_vit_s16_without_head_is_21_7_million():
  assert _count(_shapes(models.create_backbone("vit_s16", pool="tok"), 224)) == 21_665_280


def test_big_vision_parameter_names():
  params = _shapes(models.create_backbone("vit_s16", pool="tok"), 224)
  assert set(params) == {"embedding", "pos_embedding", "cls", "Transformer"}
  assert params["embedding"]["kernel"].shape == (16, 16, 3, 384)
  assert params["pos_embedding"].shape == (1, 196, 384)
  assert params["cls"].shape == (1, 1, 384)
  encoder = params["Transformer"]
  assert set(encoder) == {f"encoderblock_{i}" for i in range(12)} | {"encoder_norm"}
  block = encoder["encoderblock_11"]
  assert set(block) == {"LayerNorm_0", "MultiHeadDotProductAttention_0", "LayerNorm_1",
                        "MlpBlock_0"}
  assert block["MultiHeadDotProductAttention_0"]["query"]["kernel"].shape == (384, 6, 64)
  assert block["MultiHeadDotProductAttention_0"]["out"]["kernel"].shape == (6, 64, 384)
  assert block["MlpBlock_0"]["Dense_0"]["kernel"].shape == (384, 1536)
  assert block["MlpBlock_0"]["Dense_1"]["kernel"].shape == (1536, 384)


@pytest.fixture
def tiny_vit(monkeypatch):
  return register_tiny_vit(monkeypatch)


def test_features_are_the_pooled_tokens(tiny_vit):
  x = jax.random.normal(jax.random.key(1), (3, 32, 32, 3))
  for pool in ("gap", "tok"):
    model = models.create_model(tiny_vit, projector="8", patch_size=4, pool=pool)
    assert models.feature_dim(model) == 16
    variables = model.init(jax.random.key(0), x[:1], train=False)
    backbone = {"params": variables["params"]["backbone"]}
    apply = jax.jit(functools.partial(model.backbone.apply, train=False,
                                      capture_intermediates=True))
    features, inter = apply(backbone, x)
    assert features.shape == (3, 16) and features.dtype == jnp.float32
    # The encoder's tokens, read back: 8x8 patches of 4 px (+ the class token).
    tokens = inter["intermediates"]["Transformer"]["__call__"][0]
    assert tokens.shape == (3, 64 + (pool == "tok"), 16)
    expected = tokens[:, 0] if pool == "tok" else tokens.mean(axis=1)
    np.testing.assert_allclose(features, expected, rtol=1e-6, atol=1e-6)
    # Each image's features depend on that image only (no mixing across the batch).
    alone, _ = apply(backbone, x[1:2])
    np.testing.assert_allclose(alone[0], features[1], rtol=1e-5, atol=1e-5)


def test_sincos2d_position_embeddings():
  pe = vit.posemb_sincos_2d(2, 3, 8)[0]  # 6 patches, row-major; 2 frequencies
  assert pe.shape == (6, 8)
  # Patch (y=1, x=2) is row 5: [sin(x w), cos(x w), sin(y w), cos(y w)], w = (1, 1e-4).
  w = np.array([1.0, 1e-4])
  np.testing.assert_allclose(pe[5], np.concatenate([np.sin(2 * w), np.cos(2 * w),
                                                    np.sin(1 * w), np.cos(1 * w)]),
                             rtol=1e-6)


def test_options_are_checked(tiny_vit):
  with pytest.raises(ValueError, match="pool 'cls' is not supported"):
    models.create_backbone(tiny_vit, pool="cls")
  with pytest.raises(ValueError, match="posemb 'fixed' is not supported"):
    models.create_backbone(tiny_vit, posemb="fixed")
  with pytest.raises(ValueError, match="patch_size 0 must be a positive integer"):
    models.create_backbone(tiny_vit, patch_size=0)
  with pytest.raises(ValueError, match="'vit_test' has no option 'width'"):
    models.create_backbone(tiny_vit, width=8)


def test_the_configs_patch_size_must_divide_the_image_size():
  config = default.get_config()
  default.set_vit(config, "vit_ti16", patch_size=5)
  with pytest.raises(errors.ConfigError, match=re.escape(
      "config.image_size = 32 is invalid: image size 32 is not a multiple of the ViT's "
      "patch size 5")) as e:
    settings.resolve(config)
  assert "\n" not in str(e.value)
  config.model.patch_size = 4
  assert settings.resolve(config).model.kwargs["patch_size"] == 4


def test_a_resnet_key_on_a_vit_is_refused():
  config = default.get_config()
  config.model.backbone = "vit_s16"  # cifar_stem and width still set
  with pytest.raises(errors.ConfigError, match=re.escape(
      "config.model.cifar_stem = True is invalid: backbone 'vit_s16' has no option "
      "'cifar_stem'")):
    settings.resolve(config)


def test_big_vision_npz_of_an_older_layout_loads_with_the_same_features(tiny_vit,
                                                                       tmp_path):
  """An npz as google-research/vision_transformer wrote them (posemb in the encoder,
  the class token's row first) and scanned blocks: same features once loaded."""
  backbone = models.create_backbone(tiny_vit, patch_size=8, pool="tok")
  x = jax.random.normal(jax.random.key(2), (2, 16, 16, 3))
  params = backbone.init(jax.random.key(0), x, train=False)["params"]
  params = jax.tree.map(np.asarray, params)
  params["cls"] = params["cls"] + 0.5  # nonzero, so the fold of the cls row shows
  arrays = big_vision.big_vision_arrays(params)
  cls_row = np.full((1, 1, 16), 0.25, np.float32)
  old = {k: v for k, v in arrays.items() if not k.startswith("Transformer/encoderblock_")}
  old["cls"] = arrays["cls"] - cls_row
  old["Transformer/posembed_input/pos_embedding"] = np.concatenate(
      [cls_row, old.pop("pos_embedding")], axis=1)
  for key in {k.split("/", 2)[2] for k in arrays if k.startswith("Transformer/encoderblock_")}:
    old[f"Transformer/encoderblock/{key}"] = np.stack(
        [arrays[f"Transformer/encoderblock_{i}/{key}"] for i in range(2)])
  old["head/kernel"] = np.zeros((16, 10), np.float32)
  np.savez(tmp_path / "old.npz", **old)
  loaded, left_out = big_vision.load_big_vision_npz(tmp_path / "old.npz",
                                                    _shapes(backbone, 16))
  assert left_out == ["head/kernel"]
  np.testing.assert_allclose(backbone.apply({"params": loaded}, x, train=False),
                             backbone.apply({"params": params}, x, train=False),
                             rtol=1e-5, atol=1e-5)
  # Another patch grid is refused in one line, naming both shapes.
  with pytest.raises(ValueError, match=r"'pos_embedding' has shape \(1, 4, 16\), the "
                                       r"backbone's \(1, 16, 16\)"):
    big_vision.load_big_vision_npz(tmp_path / "old.npz", _shapes(backbone, 32))
