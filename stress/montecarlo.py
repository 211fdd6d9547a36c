"""Monte Carlo market paths: correlated fat-tailed returns, jumps, spot-vol dynamics.

A path moves the ``M`` simulated assets over ``steps`` equal steps of ``dt = horizon / steps``
years. Per step, the log return of asset ``a`` is

    r_a = (mu_a - sigma_a^2 / 2 - lambda * kappa_a) dt + sigma_a sqrt(dt) eps_a + J_a

- ``eps = L z * sqrt((nu - 2) / W)``: a multivariate Student-t draw with ``nu`` degrees of
  freedom (an integer, 3 to 60), scaled to unit variance (``z`` standard normal, ``L`` the
  Cholesky factor of the correlation matrix, ``W ~ chi2(nu)`` the sum of ``nu`` squared
  normals, shared by all assets so crashes are joint). Its marginals are
  ``t_nu * sqrt((nu - 2) / nu)``; ``nu = 0`` means Gaussian.
- ``J``: Merton compound Poisson jumps, market-wide: ``N ~ Poisson(lambda dt)`` jumps per step,
  shared by all assets, of log size ``N(beta_a m, (beta_a s)^2)`` each, one common normal draw
  (so a jump moves every asset, scaled by its ``jump_beta``). ``N`` is drawn by inverting its
  CDF up to a count whose tail probability is below 1e-15, so no rejection loop is compiled.
  ``kappa_a = exp(beta_a m + (beta_a s)^2 / 2) - 1`` compensates the drift, so that
  ``E[S_T / S_0] = exp(mu T)``.
- Implied vols move with returns (a regression of vol change on log return, as the skew
  implies): after step ``k`` the vol shift of options on ``a`` is
  ``max(vol_beta_a * R_a(k), min_vol_shift)`` with ``R_a(k)`` the cumulative log return.

Everything is drawn with ``jax.random`` in one jitted call, with a key per path
(``fold_in(seed, path)``), so path ``i`` is the same whatever the number of paths, the chunking
or the devices.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from . import _exported
from ._tree import pytree_dataclass

YEAR_DAYS = 365.0


@pytree_dataclass
class Model:
    """Parameters of the path model over ``M`` simulated assets (annualised, decimals)."""

    drift: Any  # [M] expected arithmetic return mu per year
    vol: Any  # [M] return volatility sigma per year
    chol: Any  # [M, M] lower Cholesky factor of the return correlation matrix
    jump_intensity: Any  # [] lambda, jumps per year
    jump_mean: Any  # [] m, mean log size of a jump
    jump_std: Any  # [] s, std of the log size of a jump
    jump_beta: Any  # [M] scale of each asset's jump
    vol_beta: Any  # [M] implied-vol change per unit of cumulative log return
    min_vol_shift: Any  # [] floor of the implied-vol shift


def max_jumps(rate: float, tail: float = 1e-15) -> int:
    """Smallest ``k`` with ``P(Poisson(rate) > k) < tail`` (at least 1)."""
    k, p, cdf = 0, math.exp(-rate), math.exp(-rate)
    while 1.0 - cdf >= tail and k < 1000:
        k += 1
        p *= rate / k
        cdf += p
    return max(k, 1)


def _poisson(u: Any, rate: Any, kmax: int) -> Any:
    """Poisson counts from uniforms ``u`` by CDF inversion over ``0..kmax`` (a compare-and-sum,
    no rejection loop to compile)."""
    k = jnp.arange(kmax, dtype=u.dtype)
    log_pmf = k * jnp.log(jnp.maximum(rate, 1e-300)) - rate - jax.scipy.special.gammaln(k + 1.0)
    cdf = jnp.cumsum(jnp.exp(log_pmf))  # P(N <= k), k = 0..kmax-1
    return jnp.sum(u[..., None] > cdf, axis=-1).astype(u.dtype)


def _path(key: Any, model: Model, steps: int, dt: float, df: int, kmax: int) -> tuple[Any, Any]:
    """One path: ``([steps, M] cumulative log returns, [steps, M] vol shifts)``."""
    M = model.vol.shape[0]
    # One normal draw per step feeds everything (each PRNG call is a second of compilation):
    # M returns, df chi2 terms, the jump size, and the jump count's uniform as Phi(z).
    g = jax.random.normal(key, (steps, M + df + 2), model.vol.dtype)
    eps = g[:, :M] @ model.chol.T
    if df:  # shared chi2(df) mixing: a multivariate t, scaled to unit variance
        w = jnp.sum(g[:, M : M + df] ** 2, axis=1, keepdims=True)
        eps = eps * jnp.sqrt((df - 2.0) / w)
    n = _poisson(jax.scipy.special.ndtr(g[:, -1:]), model.jump_intensity * dt, kmax)
    m, s = model.jump_beta * model.jump_mean, model.jump_beta * model.jump_std
    jump = n * m + jnp.sqrt(n) * s * g[:, -2:-1]
    kappa = jnp.exp(m + 0.5 * s * s) - 1.0
    drift = (model.drift - 0.5 * model.vol**2 - model.jump_intensity * kappa) * dt
    r = drift + model.vol * jnp.sqrt(dt) * eps + jump
    cum = jnp.cumsum(r, axis=0)
    return cum, jnp.maximum(model.vol_beta * cum, model.min_vol_shift)


@functools.partial(jax.jit, static_argnames=("paths", "steps", "dt", "df", "kmax"))
def _simulate(seed, model, *, paths, steps, dt, df, kmax):
    base = jax.random.PRNGKey(seed)
    keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.arange(paths, dtype=jnp.uint32))
    return jax.vmap(lambda k: _path(k, model, steps, dt, df, kmax))(keys)


def simulate(seed: int, model: Model, *, paths: int, steps: int, dt: float, df: int = 0) -> tuple[Any, Any]:
    """Draw ``paths`` paths of ``steps`` steps of ``dt`` years each.

    Args:
      seed: the random seed. model: the path model. df: Student-t degrees of freedom, an
      integer in [3, 60], or 0 for Gaussian returns.

    Returns:
      ``(log_return, vol_shift)``, each ``[paths, steps, M]``: cumulative log return of each
      asset from the start to the end of each step, and the implied-vol shift there.
    """
    kmax = max_jumps(float(model.jump_intensity) * dt)
    return _kept_simulate(paths, steps, float(dt), int(df), kmax)(np.int64(seed), model)


@functools.lru_cache(maxsize=None)
def _kept_simulate(paths: int, steps: int, dt: float, df: int, kmax: int) -> Callable:
    """``_simulate`` for these static sizes, kept traced on disk (``_exported``): a new
    process loads it instead of tracing the path model again."""
    fn = jax.jit(functools.partial(_simulate, paths=paths, steps=steps, dt=dt, df=df, kmax=kmax))
    return _exported.Kept(fn, ("simulate", paths, steps, dt, df, kmax))


def model(
    vol: np.ndarray,
    corr: np.ndarray,
    *,
    drift: np.ndarray | None = None,
    jump_intensity: float = 0.0,
    jump_mean: float = 0.0,
    jump_std: float = 0.0,
    jump_beta: np.ndarray | None = None,
    vol_beta: np.ndarray | None = None,
    min_vol_shift: float = -0.25,
) -> Model:
    """Build a ``Model`` from per-asset arrays ``[M]`` and a correlation matrix ``[M, M]``.

    Raises:
      numpy.linalg.LinAlgError: the correlation matrix is not positive definite.
    """
    M = len(vol)
    ones, zeros = np.ones(M), np.zeros(M)
    return Model(
        drift=np.asarray(zeros if drift is None else drift, np.float64),
        vol=np.asarray(vol, np.float64),
        chol=np.linalg.cholesky(np.asarray(corr, np.float64)),
        jump_intensity=np.float64(jump_intensity),
        jump_mean=np.float64(jump_mean),
        jump_std=np.float64(jump_std),
        jump_beta=np.asarray(ones if jump_beta is None else jump_beta, np.float64),
        vol_beta=np.asarray(zeros if vol_beta is None else vol_beta, np.float64),
        min_vol_shift=np.float64(min_vol_shift),
    )
