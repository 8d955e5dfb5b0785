"""Tests for corinfomax_jax.run.optimizers: lars step for step against a NumPy
transcription of solo-learn's LARS.step (solo/utils/lars.py), and its parts."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from corinfomax_jax.run import optimizers


def _solo_learn_lars_steps(params, grads_per_step, lrs, *, weight_decay, momentum, eta,
                           clip_lr, eps):
  """The parameters after each step of solo-learn's LARS.step (exclude_bias_n_norm=True,
  dampening 0, no Nesterov), written from its arithmetic in float64, one parameter at a
  time, its momentum buffer created from the first update as torch does."""
  params = {k: np.asarray(v, np.float64) for k, v in params.items()}
  buffers, history = {}, []
  for grads, lr in zip(grads_per_step, lrs):
    for name, p in params.items():
      d_p = np.asarray(grads[name], np.float64)
      p_norm, g_norm = np.linalg.norm(p), np.linalg.norm(d_p)
      if p.ndim != 1:
        if p_norm != 0 and g_norm != 0:
          lars_lr = p_norm / (g_norm + p_norm * weight_decay + eps)
          lars_lr *= eta
          if clip_lr:
            lars_lr = min(lars_lr / lr, 1)
          d_p = (d_p + weight_decay * p) * lars_lr
      if momentum != 0:
        if name not in buffers:
          buffers[name] = d_p.copy()
        else:
          buffers[name] = buffers[name] * momentum + d_p
        d_p = buffers[name]
      params[name] = p - lr * d_p
    history.append({k: v.copy() for k, v in params.items()})
  return history


def _problem(seed=0, steps=6):
  rng = np.random.default_rng(seed)
  params = {"conv": rng.normal(size=(3, 3, 4, 8)).astype(np.float32),
            "dense": rng.normal(size=(16, 5)).astype(np.float32) * 0.05,
            "bias": rng.normal(size=(5,)).astype(np.float32),
            "bn_scale": np.ones((8,), np.float32),
            "zero": np.zeros((4, 4), np.float32)}  # ||p|| = 0: plain SGD
  # Gradients of very different scales, so that the clip binds for some layers and
  # steps and not for others; one all-zero gradient (||g|| = 0).
  scales = {"conv": 1e-3, "dense": 10.0, "bias": 1.0, "bn_scale": 0.1, "zero": 1.0}
  grads = []
  for t in range(steps):
    g = {k: (rng.normal(size=v.shape) * scales[k]).astype(np.float32)
         for k, v in params.items()}
    if t == 2:
      g["dense"] = np.zeros_like(g["dense"])
    grads.append(g)
  return params, grads


@pytest.mark.parametrize("clip_lr", [True, False])
@pytest.mark.parametrize("momentum", [0.9, 0.0])
def test_lars_equals_solo_learns_step_for_step(clip_lr, momentum):
  params, grads = _problem()
  schedule = optax.linear_schedule(0.05, 0.4, 5)  # the clip sees each step's own lr
  lrs = [float(schedule(t)) for t in range(len(grads))]
  kwargs = dict(weight_decay=1e-4, momentum=momentum, eta=0.02, clip_lr=clip_lr,
                eps=1e-8)
  expected = _solo_learn_lars_steps(params, grads, lrs, **kwargs)

  tx = optimizers.lars(schedule, **kwargs)
  update = jax.jit(tx.update)
  p = jax.tree.map(jnp.asarray, params)
  state = tx.init(p)
  worst = 0.0
  for t, g in enumerate(grads):
    updates, state = update(jax.tree.map(jnp.asarray, g), state, p)
    p = optax.apply_updates(p, updates)
    for name in params:
      got, want = np.asarray(p[name], np.float64), expected[t][name]
      scale = np.abs(want).max() + 1e-12
      worst = max(worst, np.abs(got - want).max() / scale)
      np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-6 * scale,
                                 err_msg=f"{name} after step {t + 1}")
  assert int(state.count) == len(grads)
  print(f"worst relative difference {worst:.2e}")


def test_lars_leaves_vectors_and_zero_norms_to_plain_sgd():
  """1-D parameters, a zero parameter and a zero gradient get lr * g: no decay, no trust
  ratio (the first step, so momentum has not yet accumulated)."""
  params, grads = _problem()
  grads = grads[2]  # "dense" has a zero gradient at this step
  lr = 0.3
  tx = optimizers.lars(lr, weight_decay=0.5, eta=0.02)
  updates, _ = tx.update(grads, tx.init(params), params)
  for name in ("bias", "bn_scale", "zero", "dense"):
    np.testing.assert_allclose(updates[name], -lr * grads[name], rtol=1e-6, err_msg=name)
  # A matrix with both norms positive is rescaled: its update is not -lr * g.
  assert not np.allclose(updates["conv"], -lr * grads["conv"])


def test_clipped_lars_steps_by_the_smaller_of_eta_trust_and_lr():
  p = {"w": jnp.full((4, 4), 2.0)}

  def eta_trust(g):  # eta * ||p|| / (||g|| + eps), no weight decay
    return 0.02 * float(jnp.linalg.norm(p["w"])) / (float(jnp.linalg.norm(g["w"])) + 1e-8)

  for grad_scale in (1e-6, 1e3):  # eta * trust far above, then far below lr
    g = {"w": jnp.full((4, 4), grad_scale)}
    tx = optimizers.lars(0.1, weight_decay=0.0, momentum=0.0, eta=0.02)
    updates, _ = tx.update(g, tx.init(p), p)
    np.testing.assert_allclose(updates["w"], -min(eta_trust(g), 0.1) * g["w"], rtol=1e-5)
  # Without the clip the adapted rate is lr * eta * trust, whatever its size.
  g = {"w": jnp.full((4, 4), 1e-6)}
  tx = optimizers.lars(0.1, weight_decay=0.0, momentum=0.0, clip_lr=False)
  updates, _ = tx.update(g, tx.init(p), p)
  np.testing.assert_allclose(updates["w"], -0.1 * eta_trust(g) * g["w"], rtol=1e-5)


def test_lars_at_learning_rate_zero_does_not_move_or_produce_nan():
  params, grads = _problem()
  tx = optimizers.lars(optax.linear_schedule(0.0, 0.3, 10), weight_decay=1e-4)
  updates, state = tx.update(grads[0], tx.init(params), params)
  for leaf in jax.tree.leaves((updates, state)):
    assert np.all(np.isfinite(np.asarray(leaf)))
  for leaf in jax.tree.leaves(updates):
    np.testing.assert_array_equal(leaf, 0)


def test_lars_needs_the_parameters():
  tx = optimizers.lars(0.1, weight_decay=0.0)
  params = {"w": jnp.ones((2, 2))}
  with pytest.raises(ValueError, match="needs the parameters"):
    tx.update(params, tx.init(params))


def _vit_like_params():
  """A parameter tree with every kind of leaf a ViT and the projector have."""
  rng = np.random.default_rng(0)
  leaf = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  return {
      "backbone": {
          "embedding": {"kernel": leaf(4, 4, 3, 8), "bias": leaf(8)},
          "pos_embedding": leaf(1, 4, 8), "cls": leaf(1, 1, 8),
          "Transformer": {"encoderblock_0": {
              "LayerNorm_0": {"scale": leaf(8), "bias": leaf(8)},
              "MultiHeadDotProductAttention_0": {"query": {"kernel": leaf(8, 2, 4),
                                                           "bias": leaf(2, 4)}},
              "MlpBlock_0": {"Dense_0": {"kernel": leaf(8, 16), "bias": leaf(16)}}},
              "encoder_norm": {"scale": leaf(8), "bias": leaf(8)}}},
      "projector": {"linear0": {"kernel": leaf(8, 4), "bias": leaf(4)},
                    "bn0": {"scale": leaf(4), "bias": leaf(4)},
                    "linear1": {"kernel": leaf(4, 2)}},
  }


def test_weight_decay_mask_keeps_kernels_only():
  params = _vit_like_params()
  mask = optimizers.decay_mask(params)
  flat = {"/".join(str(k.key) for k in path): m
          for path, m in jax.tree_util.tree_leaves_with_path(mask)}
  decayed = sorted(k for k, m in flat.items() if m)
  assert decayed == [
      "backbone/Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel",
      "backbone/Transformer/encoderblock_0/MultiHeadDotProductAttention_0/query/kernel",
      "backbone/embedding/kernel", "projector/linear0/kernel", "projector/linear1/kernel"]
  # Among those left out: 3-D position embeddings and class token, a 2-D attention bias.
  for key in ("backbone/pos_embedding", "backbone/cls",
              "backbone/Transformer/encoderblock_0/MultiHeadDotProductAttention_0/query/bias",
              "backbone/Transformer/encoderblock_0/LayerNorm_0/scale",
              "projector/bn0/bias"):
    assert flat[key] is False, key


def test_adamw_equals_torch_adamw_arithmetic_and_decays_kernels_only():
  """Two steps of optimizers.adamw against torch.optim.AdamW's update written in NumPy
  (bias-corrected moments; p <- p - lr * (m_hat / (sqrt(v_hat) + eps) + wd * p)), with
  weight decay only where decay_mask is True."""
  params = _vit_like_params()
  rng = np.random.default_rng(1)
  grads = [jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32),
                        params) for _ in range(2)]
  lr, wd, b1, b2, eps = 1e-2, 0.1, 0.9, 0.95, 1e-8
  tx = optimizers.adamw(lr, weight_decay=wd, b1=b1, b2=b2, eps=eps)
  state, ours = tx.init(params), params
  for g in grads:
    updates, state = tx.update(g, state, ours)
    ours = optax.apply_updates(ours, updates)
  mask = optimizers.decay_mask(params)

  def reference(p, m_decay, g1, g2):
    p = np.asarray(p, np.float64)
    m = v = 0.0
    for t, g in enumerate((g1, g2), start=1):
      g = np.asarray(g, np.float64)
      m = b1 * m + (1 - b1) * g
      v = b2 * v + (1 - b2) * g * g
      step = (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
      p = p - lr * (step + (wd * p if m_decay else 0.0))
    return p

  expected = jax.tree.map(reference, params, mask, grads[0], grads[1])
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  # The position embeddings moved by Adam alone; the same step with decay would differ.
  no_decay = reference(params["backbone"]["pos_embedding"], False, grads[0]["backbone"][
      "pos_embedding"], grads[1]["backbone"]["pos_embedding"])
  np.testing.assert_allclose(ours["backbone"]["pos_embedding"], no_decay, rtol=1e-5)


def test_clipped_scales_the_gradient_to_the_global_norm_and_keeps_the_state():
  params = {"w": jnp.ones((3,)), "b": jnp.ones((4,))}
  grads = {"w": jnp.full((3,), 3.0), "b": jnp.full((4,), 4.0)}  # global norm sqrt(91)
  sgd = optax.sgd(1.0)
  tx = optimizers.clipped(sgd, max_norm=1.0)
  assert jax.tree.structure(tx.init(params)) == jax.tree.structure(sgd.init(params))
  updates, _ = tx.update(grads, tx.init(params), params)
  assert float(optax.tree.norm(updates)) == pytest.approx(1.0, rel=1e-6)
  np.testing.assert_allclose(updates["w"], -3.0 / np.sqrt(91.0), rtol=1e-6)
  # Below the bound the gradient passes unchanged.
  updates, _ = optimizers.clipped(sgd, max_norm=100.0).update(grads, sgd.init(params))
  np.testing.assert_allclose(updates["b"], -4.0)
