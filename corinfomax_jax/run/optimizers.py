"""The pretraining optimizers: SGD as torch.optim.SGD, LARS as solo-learn runs it (both
for ResNets), and AdamW with the weight-decay mask ViT recipes use.

    tx = lars(schedule, weight_decay=1e-4)           # an optax GradientTransformation
    tx = clipped(adamw(schedule, weight_decay=0.05), max_norm=1.0)
    updates, opt_state = tx.update(grads, opt_state, params)

All are optax GradientTransformations of (gradients, state, parameters).
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


def decay_mask(params):
  """True for the parameters weight decay applies to: the kernels of Dense, attention
  and convolution layers. False for everything else: biases, LayerNorm and BatchNorm
  scales and biases, a ViT's position embeddings ("pos_embedding") and class token
  ("cls"), as timm's and big_vision's ViT recipes exclude them."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: getattr(path[-1], "key", None) == "kernel", params)


def adamw(learning_rate, *, weight_decay: float, b1: float = 0.9, b2: float = 0.999,
          eps: float = 1e-8) -> optax.GradientTransformation:
  """torch.optim.AdamW (decoupled decay, p <- p - lr * (adam + weight_decay * p)) with
  the decay on the kernels only (`decay_mask`).

  Args:
    learning_rate: a float or an optax schedule of the step.
    weight_decay: the decoupled decay coefficient (0.05 in DeiT's and MAE's recipes).
    b1, b2, eps: Adam's moment decays and denominator term.

  Returns:
    An optax GradientTransformation; update() needs the parameters.
  """
  return optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                     mask=decay_mask)


def clipped(tx: optax.GradientTransformation, max_norm: float
            ) -> optax.GradientTransformation:
  """`tx` applied to the gradients scaled to a global norm of at most `max_norm`
  (torch.nn.utils.clip_grad_norm_). The state is `tx`'s own, unchanged in structure, so
  a checkpoint written with clipping resumes without it and the other way round."""
  def update(grads, state, params=None):
    norm = optax.tree.norm(grads)
    scale = jnp.minimum(1.0, max_norm / jnp.maximum(norm, 1e-12))
    grads = jax.tree.map(lambda g: (g * scale).astype(g.dtype), grads)
    return tx.update(grads, state, params)

  return optax.GradientTransformation(tx.init, update)


def sgd(learning_rate, *, momentum: float, weight_decay: float = 0.0
        ) -> optax.GradientTransformation:
  """torch.optim.SGD(lr, momentum, weight_decay): the decay joins the gradient before
  momentum, on every parameter, as in the reference. The one SGD of every mode."""
  if not weight_decay:
    return optax.sgd(learning_rate, momentum=momentum or None)
  return optax.chain(optax.add_decayed_weights(weight_decay),
                     optax.sgd(learning_rate, momentum=momentum or None))


class LarsState(NamedTuple):
  """lars's state: the steps taken (the schedule's argument) and the momentum buffer."""
  count: jax.Array
  momentum: Any


def lars(learning_rate, *, weight_decay: float, momentum: float = 0.9, eta: float = 0.02,
         clip_lr: bool = True, eps: float = 1e-8) -> optax.GradientTransformation:
  """LARS as solo-learn's VICReg and Barlow Twins recipes run it (solo/utils/lars.py,
  with exclude_bias_n_norm=True; dampening 0, no Nesterov).

  At step t, with lr = learning_rate(t) (or the constant), for each parameter p with
  gradient g:
    p a matrix (ndim > 1), ||p|| > 0 and ||g|| > 0:
      trust = eta * ||p|| / (||g|| + weight_decay * ||p|| + eps)
      d = (g + weight_decay * p) * (min(trust / lr, 1) if clip_lr else trust)
    otherwise (biases and normalisation parameters, a zero p or g): d = g, with neither
      weight decay nor scaling;
    v = momentum * v + d   (v starts at zero, so the first v is d, as torch's buffer)
    p <- p - lr * v.
  With clip_lr each matrix therefore steps by min(eta * trust, lr) times its decayed
  gradient; optax.lars instead always scales by lr * eta * ||p|| / (||g|| +
  weight_decay * ||p||) and decays biases unless masked.

  Args:
    learning_rate: a float or an optax schedule of the step.
    weight_decay: the L2 coefficient of matrices (inside the trust ratio too).
    momentum: the heavy-ball coefficient (0: none).
    eta: the trust coefficient.
    clip_lr: cap each matrix's adapted rate at the global one (solo-learn's clip_lr).
    eps: added to the trust ratio's denominator.

  Returns:
    An optax GradientTransformation; update() needs the parameters.
  """
  schedule = learning_rate if callable(learning_rate) else (lambda step: learning_rate)

  def init(params):
    return LarsState(count=jnp.zeros((), jnp.int32),
                     momentum=jax.tree.map(jnp.zeros_like, params))

  def update(grads, state, params=None):
    if params is None:
      raise ValueError("lars needs the parameters: tx.update(grads, state, params)")
    lr = jnp.asarray(schedule(state.count), jnp.float32)

    def direction(g, p):
      if p.ndim <= 1:
        return g
      p_norm, g_norm = jnp.linalg.norm(p), jnp.linalg.norm(g)
      trust = eta * p_norm / (g_norm + p_norm * weight_decay + eps)
      if clip_lr:
        trust = jnp.minimum(trust / lr, 1.0)
      adapted = (g + weight_decay * p) * trust.astype(g.dtype)
      return jnp.where((p_norm > 0) & (g_norm > 0), adapted, g)

    directions = jax.tree.map(direction, grads, params)
    buffers = jax.tree.map(lambda v, d: momentum * v + d, state.momentum, directions)
    updates = jax.tree.map(lambda v: (-lr * v).astype(v.dtype), buffers)
    return updates, LarsState(count=optax.safe_increment(state.count), momentum=buffers)

  return optax.GradientTransformation(init, update)
