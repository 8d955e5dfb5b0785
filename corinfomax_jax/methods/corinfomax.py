"""The CorInfoMax objective and its moving-estimate state, in pure jax.numpy.

CorInfoMax (Ozsoy et al., NeurIPS 2022) maximises the correlative information between two
views' projector outputs z1, z2: a Euclidean attraction term keeps the views together and
the log-determinant of each view's feature covariance ("big-bang" term) keeps the features
spread over all dimensions. The covariance is an exponential moving estimate, so the loss
carries state from step to step: `CorInfoMaxState`, an explicit pytree.

The paper's symbols, as they enter here:
  alpha   weight of the attraction (mean squared error) term;
  la_R    forgetting factor of the moving covariance R: the weight of the *old* estimate
          (la_R = 0.01 keeps 1% of it and takes 99% from the current batch);
  la_mu   the same for the moving mean mu;
  eps     the diagonal load in logdet(R + eps I);
  R_ini   the initial covariance, R_ini * I (`r_init` here).

No Flax, no TensorFlow, no I/O: this module is importable anywhere jax is.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from corinfomax_jax.methods.batch_stats import HIGHEST as _HIGHEST
from corinfomax_jax.methods.batch_stats import global_count as _global_count
from corinfomax_jax.methods.batch_stats import check_hyperparameter
from corinfomax_jax.methods.batch_stats import checked_views as _checked_views
from corinfomax_jax.methods.batch_stats import global_sum as _global_sum
from corinfomax_jax.methods.batch_stats import is_number as _is_number



class CorInfoMaxState(NamedTuple):
  """Moving estimates of each branch's mean and covariance.

  mu1, mu2: (D,); cov1, cov2: (D, D); float32, or float64 with stats_dtype=jnp.float64.
  A NamedTuple is a pytree, so the state can live inside a train state, be sharded,
  donated and checkpointed as is.
  """
  mu1: jax.Array
  mu2: jax.Array
  cov1: jax.Array
  cov2: jax.Array


def checked_stats_dtype(fn: str, name: str, dtype) -> np.dtype:
  """np.dtype(dtype) if it is float32, or float64 where this process can compute in it.

  Without x64 mode jax silently turns float64 arrays into float32, so that case is
  refused rather than run at a precision the caller did not ask for.
  """
  given = dtype
  try:
    dtype = np.dtype(dtype)
  except TypeError:
    dtype = None
  if dtype not in (np.float32, np.float64):
    raise ValueError(f"{fn}: {name} = {given!r} is invalid: expected jnp.float32 or "
                     "jnp.float64 (or their names, 'float32' and 'float64')")
  if dtype == np.float64:
    if jax.default_backend() == "tpu":
      raise ValueError(f"{fn}: {name}=float64 is not available on TPU: TPUs have no "
                       "float64; use float32")
    if jax.dtypes.canonicalize_dtype(np.float64) != np.float64:
      raise ValueError(
          f"{fn}: {name}=float64 needs JAX's x64 mode, which is off (arrays would "
          "silently be float32): call jax.config.update(\"jax_enable_x64\", True) at "
          "start-up or set JAX_ENABLE_X64=1")
  return dtype


def _concrete(value) -> float | None:
  """`value` as a float when it is a Python or NumPy number or a concrete real scalar
  array; None for a traced value (it cannot be checked) or anything else."""
  if _is_number(value):
    return float(value)
  if isinstance(value, jax.core.Tracer):
    return None
  try:
    array = np.asarray(value)
  except Exception:  # pylint: disable=broad-except
    return None
  return float(array) if array.shape == () and array.dtype.kind in "fiu" else None


def init_state(dim: int, r_init: float = 1.0, dtype=jnp.float32) -> CorInfoMaxState:
  """The state before the first step: zero means and covariances r_init * I (R_ini),
  of `dtype` (float32, or float64 for corinfomax_loss's stats_dtype=jnp.float64)."""
  if isinstance(dim, bool) or not _is_number(dim) or int(dim) != dim or dim < 1:
    raise ValueError(f"init_state: dim must be a positive integer, got {dim!r}")
  if isinstance(r_init, bool) or not np.isfinite(r_init) or r_init <= 0:
    raise ValueError(
        f"init_state: r_init must be a positive finite number, got {r_init!r}")
  dtype = checked_stats_dtype("init_state", "dtype", dtype)
  zeros = jnp.zeros((dim,), dtype)
  cov = r_init * jnp.eye(dim, dtype=dtype)
  return CorInfoMaxState(mu1=zeros, mu2=zeros, cov1=cov, cov2=cov)


# ---------------------------------------------------------------------------------
# A log-determinant for symmetric positive definite matrices that cannot return NaN.
# ---------------------------------------------------------------------------------


def psd_logdet(a: jax.Array, floor: float) -> jax.Array:
  """log det(a) for a symmetric matrix that is positive definite in exact arithmetic.

  The fast path is a Cholesky factorisation. In float32 a matrix whose smallest
  eigenvalues sit near `floor` (a collapsed representation, eps = 1e-8) can lose its
  positive definiteness to rounding, and Cholesky then returns NaN; in that case the
  determinant is taken from the symmetric eigenvalues clipped at `floor`, which is
  where the exact eigenvalues lie (a = R + floor * I with R positive semi-definite).
  The gradient is a^-1 (of the clipped matrix on the fallback path), symmetric.
  """
  return psd_logdet_and_fallback(a, floor)[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def psd_logdet_and_fallback(a: jax.Array, floor: float) -> tuple[jax.Array, jax.Array]:
  """(psd_logdet(a, floor) in a's dtype, 1.0 if it took the eigenvalue path else 0.0
  as float32).

  One Cholesky decides both: the flag is the test that chose the path. It carries no
  gradient.
  """
  (logdet, fell_back), _ = _psd_logdet_fwd(a, floor)
  return logdet, fell_back


def _psd_logdet_fwd(a, floor):
  a = 0.5 * (a + a.T)
  chol = jnp.linalg.cholesky(a)
  chol_ok = jnp.all(jnp.isfinite(chol)) & jnp.all(jnp.diagonal(chol) > 0)

  def from_cholesky(_):
    eye = jnp.eye(a.shape[-1], dtype=a.dtype)
    inv = jax.scipy.linalg.cho_solve((chol, True), eye)
    return 2.0 * jnp.sum(jnp.log(jnp.diagonal(chol))), inv

  def from_eigenvalues(_):
    w, v = jnp.linalg.eigh(a)
    w = jnp.maximum(w, jnp.asarray(floor, a.dtype))
    inv = jnp.matmul(v / w, v.T, precision=_HIGHEST)
    return jnp.sum(jnp.log(w)), inv

  logdet, inv = jax.lax.cond(chol_ok, from_cholesky, from_eigenvalues, None)
  fell_back = jnp.logical_not(chol_ok).astype(jnp.float32)
  return (logdet, fell_back), 0.5 * (inv + inv.T)


def _psd_logdet_bwd(floor, inv, g):
  del floor
  g_logdet, _ = g  # the flag is a count, not a function of a
  return (g_logdet * inv,)


psd_logdet_and_fallback.defvjp(_psd_logdet_fwd, _psd_logdet_bwd)


# ---------------------------------------------------------------------------------
# The loss.
# ---------------------------------------------------------------------------------


def l2_normalize(z: jax.Array, eps: float = 1e-12) -> jax.Array:
  """Rows divided by their L2 norm, floored at eps (torch.nn.functional.normalize)."""
  # Flooring the squared norm keeps the gradient finite for an all-zero row.
  sq_norm = jnp.sum(z * z, axis=-1, keepdims=True)
  return z * jax.lax.rsqrt(jnp.maximum(sq_norm, eps * eps))


def _branch_update(z, mu, cov, la_R, la_mu, axis_name):
  """One branch's moving mean and covariance after seeing the batch z (N, D)."""
  n = _global_count(z.shape[0], axis_name)
  batch_mean = _global_sum(z, axis_name) / n
  mu_new = la_mu * mu + (1.0 - la_mu) * batch_mean
  # The batch covariance is centred on the *updated* moving mean and divided by N, as
  # the reference does. It is written with a constant shift c = mu_new (value only):
  #   sum_n (z_n - m)(z_n - m)^T = sum_n (z_n - c)(z_n - c)^T
  #                                - N (b - c)(m - c)^T - N (m - c)(b - c)^T
  #                                + N (m - c)(m - c)^T,   b = batch mean, m = mu_new,
  # an identity for any constant c. With c = m its value is the centred sum, accurate
  # in float32, while the gradient through m enters only through global sums. So no
  # all-reduced value is consumed by per-device work, which keeps the gradient right
  # under pmap and vmap too, where psum's transpose cannot tell a replicated cotangent
  # from a per-device one.
  c = jax.lax.stop_gradient(mu_new)
  zc = z - c
  local_scatter = jnp.matmul(zc.T, zc, precision=_HIGHEST)
  scatter = _global_sum(local_scatter[None], axis_name)
  db, dm = batch_mean - c, mu_new - c
  batch_cov = scatter / n - jnp.outer(db, dm) - jnp.outer(dm, db) + jnp.outer(dm, dm)
  cov_new = la_R * cov + (1.0 - la_R) * batch_cov
  return mu_new, cov_new


def corinfomax_loss(z1: jax.Array,
                    z2: jax.Array,
                    state: CorInfoMaxState,
                    alpha: float = 250.0,
                    la_R: float = 0.01,
                    la_mu: float = 0.01,
                    eps: float = 1e-8,
                    normalize: bool = True,
                    axis_name=None,
                    stats_dtype=jnp.float32):
  """The CorInfoMax loss of a batch of view pairs, and the updated moving estimates.

  For each branch b with z_b of shape (N, D):
    z_b   <- z_b / ||z_b||                           (rows, if `normalize`)
    mu_b' = la_mu * mu_b + (1 - la_mu) * mean_N(z_b)
    R_b'  = la_R * R_b + (1 - la_R) * (z_b - mu_b')^T (z_b - mu_b') / N
  and
    cov_loss = -(logdet(R_1' + eps I) + logdet(R_2' + eps I)) / D
    sim_loss = mean over N and D of (z_1 - z_2)^2
    loss     = alpha * sim_loss + cov_loss.

  la_R and la_mu weight the OLD estimate, as in the paper's code: 0.01 keeps 1% of the
  previous state. Gradients flow through the current batch's mean and covariance, not
  through the previous state; the returned state has its gradient stopped.

  N is the global batch. Under `jax.jit` with z sharded over devices, the sums above
  cover all devices (the compiler inserts the reductions). Inside `shard_map` or `pmap`
  pass the mapped `axis_name`: per-device partial sums are then combined with `psum`,
  so value and gradient equal the global computation.

  Statistics are computed in `stats_dtype` whatever the dtype of z (e.g. bfloat16):
  float32, or float64 as the reference keeps R and mu (needs x64 mode; not on TPU). The
  loss and metrics are float32 either way and z's gradient has z's dtype.

  A NaN or infinity in z enters the returned state, which carries it for many steps
  (with la_R = 0.01 its weight shrinks only 100-fold a step, and NaN never shrinks):
  a NaN loss must stop training before that state is saved, as the trainer's NaN guard
  (loop.ReportProgress.flush, run by loop.Checkpoint before each save) does.

  Raises TypeError for complex z or a state that is not a CorInfoMaxState; ValueError
  if z1 or z2 is not 2-D, if their shapes differ, for an `axis_name` that no enclosing
  map binds, for a state of another D, for a global batch N < 2 (no covariance; a local
  shard of one under `axis_name` is fine), or for la_R, la_mu outside [0, 1) or eps < 0
  given as Python numbers (traced values are not checked), and for a stats_dtype other
  than float32 and float64, or float64 without x64 mode or on TPU.

  Args:
    z1, z2: (N, D) projector outputs of the two views (the local shard under
      `axis_name`): arrays or (nested) lists; integer and boolean values become float32.
    state: the moving estimates from the previous step (`init_state(D)` at the start).
    alpha: weight of the attraction term.
    la_R, la_mu: forgetting factors, the weights of the old covariance and mean.
    eps: diagonal load added before the log-determinant.
    normalize: L2-normalise the rows of z1 and z2 first.
    axis_name: the mapped axis (or tuple of axes) over which the batch is split, or
      None when z holds the whole batch (also when it is a sharded global array).
    stats_dtype: the dtype of the moving and batch statistics, the log-determinants
      and the returned state: jnp.float32 or jnp.float64.

  Returns:
    (loss, new_state, metrics) with metrics a dict of float32 scalars: "loss",
    "cov_loss", "sim_loss", "logdet1", "logdet2", and "cholesky_fallbacks": how many
    of the two log-determinants (0, 1 or 2) Cholesky could not factor, so
    that they came from clipped eigenvalues (see psd_logdet).
  """
  z1, z2, n = _checked_views("corinfomax_loss", z1, z2, axis_name)
  if not isinstance(state, CorInfoMaxState):
    raise TypeError(
        f"corinfomax_loss: state must be a CorInfoMaxState, got {type(state).__name__}; "
        f"create it with init_state(D) (here init_state({z1.shape[1]})) and pass on the "
        "state each step returns")
  dim = z1.shape[1]
  if state.cov1.shape != (dim, dim):
    raise ValueError(
        f"corinfomax_loss: state is for dimension {state.cov1.shape[0]} but z has "
        f"D={dim}; create it with init_state({dim})")
  # Python numbers and concrete arrays are checked; traced values (a schedule under
  # jit) cannot be.
  alpha_, la_R_, la_mu_, eps_ = (_concrete(v) for v in (alpha, la_R, la_mu, eps))
  if alpha_ is not None and not (np.isfinite(alpha_) and alpha_ >= 0):
    raise ValueError(f"corinfomax_loss: alpha = {alpha_!r} must be a finite number >= 0 "
                     "(the weight of the attraction term)")
  for name, number in (("la_R", la_R_), ("la_mu", la_mu_)):
    if number is not None and not 0 <= number < 1:
      raise ValueError(f"corinfomax_loss: {name} = {number!r} must be in [0, 1) (the "
                       "weight of the previous estimate)")
  if eps_ is not None and not (np.isfinite(eps_) and eps_ >= 0):
    raise ValueError(f"corinfomax_loss: eps = {eps_!r} must be a finite number >= 0")
  stats_dtype = checked_stats_dtype("corinfomax_loss", "stats_dtype", stats_dtype)
  # astype's transpose casts z's gradient back to z's dtype.
  z1 = z1.astype(stats_dtype)
  z2 = z2.astype(stats_dtype)
  if normalize:
    z1 = l2_normalize(z1)
    z2 = l2_normalize(z2)
  state = jax.tree.map(lambda x: jax.lax.stop_gradient(x.astype(stats_dtype)), state)

  mu1, cov1 = _branch_update(z1, state.mu1, state.cov1, la_R, la_mu, axis_name)
  mu2, cov2 = _branch_update(z2, state.mu2, state.cov2, la_R, la_mu, axis_name)

  eye = jnp.eye(dim, dtype=stats_dtype)
  floor = float(max(eps, np.finfo(stats_dtype).tiny))
  logdet1, fell_back1 = psd_logdet_and_fallback(cov1 + eps * eye, floor)
  logdet2, fell_back2 = psd_logdet_and_fallback(cov2 + eps * eye, floor)
  cov_loss = -(logdet1 + logdet2) / dim

  sim_loss = jnp.sum(_global_sum((z1 - z2)**2, axis_name)) / (n * dim)
  loss = alpha * sim_loss + cov_loss

  new_state = jax.lax.stop_gradient(CorInfoMaxState(mu1, mu2, cov1, cov2))
  metrics = {
      "loss": loss,
      "cov_loss": cov_loss,
      "sim_loss": sim_loss,
      "logdet1": logdet1,
      "logdet2": logdet2,
      "cholesky_fallbacks": fell_back1 + fell_back2,
  }
  # float32 out whatever stats_dtype, so that the caller's gradients keep their dtype.
  metrics = {k: v.astype(jnp.float32) for k, v in metrics.items()}
  return metrics["loss"], new_state, metrics


# ---------------------------------------------------------------------------------
# The spectrum of a moving covariance: dimensional collapse at a glance.
# ---------------------------------------------------------------------------------


class Spectrum(NamedTuple):
  """Eigenvalues of a covariance (descending) and summaries of them."""
  eigenvalues: jax.Array
  effective_rank: jax.Array
  max_eigenvalue: jax.Array
  min_eigenvalue: jax.Array
  num_below: jax.Array
  num_above: jax.Array


def covariance_spectrum(cov: jax.Array,
                        low: float = 1e-8,
                        high: float = 1e-1) -> Spectrum:
  """The eigenvalues of a symmetric covariance and how collapsed they are.

  effective_rank is exp(entropy) of the eigenvalues normalised to sum to one (Roy and
  Vetterli, 2007): D for an isotropic covariance, 1 for a rank-one one. num_below and
  num_above count eigenvalues under `low` and over `high` (the reference logs both,
  with 1e-8 and 1e-1).
  """
  cov = jnp.asarray(cov, jnp.float32)
  cov = 0.5 * (cov + cov.T)
  w = jnp.linalg.eigvalsh(cov)[::-1]
  p = jnp.maximum(w, 0.0)
  p = p / jnp.maximum(jnp.sum(p), np.finfo(np.float32).tiny)
  entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0))
  return Spectrum(
      eigenvalues=w,
      effective_rank=jnp.exp(entropy),
      max_eigenvalue=w[0],
      min_eigenvalue=w[-1],
      num_below=jnp.sum(w < low),
      num_above=jnp.sum(w > high),
  )


# ---------------------------------------------------------------------------------
# The method as the trainer uses it (methods.METHODS): its hyperparameters, its state.
# ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CorInfoMax:
  """CorInfoMax for the trainer: the fields are the keys of `config.corinfomax`."""
  alpha: float = 250.0  # weight of the attraction term
  la_R: float = 0.01  # weight of the OLD covariance estimate
  la_mu: float = 0.01  # weight of the OLD mean estimate
  eps: float = 1e-8  # diagonal load of the log-determinant
  r_init: float = 1.0  # R_ini: the initial covariance R_ini * I
  normalize: bool = True  # L2-normalise the projector outputs
  stats_dtype: str = "float32"  # of the statistics and state: "float32" or "float64"
  name: ClassVar[str] = "corinfomax"

  def __post_init__(self):
    check_hyperparameter(self.name, "alpha", self.alpha)
    check_hyperparameter(self.name, "la_R", self.la_R, high=1.0, high_open=True)
    check_hyperparameter(self.name, "la_mu", self.la_mu, high=1.0, high_open=True)
    check_hyperparameter(self.name, "eps", self.eps)
    check_hyperparameter(self.name, "r_init", self.r_init, low=np.finfo(np.float32).tiny)
    if not isinstance(self.normalize, bool):
      raise ValueError(f"{self.name}: normalize = {self.normalize!r} is invalid: "
                       "expected True or False")
    if self.stats_dtype not in ("float32", "float64"):
      raise ValueError(f"{self.name}: stats_dtype = {self.stats_dtype!r} is invalid: "
                       "expected 'float32' or 'float64'")

  def init_state(self, dim: int) -> CorInfoMaxState:
    return init_state(dim, self.r_init, dtype=self.stats_dtype)

  def loss(self, z1, z2, state: CorInfoMaxState):
    """(loss, new state, metrics) of `corinfomax_loss` with these hyperparameters."""
    return corinfomax_loss(z1, z2, state, alpha=self.alpha, la_R=self.la_R,
                           la_mu=self.la_mu, eps=self.eps, normalize=self.normalize,
                           stats_dtype=self.stats_dtype)

  def covariances(self, state: CorInfoMaxState):
    """The moving covariances, whose spectra the trainer logs."""
    return state.cov1, state.cov2
