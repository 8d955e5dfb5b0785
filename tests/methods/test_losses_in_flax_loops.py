"""The loss as a user imports it: inside small Flax Linen and Flax NNX training loops
that carry the CorInfoMax state themselves."""


import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import corinfomax_jax as cim

LOSS_KW = dict(alpha=25.0, la_R=0.5, la_mu=0.5, eps=1e-8, normalize=True)
STEPS, BATCH, IN_DIM, OUT_DIM = 40, 64, 16, 8


def two_view_batches(seed):
  """Two noisy views of low-dimensional latent points."""
  rng = np.random.default_rng(seed)
  mix = rng.normal(size=(4, IN_DIM))
  for _ in range(STEPS):
    x = rng.normal(size=(BATCH, 4)) @ mix
    yield ((x + 0.3 * rng.normal(size=x.shape)).astype(np.float32),
           (x + 0.3 * rng.normal(size=x.shape)).astype(np.float32))


def replayed_state(z_pairs):
  """The moving estimates recomputed in float64 from the projections seen at each step."""
  mu1 = mu2 = np.zeros(OUT_DIM)
  cov1 = cov2 = np.eye(OUT_DIM)
  la_R, la_mu = LOSS_KW["la_R"], LOSS_KW["la_mu"]
  for z1, z2 in z_pairs:
    new = []
    for z, mu, cov in ((z1, mu1, cov1), (z2, mu2, cov2)):
      z = np.asarray(z, np.float64)
      z = z / np.linalg.norm(z, axis=1, keepdims=True)
      mu = la_mu * mu + (1 - la_mu) * z.mean(0)
      cov = la_R * cov + (1 - la_R) * (z - mu).T @ (z - mu) / len(z)
      new.append((mu, cov))
    (mu1, cov1), (mu2, cov2) = new
  return mu1, mu2, cov1, cov2


def check_loop(losses, state, z_pairs):
  assert np.all(np.isfinite(losses))
  # The first steps move the estimate away from R_ini = I (la_R = 0.5 halves its
  # weight each step); from then on training must lower the loss.
  assert np.mean(losses[-5:]) < np.mean(losses[8:13]) - 0.5, losses
  for got, want in zip(state, replayed_state(z_pairs)):
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-4, atol=1e-5)


# --- Flax Linen: the same code as the README's example. --------------------------
class Encoder(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(64)(x))
    return nn.Dense(OUT_DIM)(x)


def test_linen_training_loop():
  model = Encoder()
  params = model.init(jax.random.key(0), jnp.zeros((1, IN_DIM)))
  tx = optax.adam(1e-2)
  opt_state = tx.init(params)
  cov_state = cim.init_state(OUT_DIM)

  @jax.jit
  def train_step(params, opt_state, cov_state, x1, x2):

    def loss_fn(params):
      z1, z2 = model.apply(params, x1), model.apply(params, x2)
      loss, new_cov_state, metrics = cim.corinfomax_loss(z1, z2, cov_state, **LOSS_KW)
      return loss, (new_cov_state, (z1, z2))

    (loss, (cov_state, zs)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, cov_state, loss, zs

  losses, z_pairs = [], []
  for x1, x2 in two_view_batches(0):
    params, opt_state, cov_state, loss, zs = train_step(params, opt_state, cov_state, x1, x2)
    losses.append(float(loss))
    z_pairs.append(zs)
  check_loop(np.array(losses), cov_state, z_pairs)


# --- Flax NNX. ---------------------------------------------------------------------
class NNXEncoder(nnx.Module):

  def __init__(self, rngs: nnx.Rngs):
    self.hidden = nnx.Linear(IN_DIM, 64, rngs=rngs)
    self.out = nnx.Linear(64, OUT_DIM, rngs=rngs)

  def __call__(self, x):
    return self.out(nnx.relu(self.hidden(x)))


def test_nnx_training_loop():
  model = NNXEncoder(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
  cov_state = cim.init_state(OUT_DIM)

  @nnx.jit
  def train_step(model, optimizer, cov_state, x1, x2):

    def loss_fn(model):
      z1, z2 = model(x1), model(x2)
      loss, new_cov_state, _ = cim.corinfomax_loss(z1, z2, cov_state, **LOSS_KW)
      return loss, (new_cov_state, (z1, z2))

    (loss, (cov_state, zs)), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    optimizer.update(model, grads)
    return cov_state, loss, zs

  losses, z_pairs = [], []
  for x1, x2 in two_view_batches(1):
    cov_state, loss, zs = train_step(model, optimizer, cov_state, x1, x2)
    losses.append(float(loss))
    z_pairs.append(zs)
  check_loop(np.array(losses), cov_state, z_pairs)


# --- VICReg and Barlow Twins: the README's loop, with no state to carry. ----------
def _stateless_loop(loss_fn, seed=0):
  """The README's Flax Linen loop for a loss without state: (losses, last loss's terms)."""
  model, tx = Encoder(), optax.adam(1e-2)
  params = model.init(jax.random.key(seed), jnp.zeros((1, IN_DIM)))
  opt_state = tx.init(params)

  @jax.jit
  def train_step(params, opt_state, x1, x2):
    def objective(params):
      return loss_fn(model.apply(params, x1), model.apply(params, x2))
    (loss, metrics), grads = jax.value_and_grad(objective, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, metrics

  losses = []
  for x1, x2 in two_view_batches(seed):
    params, opt_state, loss, metrics = train_step(params, opt_state, x1, x2)
    losses.append(float(loss))
  return np.asarray(losses), jax.device_get(metrics)


def test_vicreg_loss_trains_in_a_flax_loop():
  losses, metrics = _stateless_loop(cim.vicreg_loss)
  assert np.all(np.isfinite(losses))
  assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5]), losses
  # Not collapsed: the variance hinge is far below its value at zero variance (1).
  assert metrics["var_loss"] < 0.5


def test_barlow_twins_loss_trains_in_a_flax_loop():
  losses, metrics = _stateless_loop(cim.barlow_twins_loss)
  assert np.all(np.isfinite(losses))
  assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5]), losses
  # The cross-correlation's diagonal approaches 1: (diag - 1)^2 summed over 8 dims.
  assert metrics["on_diag"] < 0.5 * OUT_DIM
