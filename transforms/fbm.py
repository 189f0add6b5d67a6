"""Fractional Brownian motion as a sum of Ornstein–Uhlenbeck processes (MA-fBM).

Fractional Brownian motion B^H with **Hurst index** H ∈ (0, 1) is not Markov, so an SDE
driven by it, dX = b(X, t) dt + σ(X, t) dB^H, cannot be simulated or inferred step by step.
Daems et al. (ICLR 2024), after Carmona & Coutin (1998), approximate it by K Ornstein–Uhlenbeck
processes that share one Brownian motion W,

    dY_k = −γ_k Y_k dt + dW,        B̂_t = Σ_k ω_k Y_k(t)   (type II; Y_k(0) = 0),
                                     B̂_t = Σ_k ω_k (Y_k(t) − Y_k(0))   (type I; Y(0) stationary),

with speeds γ on a geometric grid (:func:`gamma_grid`) and weights ω chosen to minimise the
integrated L2 error E∫_0^T (B^H_t − B̂_t)² dt = ωᵀAω − 2bᵀω + c over the **horizon** T
(:func:`optimal_omega`, closed form Aω = b). The SDE becomes an ordinary Markov SDE on the
augmented state Z = (X, Y_1..Y_K) (:func:`markov_sde`):

    dY_k = (−γ_k Y_k + u) dt + dW,    dX = [b − σ Σ_k ω_k γ_k Y_k] dt + σ ω̄ (dW + u dt),

ω̄ = Σ_k ω_k, where u is a posterior **control** (u = 0 under the prior); the path KL between
the controlled and the uncontrolled SDE is E ½∫‖u‖² dt (Girsanov).

**The two kinds of fBM and their normalisation.** Type II (Riemann–Liouville) is
B_t = Γ(H+½)⁻¹ ∫_0^t (t−s)^{H−½} dW_s, Var B_t = t^{2H} / (2H Γ(H+½)²). Type I
(Mandelbrot–van Ness) is Γ-normalised the same way, which gives Var B_t = V_H t^{2H} with
V_H = 1 / (Γ(2H+1) sin πH) (:func:`mvn_variance`; 3.52 at H = 0.1, 1 at H = ½, 1.93 at
H = 0.9). Everything here targets these Γ-normalised processes; ``unit_variance=True`` divides
ω by the square root of the variance factor, so that the target has Var B_t = t^{2H} (the
usual "standard" fBM). At H = ½ both are Brownian motion; ``exact_bm=True`` replaces the
approximation there by γ = [0], ω = [1] (Y = W exactly).

:func:`markov_fbm` is the program transformation over NumPyro models: it rewrites every
:func:`fbm_sde` call (an SDE written against fractional noise) into the augmented Markov SDE,
with the Brownian increments as a sample site (and, for type I, the stationary Y(0)).

Example (spec §4: the relative L2 error at H = 0.7, type II, K = 5, γ_max = 20, T = 2.4):

>>> import jax
>>> from ppl.transforms.fbm import approximation_error, gamma_grid, optimal_omega
>>> with jax.enable_x64(True):
...     gammas = gamma_grid(5, 20.0)
...     err = approximation_error(0.7, gammas, 2.4, fbm_type="II")
>>> print(f"{float(err):.1e}")
4.7e-05
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from jax import lax
from jax.scipy.special import gammainc, gammaincc, gammaln
from numpyro.primitives import _PYRO_STACK, Messenger, apply_stack

__all__ = [
    "FBM_SDE",
    "GridControl",
    "MarkovSDE",
    "approximation_error",
    "check_ou_step",
    "check_step",
    "fbm_covariance",
    "fbm_sde",
    "gamma_grid",
    "ma_covariance",
    "markov_fbm",
    "markov_sde",
    "mvn_variance",
    "omega_system",
    "optimal_omega",
]

#: The message type of :func:`fbm_sde` (handled by :class:`markov_fbm`).
FBM_SDE = "fbm_sde"
_TYPES = ("I", "II")
#: Above this γT, e^{γT}·Q(a, γT) is evaluated by a continued fraction (no overflow).
_CF_SWITCH = 10.0
_CF_TERMS = 40
#: The same switch for the float64 host solve (e^{z}Q(a, z) is finite there up to z ≈ 700).
_HOST_CF_SWITCH = 500.0
#: ω(H) in float32: Chebyshev nodes of the float64 fit, the relative size below which its
#: coefficients are dropped, and the float32 error (relative to max_k |ω_k(H)| at each H of
#: a check grid) up to which the series is used instead of the host solve.
_CHEB_NODES = 49
_CHEB_DROP = 1e-10
_CHEB_TOL = 1e-6


# --------------------------------------------------------------------------- validation


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _check_type(fbm_type) -> str:
    if fbm_type not in _TYPES:
        raise ValueError(f"fbm_type must be 'I' or 'II', got {fbm_type!r}")
    return fbm_type


def _check_hurst(hurst):
    if _is_concrete(hurst):
        h = np.asarray(hurst, dtype=float)
        if not np.all(np.isfinite(h)) or np.any(h <= 0.0) or np.any(h >= 1.0):
            raise ValueError(f"hurst must lie in (0, 1), got {hurst}")
    return hurst


def _check_horizon(horizon) -> float:
    try:
        t = float(horizon)
    except TypeError as err:
        raise TypeError(f"horizon must be a concrete positive number, got {horizon!r}") from err
    if not math.isfinite(t) or t <= 0.0:
        raise ValueError(f"horizon must be a finite positive number, got {horizon}")
    return t


def _check_gammas(gammas, allow_zero=False) -> np.ndarray:
    if not _is_concrete(gammas):
        raise TypeError("gammas must be concrete (the speeds are fixed, not learned)")
    g = np.asarray(gammas, dtype=np.float64)
    if g.ndim != 1 or g.size < 1:
        raise ValueError(f"gammas must be a non-empty 1-d array [K], got shape {g.shape}")
    bad = (g < 0.0) if allow_zero else (g <= 0.0)
    if not np.all(np.isfinite(g)) or np.any(bad):
        raise ValueError(f"gammas must be finite and positive, got {g}")
    return g


def _float(x):
    """``x`` as a JAX float array of the default float dtype (float64 under x64)."""
    return jnp.asarray(x, dtype=jnp.result_type(float))


def _phi(a) -> np.ndarray:
    """(1 − e^{−a})/a elementwise, 1 at a = 0 (float64)."""
    a = np.asarray(a, dtype=np.float64)
    out = np.ones_like(a)
    pos = a > 0
    out[pos] = -np.expm1(-a[pos]) / a[pos]
    return out


# --------------------------------------------------------------------------- the grid


def gamma_grid(num_ou: int, gamma_max: float) -> jax.Array:
    """The geometric grid of OU speeds γ_k = r^{k−n}, n = (K+1)/2, r = γ_max^{2/(K−1)}.

    The speeds run from 1/γ_max to γ_max with γ_1·γ_K = 1 (the middle one is 1 for odd K).

    :param num_ou: K ≥ 1, the number of OU processes (K = 1 gives [1.0]).
    :param gamma_max: the largest speed γ_K > 1.
    :return: γ ``[K]``, increasing.

    >>> import numpy as np
    >>> print(np.round(np.asarray(gamma_grid(5, 20.0)), 4))
    [ 0.05    0.2236  1.      4.4721 20.    ]
    """
    if isinstance(num_ou, bool) or int(num_ou) != num_ou or int(num_ou) < 1:
        raise ValueError(f"num_ou must be an integer ≥ 1, got {num_ou!r}")
    k = int(num_ou)
    g = float(gamma_max)
    if not math.isfinite(g) or g <= 0.0 or (k > 1 and g <= 1.0):
        raise ValueError(f"gamma_max must be a finite number > 1, got {gamma_max}")
    with jax.ensure_compile_time_eval():  # concrete even under jit: the speeds are fixed
        return _float(_grid(k, g))


def _grid(k: int, gamma_max: float) -> np.ndarray:
    if k == 1:
        return np.ones(1)
    log_r = 2.0 * math.log(gamma_max) / (k - 1)
    return np.exp(log_r * (np.arange(1, k + 1) - (k + 1) / 2.0))


def check_step(dt: float, gammas, what: str = "dt", ou_step: str = "euler") -> float:
    """A positive finite step, and the step guard of the reference code: γ_max·dt < 0.5
    (Euler on the fastest OU). ``ou_step="exact"`` has no guard (its OU transition is exact).

    >>> check_step(0.01, gamma_grid(5, 20.0))
    0.01
    >>> check_step(0.1, gamma_grid(5, 20.0), ou_step="exact")
    0.1
    """
    dt = float(dt)
    g_max = float(np.max(_check_gammas(gammas, allow_zero=True)))
    if not math.isfinite(dt) or dt <= 0.0:
        raise ValueError(f"{what} must be a positive step, got {dt}")
    if check_ou_step(ou_step) == "euler" and g_max * dt >= 0.5:
        raise ValueError(
            f"{what} = {dt:g} is too large for the fastest OU speed γ_max = {g_max:g}: the "
            f"Euler step guard needs γ_max·{what} < 0.5 (got {g_max * dt:.3g}); use "
            f"{what} < {0.5 / g_max:.3g}, or ou_step='exact'"
        )
    return dt


def check_ou_step(ou_step: str) -> str:
    """``ou_step`` is ``"euler"`` or ``"exact"`` (see :class:`MarkovSDE`).

    >>> check_ou_step("exact")
    'exact'
    """
    if ou_step not in ("euler", "exact"):
        raise ValueError(f"ou_step must be 'euler' or 'exact', got {ou_step!r}")
    return ou_step


# --------------------------------------------------------------------------- optimal ω


def mvn_variance(hurst):
    """V_H = 1 / (Γ(2H+1) sin πH): Var B_t / t^{2H} of the Γ-normalised type-I fBM.

    >>> print(round(float(mvn_variance(0.3)), 3))
    1.383
    """
    h = _float(_check_hurst(hurst))
    return jnp.exp(-gammaln(2.0 * h + 1.0)) / jnp.sin(jnp.pi * h)


def _rl_variance(hurst):
    """Var B_t / t^{2H} of the type-II (Riemann–Liouville) fBM: 1 / (2H Γ(H+½)²)."""
    h = _float(hurst)
    return jnp.exp(-2.0 * gammaln(h + 0.5)) / (2.0 * h)


def _variance_factor(hurst, fbm_type):
    return mvn_variance(hurst) if fbm_type == "I" else _rl_variance(hurst)


def _exp_gammaincc(a, z):
    """e^z·Q(a, z) for z ≥ 0 without overflow, and without NaN in either ``where`` branch.

    Below z = 10 the direct product; above, Legendre's continued fraction for Γ(a, z),
    e^z Q(a, z) = z^a / (Γ(a)·(z + 1 − a − 1(1−a)/(z + 3 − a − 2(2−a)/(z + 5 − a − …)))),
    evaluated backwards with a fixed number of terms. Each branch gets a safe input so that
    the unused one stays finite under differentiation (the double-``where`` rule).
    """
    small = z < _CF_SWITCH
    z_small = jnp.where(small, z, 1.0)
    z_large = jnp.where(small, _CF_SWITCH, z)
    direct = jnp.exp(z_small) * gammaincc(a, z_small)

    def term(i, f):
        n = _CF_TERMS - i
        return z_large + (2 * n - 1) - a - n * (n - a) / f

    f = jax.lax.fori_loop(0, _CF_TERMS, term, z_large + (2 * _CF_TERMS + 1) - a)
    fraction = jnp.exp(a * jnp.log(z_large) - gammaln(a)) / f
    return jnp.where(small, direct, fraction)


def _a_matrix(gammas: np.ndarray, horizon: float, fbm_type: str) -> np.ndarray:
    """A_ij = E∫_0^T (MA basis i)(MA basis j) dt, in float64 NumPy (it does not depend on H)."""
    g = gammas[:, None] + gammas[None, :]
    t = horizon
    if fbm_type == "II":
        return (t + np.expm1(-g * t) / g) / g
    e = np.expm1(-gammas * t) / gammas
    return (2.0 * t + e[:, None] + e[None, :]) / g


def omega_system(hurst, gammas, horizon, fbm_type: str = "II"):
    """The quadratic J(ω) = E∫_0^T (B^H_t − B̂_t)² dt = ωᵀAω − 2bᵀω + c (spec §1.3).

    With a = H + ½ and P, Q the regularised incomplete gamma functions:

    * type II: A_ij = [T + (e^{−(γ_i+γ_j)T} − 1)/(γ_i+γ_j)]/(γ_i+γ_j),
      b_k = T γ_k^{−a} P(a, γ_kT) − a γ_k^{−a−1} P(a+1, γ_kT), c = T^{2H+1}/(2H(2H+1)Γ(a)²);
    * type I: A_ij = [2T + (e^{−γ_iT}−1)/γ_i + (e^{−γ_jT}−1)/γ_j]/(γ_i+γ_j),
      b_k = 2T γ_k^{−a} − T^a/(γ_k Γ(a+1)) + (e^{−γ_kT} − e^{γ_kT} Q(a, γ_kT)) γ_k^{−a−1},
      c = V_H T^{2H+1}/(2H+1).

    :param hurst: H ∈ (0, 1), a scalar (may be traced: b and c are differentiable in H).
    :param gammas: the speeds γ ``[K]`` (concrete).
    :param horizon: T > 0.
    :return: ``(A [K, K], b [K], c [])``; A in the default float dtype (float64 under x64).

    >>> A, b, c = omega_system(0.5, gamma_grid(3, 10.0), 1.0)
    >>> A.shape, b.shape, c.shape
    ((3, 3), (3,), ())
    """
    fbm_type = _check_type(fbm_type)
    t = _check_horizon(horizon)
    g_np = _check_gammas(gammas)
    h = _float(_check_hurst(hurst))
    a = h + 0.5
    g = _float(g_np)
    if fbm_type == "II":
        b = t * g**-a * gammainc(a, g * t) - a * g ** (-a - 1.0) * gammainc(a + 1.0, g * t)
        c = t ** (2.0 * h + 1.0) / (2.0 * h * (2.0 * h + 1.0)) * jnp.exp(-2.0 * gammaln(a))
    else:
        b = (
            2.0 * t * g**-a
            - jnp.exp(a * math.log(t) - gammaln(a + 1.0)) / g
            + (jnp.exp(-g * t) - _exp_gammaincc(a, g * t)) * g ** (-a - 1.0)
        )
        c = mvn_variance(h) * t ** (2.0 * h + 1.0) / (2.0 * h + 1.0)
    return _float(_a_matrix(g_np, t, fbm_type)), b, c


def _solve(gammas_np, horizon, fbm_type, b):
    """ω = A⁻¹ b for a JAX ``b [K]``, by the LU factors of A computed once per grid in
    float64 (A has condition number ~6e4 at K = 5; no explicit inverse)."""
    lu, piv = _a_factor(tuple(np.asarray(gammas_np).tolist()), float(horizon), fbm_type)
    return jax.scipy.linalg.lu_solve((jnp.asarray(lu, dtype=b.dtype), jnp.asarray(piv)), b)


def _b_host(h, gammas: np.ndarray, t: float, fbm_type: str) -> np.ndarray:
    """b of :func:`omega_system` in float64 NumPy/SciPy (same formulas), for one H or
    several: ``h`` ``[]`` or ``[M]`` gives ``[K]`` or ``[M, K]``.

    Type I needs e^{z} Q(a, z), z = γT: directly below ``_HOST_CF_SWITCH`` (finite in float64
    up to z ≈ 700), by the continued fraction above it.
    """
    from scipy.special import gammainc as sp_p
    from scipy.special import gammaincc as sp_q
    from scipy.special import gammaln as sp_gammaln

    a, g = np.asarray(h, dtype=np.float64)[..., None] + 0.5, gammas
    if fbm_type == "II":
        return t * g**-a * sp_p(a, g * t) - a * g ** (-a - 1.0) * sp_p(a + 1.0, g * t)
    z = g * t
    small = z < _HOST_CF_SWITCH
    eq = np.empty(np.broadcast_shapes(a.shape, z.shape))
    eq[..., small] = np.exp(z[small]) * sp_q(a, z[small])
    if not small.all():
        zl = z[~small]
        f = zl + (2 * _CF_TERMS + 1) - a
        for n in range(_CF_TERMS, 0, -1):
            f = zl + (2 * n - 1) - a - n * (n - a) / f
        eq[..., ~small] = np.exp(a * np.log(zl) - sp_gammaln(a)) / f
    return (
        2.0 * t * g**-a
        - np.exp(a * math.log(t) - sp_gammaln(a + 1.0)) / g
        + (np.exp(-z) - eq) * g ** (-a - 1.0)
    )


@functools.lru_cache(maxsize=64)
def _a_factor(gammas: tuple, t: float, fbm_type: str):
    """The LU factors of A (it does not depend on H), computed once per grid."""
    from scipy.linalg import lu_factor

    return lu_factor(_a_matrix(np.asarray(gammas, dtype=np.float64), t, fbm_type))


def _omega_host(h, gammas, t, fbm_type):
    """ω(h) = A⁻¹ b(h) in float64 on the host; ``h`` ``[]`` or ``[M]`` gives ``[K]`` or
    ``[M, K]``."""
    from scipy.linalg import lu_solve

    g = np.asarray(gammas, dtype=np.float64)
    b = _b_host(h, g, t, fbm_type)
    return lu_solve(_a_factor(tuple(g.tolist()), float(t), fbm_type), b.T).T


#: The step of the five-point difference dω/dH on the host: truncation ~ε⁴ω⁽⁵⁾/30 (≲ 1e-10
#: relative), rounding ~1e-16·cond(A)/ε (b is entire in H, so steps past [0, 1] are fine).
_OMEGA_EPS = 1e-3


def _clenshaw(coef, x):
    """Σ_k c_k T_k(x) by Clenshaw's recurrence, in the dtype of ``coef [n, K]`` and ``x``
    (NumPy or JAX arrays alike); returns ``[*x.shape, K]``."""
    x = x[..., None]
    b1 = b2 = 0.0 * x
    for c in coef[:0:-1]:
        b1, b2 = c + 2 * x * b1 - b2, b1
    return coef[0] + x * b1 - b2


@functools.lru_cache(maxsize=64)
def _omega_chebyshev(gammas: tuple, t: float, fbm_type: str):
    """ω(H) on H ∈ [0, 1] as a Chebyshev series in x = 2H − 1: coefficients ``[n, K]``
    (float32) fitted in float64 on the host, or None where the series evaluated in float32
    misses the float64 ω, at some H of a check grid (which includes both ends and points
    within 1e-7 of them), by more than ``_CHEB_TOL`` of max_k |ω_k(H)| at that H.

    b(H) is entire in H (γ^{−a}, P(a, z) and e^{z}Q(a, z) are entire in a = H + ½), so the
    coefficients fall off faster than geometrically down to the float64 solve's rounding:
    n ≈ 12 at K = 5, T = 2.4. A does not depend on H, so the fit is one LU factorisation
    and a few dozen solves, once per grid; each step then runs one recurrence of n
    multiply-adds, with no host round trip. The check fails on ill-conditioned grids
    (short horizons, many OU processes), where |ω| varies by orders of magnitude over H and
    the float32 rounding of the large coefficients swamps ω where it is small.
    """
    g = np.asarray(gammas, dtype=np.float64)
    x = np.cos(np.pi * (np.arange(_CHEB_NODES) + 0.5) / _CHEB_NODES)
    fit = np.polynomial.chebyshev.chebfit(x, _omega_host((x + 1) / 2, g, t, fbm_type), len(x) - 1)
    size = np.abs(fit).max(axis=1)
    coef = fit[: np.nonzero(size > _CHEB_DROP * size.max())[0].max() + 1].astype(np.float32)
    ends = np.array([1e-7, 1e-5, 1e-3])
    h = np.concatenate([np.linspace(0.0, 1.0, 257), ends, 1.0 - ends])
    h = h.astype(np.float32).astype(np.float64)  # the H a float32 caller can pass
    want = _omega_host(h, g, t, fbm_type)
    got = _clenshaw(coef, (2 * h - 1).astype(np.float32))
    ok = np.abs(got - want).max(axis=1) <= _CHEB_TOL * np.abs(want).max(axis=1)
    return coef if ok.all() else None


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1, 2))
def _omega_f64(gammas, t, fbm_type, hurst):
    """ω solved in float64 on the host and returned in float32 (a ``pure_callback``);
    dω/dH by a float64 five-point difference, in the same host call as ω."""
    out = jax.ShapeDtypeStruct((len(gammas),), jnp.float32)

    def host(h):
        return _omega_host(float(h), gammas, t, fbm_type).astype(np.float32)

    return jax.pure_callback(host, out, hurst, vmap_method="sequential")


@_omega_f64.defjvp
def _omega_f64_jvp(gammas, t, fbm_type, primals, tangents):
    (hurst,), (dh,) = primals, tangents
    out = jax.ShapeDtypeStruct((len(gammas),), jnp.float32)

    def host_value_and_derivative(h):
        hs = float(h) + _OMEGA_EPS * np.array([0.0, -2.0, -1.0, 1.0, 2.0])
        omega, m2, m1, p1, p2 = _omega_host(hs, gammas, t, fbm_type)
        d_omega = (m2 - 8.0 * m1 + 8.0 * p1 - p2) / (12.0 * _OMEGA_EPS)
        return omega.astype(np.float32), d_omega.astype(np.float32)

    omega, d_omega = jax.pure_callback(
        host_value_and_derivative, (out, out), hurst, vmap_method="sequential"
    )
    return omega, d_omega * dh


def optimal_omega(
    hurst, gammas, horizon, fbm_type: str = "II", unit_variance: bool = False
) -> jax.Array:
    """The weights ω* = A⁻¹b minimising E∫_0^T (B^H_t − Σ_k ω_k basis_k(t))² dt.

    Always solved in float64: under x64, A (which does not depend on H) is LU-factorised
    once in NumPy and b(H) is solved against the factors in JAX. In float32, b's rounding
    times cond(A) (5.7e4 at T = 2.4, 8e6 at T = 1 for type II) would spoil ω, so ω(H) is
    solved in float64 on the host once per grid, at Chebyshev nodes in H, and the jitted
    code evaluates the fitted series (within 1e-6 of max_k |ω_k(H)| at every H, checked when
    the fit is made; ω and dω/dH in-graph, no host round trip per step). On grids where the
    series would be less accurate (ill-conditioned ones: short horizons, many OU
    processes), each call solves in float64 on the host instead (a ``pure_callback`` with a
    custom JVP, dω/dH by a float64 five-point difference). Either way the result is
    differentiable in ``hurst``, also under ``jit`` and ``vmap``.

    :param hurst: H ∈ (0, 1), scalar, may be traced.
    :param gammas: speeds ``[K]`` (concrete), e.g. :func:`gamma_grid`.
    :param horizon: T > 0, the interval [0, T] over which the error is integrated.
    :param fbm_type: ``"I"`` (Mandelbrot–van Ness, Γ-normalised: Var = V_H t^{2H}) or
        ``"II"`` (Riemann–Liouville).
    :param unit_variance: divide ω by √(variance factor) to target Var B_t = t^{2H}.
    :return: ω ``[K]``.

    >>> import jax, numpy as np
    >>> with jax.enable_x64(True):
    ...     w_sum = float(optimal_omega(0.5, gamma_grid(5, 20.0), 2.4, fbm_type="II").sum())
    >>> print(round(w_sum, 3))   # at H = ½, Σω ≈ 1: nearly Brownian motion
    1.0
    """
    g_np = _check_gammas(gammas)
    t = _check_horizon(horizon)
    if jnp.result_type(float) == jnp.float64:
        _, b, _ = omega_system(hurst, g_np, t, fbm_type)
        omega = _solve(g_np, t, fbm_type, b)
    else:  # float32: b's rounding times cond(A) (up to ~1e7) would spoil ω
        _check_hurst(hurst)
        grid = (tuple(g_np.tolist()), t, _check_type(fbm_type))
        h = jnp.asarray(hurst, jnp.float32)
        coef = _omega_chebyshev(*grid)
        if coef is not None:
            x = 2 * h - 1  # kept in [−1, 1]; full gradient at the ends (jnp.clip halves it)
            x = jnp.where(x > 1.0, 1.0, jnp.where(x < -1.0, -1.0, x))
            omega = _clenshaw(jnp.asarray(coef), x)
        else:
            omega = _omega_f64(*grid, h)
    if unit_variance:
        omega = omega / jnp.sqrt(_variance_factor(hurst, fbm_type))
    return omega


def approximation_error(hurst, gammas, horizon, fbm_type: str = "II"):
    """The relative integrated L2 error (c − bᵀω*)/c of the optimal MA-fBM (spec §4).

    :return: a Python float in [0, 1] for a concrete ``hurst``, computed in float64 (e.g.
        4.7e-5 at H = 0.7, type II, K = 5, γ_max = 20, T = 2.4); a scalar array in the
        ambient dtype for a traced one.

    >>> print(f"{approximation_error(0.7, gamma_grid(5, 20.0), 2.4, fbm_type='II'):.1e}")
    4.7e-05
    """
    g_np = _check_gammas(gammas)
    t = _check_horizon(horizon)
    if _is_concrete(hurst):  # float64 whatever the ambient dtype: c − bᵀω cancels
        with jax.enable_x64(True):
            _, b, c = omega_system(float(hurst), g_np, t, fbm_type)
            return float((c - b @ _solve(g_np, t, fbm_type, b)) / c)
    _, b, c = omega_system(hurst, g_np, t, fbm_type)
    return (c - b @ _solve(g_np, t, fbm_type, b)) / c


# --------------------------------------------------------------------------- covariances


def ma_covariance(t, s, gammas, omega, fbm_type: str = "II"):
    """Cov(B̂_t, B̂_s) of the MA-fBM Σ_k ω_k Y_k (exact, no discretisation).

    With m = min(t, s) and e_ij = e^{−γ_i(t−m) − γ_j(s−m)}:

    * type II (Y(0) = 0): Σ_ij ω_iω_j e_ij (1 − e^{−(γ_i+γ_j)m})/(γ_i+γ_j) (γ = 0 allowed:
      the limit m, Brownian motion);
    * type I (stationary Y(0), Cov = 1/(γ_i+γ_j)): Σ_ij ω_iω_j [e_ij − e^{−γ_i t} − e^{−γ_j s}
      + 1]/(γ_i+γ_j).

    :param t, s: times ≥ 0, broadcast against each other (e.g. ``ts[:, None], ts[None, :]``).
    :param gammas: ``[K]``; ``omega``: ``[K]``.
    :return: the covariance, of the broadcast shape of t and s.

    >>> import numpy as np
    >>> ts = jnp.linspace(0.1, 1.0, 4)
    >>> c = ma_covariance(ts[:, None], ts[None, :], jnp.zeros(1), jnp.ones(1))
    >>> bool(np.allclose(c, np.minimum(ts[:, None], ts[None, :])))   # γ = 0: BM
    True
    """
    fbm_type = _check_type(fbm_type)
    t = _float(t)[..., None, None]
    s = _float(s)[..., None, None]
    g = _float(gammas)
    w = _float(omega)
    gi, gj = g[:, None], g[None, :]
    gsum = gi + gj
    m = jnp.minimum(t, s)
    e = jnp.exp(-gi * (t - m) - gj * (s - m))
    if fbm_type == "II":
        pos = gsum > 0
        safe = jnp.where(pos, gsum, 1.0)
        v = jnp.where(pos, -jnp.expm1(-safe * m) / safe, m)
        cov = e * v
    else:
        cov = (e - jnp.exp(-gi * t) - jnp.exp(-gj * s) + 1.0) / gsum
    return jnp.einsum("...ij,i,j->...", cov, w, w)


def fbm_covariance(t, s, hurst, fbm_type: str = "II", unit_variance: bool = False):
    """Cov(B^H_t, B^H_s) of the true (Γ-normalised) fBM, as NumPy float64.

    Type I: ½ V_H (t^{2H} + s^{2H} − |t−s|^{2H}). Type II (Riemann–Liouville):
    Γ(H+½)⁻² ∫_0^{min(t,s)} (t−u)^{H−½} (s−u)^{H−½} du, by adaptive quadrature (SciPy, with the
    algebraic end-point weight). ``unit_variance=True`` divides by the variance factor.

    :param t, s: times ≥ 0 (NumPy-broadcast against each other).
    :return: ``np.ndarray`` of the broadcast shape.

    >>> print(np.round(fbm_covariance(np.array([1.0]), np.array([0.5]), 0.5, "I"), 6))
    [0.5]
    """
    fbm_type = _check_type(fbm_type)
    _check_hurst(hurst)
    h = float(hurst)
    t, s = np.broadcast_arrays(np.asarray(t, dtype=float), np.asarray(s, dtype=float))
    if fbm_type == "I":
        cov = 0.5 * (t ** (2 * h) + s ** (2 * h) - np.abs(t - s) ** (2 * h))
        return cov if unit_variance else cov * float(mvn_variance(h))
    from scipy import integrate
    from scipy.special import gammaln as np_gammaln

    alpha = h - 0.5
    out = np.empty(t.shape)
    for idx in np.ndindex(t.shape):
        lo, hi = sorted((t[idx], s[idx]))
        if lo <= 0.0:
            out[idx] = 0.0
        elif hi == lo:
            out[idx] = lo ** (2 * h) / (2 * h)
        else:  # ∫_0^lo (hi − lo + v)^α v^α dv, v^α as the quadrature weight
            val, _ = integrate.quad(
                lambda v, d=hi - lo: (d + v) ** alpha, 0.0, lo, weight="alg", wvar=(alpha, 0.0)
            )
            out[idx] = val
    out = out * np.exp(-2.0 * np_gammaln(h + 0.5))
    return out / float(_rl_variance(h)) if unit_variance else out


# --------------------------------------------------------------------------- the Markov SDE


class GridControl(NamedTuple):
    """A control u(t, x, y) = ``apply(features(t), x, y)`` whose time part is computed apart.

    On the fixed Euler grid the part of the control that depends on t only (observation
    context, phase features, their first-layer projection) is computed for every step at
    once, outside the scan, and fed to the scan as an input; only ``apply`` runs per step.
    Called as ``control(t, x, y)`` (e.g. by the diffrax solver, at any t) it is the same
    function.

    :param features: times ``[N]`` ``->`` a pytree whose leaves have leading axis ``N``.
    :param apply: ``(features at one time, x [..., D], y [..., D, K]) -> u [..., D]`` (or
        ``(u, s)``, see :class:`ControlledIncrements`).

    >>> c = GridControl(lambda t: {"a": jnp.sin(t)}, lambda f, x, y: f["a"] - x)
    >>> float(c(0.5, jnp.zeros(1), jnp.zeros((1, 5)))[0]) == float(jnp.sin(0.5))
    True
    """

    features: Callable
    apply: Callable

    def __call__(self, t, x, y):
        t = jnp.asarray(t, dtype=jnp.result_type(float))
        feats = jax.tree.map(lambda leaf: leaf[0], self.features(t[None]))
        return self.apply(feats, x, y)


def _control_inputs(control, t0, dt, num_steps):
    """The per-step inputs of ``control`` on the grid t0 + n·dt (None unless a
    :class:`GridControl`): scan them alongside the increments."""
    if not isinstance(control, GridControl):
        return None
    grid = t0 + dt * jnp.arange(num_steps, dtype=jnp.result_type(float))
    return control.features(grid)


def _call_control(control, feats, t, x, y):
    """u at step n: ``apply`` on the precomputed ``feats`` of a :class:`GridControl`."""
    if control is None:
        return None
    return control(t, x, y) if feats is None else control.apply(feats, x, y)


class MarkovSDE(NamedTuple):
    """An SDE driven by MA-fBM, written as an ordinary Markov SDE on (X, Y_1..Y_K).

    Built by :func:`markov_sde`. Shapes: latent ``x [..., D]``, OU states ``y [..., D, K]``
    (one scalar Brownian motion per latent dimension drives that dimension's K OU processes).

    :ivar drift: the prior drift b(t, x) ``[..., D]``.
    :ivar diffusion: the (diagonal) diffusion σ(t, x) ``[..., D]``.
    :ivar gammas: OU speeds γ ``[K]``.
    :ivar omega: weights ω ``[K]`` (may depend on a traced H).
    :ivar fbm_type: ``"I"`` (stationary Y(0)) or ``"II"`` (Y(0) = 0).
    :ivar ou_step: how Y advances over a step: ``"euler"`` (Y ← Y − γY dt + ΔW, the
        reference's scheme, which needs γ_max·dt < 0.5) or ``"exact"`` (the exact Gaussian
        OU transition, see :meth:`ou_transition`).
    """

    drift: Callable
    diffusion: Callable
    gammas: Any
    omega: Any
    fbm_type: str
    ou_step: str = "euler"

    @property
    def num_ou(self) -> int:
        """K, the number of OU processes."""
        return int(np.shape(self.gammas)[0])

    def y0_scale_tril(self):
        """Cholesky factor of Cov Y(0) ``[K, K]`` (type I: C_ij = 1/(γ_i+γ_j); type II: 0)."""
        g = np.asarray(self.gammas, dtype=np.float64)
        if self.fbm_type == "II":
            return _float(np.zeros((g.size, g.size)))
        return _float(np.linalg.cholesky(1.0 / (g[:, None] + g[None, :])))

    def sample_y0(self, key, batch_shape=(), dim: int = 1):
        """Draw Y(0) ``[*batch_shape, D, K]`` from its (prior = posterior) law."""
        k = self.num_ou
        if self.fbm_type == "II":
            return jnp.zeros((*batch_shape, dim, k), dtype=jnp.result_type(float))
        eps = jax.random.normal(key, (*batch_shape, dim, k), dtype=jnp.result_type(float))
        return eps @ self.y0_scale_tril().T

    def ou_transition(self, dt: float):
        """The exact law of Y(t + dt) given Y(t) and the Brownian increment ΔW (``ou_step =
        "exact"``): Y_k(t+dt) = e^{−γ_k dt} Y_k(t) + ∫_t^{t+dt} e^{−γ_k(t+dt−s)} dW_s, whose
        integral is Gaussian with covariance Σ_jk = (1 − e^{−(γ_j+γ_k)dt})/(γ_j+γ_k). Split
        along ΔW it is β ΔW + R ζ, with β_k = (1 − e^{−γ_k dt})/(γ_k dt) (the regression on
        ΔW), R Rᵀ = Σ − dt ββᵀ (what ΔW leaves free) and ζ ~ N(0, I_K) independent of ΔW. A
        control moves ΔW only (u dt), so the path KL stays ½Σ u² dt; Y is exact for every
        dt, with no step guard. Computed in float64 (Σ is nearly singular).

        :return: ``(e^{−γdt} − 1 [K], β [K], R [K, K])`` in the default float dtype.

        >>> sde = markov_sde(lambda t, x: -x, lambda t, x: 1.0, 0.5, exact_bm=True)
        >>> decay_m1, beta, resid = sde.ou_transition(0.1)   # γ = 0: the Euler step
        >>> float(decay_m1[0]) == 0.0, float(beta[0]), float(resid[0, 0])
        (True, 1.0, 0.0)
        """
        g, dt = np.asarray(self.gammas, dtype=np.float64), float(dt)
        gsum = (g[:, None] + g[None, :]) * dt
        sigma = dt * _phi(gsum)
        beta = _phi(g * dt)
        lam, vec = np.linalg.eigh(sigma - dt * np.outer(beta, beta))
        resid = vec * np.sqrt(np.clip(lam, 0.0, None))
        return _float(np.expm1(-g * dt)), _float(beta), _float(resid)

    def step(self, t, x, y, dw, dt, resid=None):
        """One step driven by the (possibly controlled) increment ``dw [..., D]``: Itô Euler
        for X, and for Y the scheme ``ou_step`` (``"exact"`` also takes the residual noise
        ``resid [..., D, K]`` ~ N(0, I), see :meth:`ou_transition`). Both read
        X ← X + b dt + σ Σ_k ω_k ΔY_k, ΔB^H = Σ_k ω_k ΔY_k being the MA-fBM increment.

        :return: ``(x [..., D], y [..., D, K])`` at t + dt.
        """
        w = jnp.asarray(self.omega)
        sig = self.diffusion(t, x)
        if self.ou_step == "exact":
            if resid is None:
                raise ValueError("ou_step='exact' needs the residual noise resid [..., D, K]")
            decay_m1, beta, r = self.ou_transition(dt)
            dy = decay_m1 * y + beta * dw[..., None] + resid @ r.T
            return x + self.drift(t, x) * dt + sig * jnp.sum(w * dy, axis=-1), y + dy
        if resid is not None:
            raise ValueError("resid is for ou_step='exact'; the Euler step has no residual")
        g = _float(self.gammas)
        drift = self.drift(t, x) - sig * jnp.sum(w * g * y, axis=-1)
        x_new = x + drift * dt + sig * jnp.sum(w) * dw
        y_new = y - g * y * dt + dw[..., None]
        return x_new, y_new

    def euler(self, x0, y0, dW, dt, t0=0.0, control=None, resid=None):
        """Itô Euler–Maruyama on the augmented state (``lax.scan``).

        Step n (t_n = t0 + n·dt, u_n = control(t_n, x_n, y_n) or 0, ΔW̃ = ΔW_n + u_n dt):
        Y ← Y − γY dt + ΔW̃, X ← X + [b − σ Σ_k ω_kγ_kY_k] dt + σ ω̄ ΔW̃, and
        KL += ½ Σ_D u_n² dt (Girsanov, discretised). With ``ou_step="exact"`` Y takes its
        exact transition instead (:meth:`ou_transition`; X stays Euler), which needs
        ``resid``.

        :param x0: ``[..., D]``; ``y0``: ``[..., D, K]``.
        :param dW: Brownian increments ``[num_steps, ..., D]`` (N(0, dt) under the prior).
        :param dt: the step; ``t0``: the start time.
        :param control: ``u(t, x, y) -> [..., D]`` (a :class:`GridControl` has its time part
            computed once for the whole grid) or None.
        :param resid: ``ou_step="exact"`` only: the residual noise ``[num_steps, ..., D, K]``
            ~ N(0, I).
        :return: ``(xs [num_steps+1, ..., D], ys [num_steps+1, ..., D, K], kl [...])``.

        >>> sde = markov_sde(lambda t, x: -x, lambda t, x: 1.0, 0.5, exact_bm=True)
        >>> xs, ys, kl = sde.euler(jnp.zeros(1), jnp.zeros((1, 1)), jnp.zeros((10, 1)), 0.1)
        >>> xs.shape, ys.shape, float(kl)
        ((11, 1), (11, 1, 1), 0.0)
        """
        x0, y0, dW = jnp.asarray(x0), jnp.asarray(y0), jnp.asarray(dW)
        lead = jnp.broadcast_shapes(x0.shape[:-1], y0.shape[:-2], dW.shape[1:-1])
        x0 = jnp.broadcast_to(x0, (*lead, x0.shape[-1]))
        y0 = jnp.broadcast_to(y0, (*x0.shape, self.num_ou))
        kl0 = jnp.zeros(jnp.shape(x0)[:-1], dtype=jnp.result_type(x0, float))

        def step(carry, inputs):
            x, y, t, kl = carry
            dw, r, feats = inputs
            if control is not None:
                u = _call_control(control, feats, t, x, y)
                kl = kl + 0.5 * jnp.sum(u * u, axis=-1) * dt
                dw = dw + u * dt
            x, y = self.step(t, x, y, dw, dt, r)
            return (x, y, t + dt, kl), (x, y)

        init = (x0, y0, jnp.asarray(t0, dtype=jnp.result_type(float)), kl0)
        feats = _control_inputs(control, init[2], dt, dW.shape[0])
        resid = None if resid is None else jnp.asarray(resid)
        (_, _, _, kl), (xs, ys) = jax.lax.scan(step, init, (dW, resid, feats))
        return (
            jnp.concatenate([x0[None], xs]),
            jnp.concatenate([y0[None], ys]),
            kl,
        )

    def milstein(self, x0, y0, ts, key, dt, control=None, t0=0.0, max_steps=4096):
        """The reference design: diffrax Stratonovich–Milstein with a virtual Brownian tree.

        One ``VirtualBrownianTree`` (tolerance dt/10) drives X and all K OU processes of a
        latent dimension with the same increment (a diagonal "weakly diagonal" noise on the
        flattened state), the path KL ½∫‖u‖²dt is carried as an extra ODE state, and the
        solution is saved at ``ts``. σ is read in the Stratonovich sense (equal to Itô when σ
        is constant). Needs ``diffrax``.

        :param x0: ``[B, D]``; ``y0``: ``[B, D, K]``; ``ts``: save times ``[T]`` (> t0).
        :param key: the PRNG key of the Brownian tree.
        :param control: u(t, x, y) ``-> [B, D]`` or None.
        :return: ``(xs [T, B, D], kl [B])``.
        """
        import diffrax
        import lineax as lx

        x0 = jnp.asarray(x0)
        b, d, k = x0.shape[0], x0.shape[1], self.num_ou
        g = _float(self.gammas)
        w = jnp.asarray(self.omega)
        wg, w_bar = w * g, jnp.sum(w)
        y0 = jnp.broadcast_to(jnp.asarray(y0), (b, d, k))
        ts = jnp.asarray(ts, dtype=x0.dtype)

        def unpack(z):
            z = z.reshape(b, d, k + 2)
            return z[..., 0], z[..., 1 : k + 1], z[..., k + 1]

        def drift(t, z, args):
            x, y, _ = unpack(z)
            sig = self.diffusion(t, x)
            u = control(t, x, y) if control is not None else jnp.zeros_like(x)
            dx = self.drift(t, x) - sig * jnp.sum(wg * y, -1) + sig * w_bar * u
            dy = -g * y + u[..., None]
            dkl = jnp.broadcast_to(0.5 * u**2, x.shape)
            return jnp.concatenate([dx[..., None], dy, dkl[..., None]], -1).reshape(-1)

        def diffusion(t, z, args):
            x, y, _ = unpack(z)
            sig = jnp.broadcast_to(self.diffusion(t, x) * w_bar, x.shape)
            diag = jnp.concatenate(
                [sig[..., None], jnp.ones_like(y), jnp.zeros_like(x)[..., None]], -1
            )
            return lx.DiagonalLinearOperator(diag.reshape(-1))

        t1 = ts[-1]
        bm = diffrax.VirtualBrownianTree(t0, t1, tol=dt / 10.0, shape=(b, d), key=key)
        noise = _SharedIncrements(bm, k)
        terms = diffrax.MultiTerm(diffrax.ODETerm(drift), diffrax.ControlTerm(diffusion, noise))
        z0 = jnp.concatenate([x0[..., None], y0, jnp.zeros((b, d, 1), x0.dtype)], -1)
        sol = diffrax.diffeqsolve(
            terms,
            diffrax.StratonovichMilstein(),
            t0,
            t1,
            dt,
            z0.reshape(-1),
            saveat=diffrax.SaveAt(ts=ts),
            max_steps=max_steps,
        )
        zs = sol.ys.reshape(-1, b, d, k + 2)
        return zs[..., 0], jnp.sum(zs[-1, ..., k + 1], axis=-1)


def _shared_increments_class():
    import diffrax

    class SharedIncrements(diffrax.AbstractPath):
        """A Brownian path ``[B, D]`` whose increment is repeated for X and the K OU states
        of each latent dimension (and 0 for the KL slot), flattened."""

        bm: diffrax.VirtualBrownianTree
        num_ou: int

        @property
        def t0(self):
            return self.bm.t0

        @property
        def t1(self):
            return self.bm.t1

        def evaluate(self, t0, t1=None, left=True, use_levy=False):
            dw = self.bm.evaluate(t0, t1, left=left)
            reps = jnp.broadcast_to(dw[..., None], (*dw.shape, self.num_ou + 1))
            zero = jnp.zeros((*dw.shape, 1), dw.dtype)
            return jnp.concatenate([reps, zero], -1).reshape(-1)

    return SharedIncrements


def _SharedIncrements(bm, num_ou):
    global _SHARED
    if _SHARED is None:
        _SHARED = _shared_increments_class()
    return _SHARED(bm, num_ou)


_SHARED = None


def markov_sde(
    drift: Callable,
    diffusion: Callable,
    hurst,
    *,
    num_ou: int = 5,
    gamma_max: float = 20.0,
    horizon: float = 1.0,
    fbm_type: str = "I",
    exact_bm: bool = False,
    unit_variance: bool = False,
    ou_step: str = "euler",
) -> MarkovSDE:
    """dX = b dt + σ dB^H, B^H ≈ MA-fBM, as a Markov SDE on (X, Y) (spec §1.4).

    :param drift: b(t, x) ``[..., D] -> [..., D]``.
    :param diffusion: σ(t, x) ``[..., D] -> [..., D]`` (or a broadcastable scalar).
    :param hurst: H ∈ (0, 1) (may be traced, e.g. sigmoid of a learned parameter).
    :param num_ou, gamma_max: the grid :func:`gamma_grid` (K = 5, γ_max = 20 by default).
    :param horizon: T of the ω optimisation (the span of the data).
    :param fbm_type: ``"I"`` or ``"II"``.
    :param exact_bm: at H = ½ use γ = [0], ω = [1] (exactly Brownian motion) instead.
    :param unit_variance: target unit-variance fBM (see :func:`optimal_omega`).
    :param ou_step: ``"euler"`` (default) or ``"exact"``: how the OU states advance over a
        step (see :class:`MarkovSDE`).

    >>> sde = markov_sde(lambda t, x: -x, lambda t, x: 1.0, 0.7, horizon=2.0)
    >>> sde.num_ou, sde.fbm_type
    (5, 'I')
    """
    fbm_type = _check_type(fbm_type)
    ou_step = check_ou_step(ou_step)
    _check_hurst(hurst)
    if exact_bm:
        if not _is_concrete(hurst) or float(hurst) != 0.5:
            raise ValueError(f"exact_bm=True needs hurst == 0.5 (Brownian motion), got {hurst}")
        return MarkovSDE(drift, diffusion, np.zeros(1), _float(np.ones(1)), "II", ou_step)
    gamma_grid(num_ou, gamma_max)  # validates
    gammas = _grid(int(num_ou), float(gamma_max))
    omega = optimal_omega(hurst, gammas, horizon, fbm_type, unit_variance=unit_variance)
    return MarkovSDE(drift, diffusion, gammas, omega, fbm_type, ou_step)


# --------------------------------------------------------------------------- the primitive


def _no_markov(*args, **kwargs):
    raise NotImplementedError(
        "fbm_sde needs a handler that makes the fractional noise Markov: run the model "
        "under ppl.transforms.fbm.markov_fbm(...)"
    )


def fbm_sde(
    name: str,
    drift: Callable,
    diffusion: Callable,
    x0,
    *,
    hurst,
    times,
    dt: float,
    fbm_type: str = "I",
    control: Callable | None = None,
    t_end: float | None = None,
    share_path: bool = False,
):
    """The primitive: X at ``times`` for dX = b dt + σ dB^H, X(0) = x0 (fractional noise).

    It only has a meaning under a handler that makes the noise Markov (:class:`markov_fbm`),
    which adds the sample sites ``f"{name}.dW"`` (Brownian increments ``[num_steps, ..., D]``)
    and, for type I, ``f"{name}.y0"`` (the stationary OU start), records the path KL
    ``½∫‖u‖²dt`` and the whole path as deterministic sites, and returns X at ``times``. A
    ``control`` u(t, x, y) turns the prior SDE into the posterior one (use the same ``name`` in
    the guide): the increments site then has the law of ΔW + u dt, and the ELBO of the core
    objective DSL is E[log-lik] − KL(q(x₀)‖p(x₀)) − E ½∫‖u‖²dt in expectation (Girsanov).

    :param x0: the start ``[..., D]``.
    :param hurst: H ∈ (0, 1) (may be traced).
    :param times: observation times ``[T]``, strictly increasing, ≥ 0 (X(0) = x0).
    :param dt: the Euler step (the number of steps is ⌈t_end/dt⌉).
    :param t_end: the end of the simulated interval (default ``times[-1]``). When ``times``
        is traced (a jitted argument) the default is the last value of the concrete times of
        the same shape that :class:`markov_fbm` last ran this site with (e.g. at
        ``SVI.init``), checked at run time; without such a run, ``t_end`` is needed.
    :param share_path: guide only (with ``control``). ``True`` declares that this posterior
        SDE has the prior's drift, diffusion and Hurst index, with the same parameters, and
        changes only the noise (the paper's posterior, as in
        :class:`~ppl.models.fbm_sde.LatentSDE`). The increments then drive the same path
        under both programs, so the model, replayed on this guide's draw, reuses the path
        of the guide's Euler scan instead of running its own (one scan and its backward
        pass fewer per step; same values). A value that is not the guide's own draw (e.g.
        a forced or substituted one) is always replayed. With ``False`` (default) the model
        replays every path. If the two programs' dynamics differ, ``True`` gives a wrong
        ELBO.
    :return: X at ``times``: ``[T, ..., D]``.
    """
    if name is None or not isinstance(name, str):
        raise TypeError(f"name must be a string, got {name!r}")
    if share_path and control is None:
        raise ValueError("share_path=True is for the guide's fbm_sde: it needs a control")
    msg = {
        "type": FBM_SDE,
        "fn": _no_markov,
        "args": (name, drift, diffusion, x0),
        "kwargs": dict(
            hurst=hurst,
            times=times,
            dt=dt,
            fbm_type=_check_type(fbm_type),
            control=control,
            t_end=t_end,
        ),
        "value": None,
    }
    if share_path:  # only then, so that other handlers of FBM_SDE need not know the option
        msg["kwargs"]["share_path"] = True
    if not _PYRO_STACK:
        return _no_markov()
    return apply_stack(msg)["value"]


def _drift_and_scale(out, x):
    """Split a control's output into ``(u, s)``: ``s`` is None for a drift-only control."""
    if out is None:
        return jnp.zeros_like(x), None
    return out if isinstance(out, tuple) else (out, None)


class ControlledIncrements(dist.Distribution):
    """The law of the Brownian increments of a controlled Markov SDE (a sequential Normal).

    ΔW̃_n | past ~ N(u_n·dt, dt), with u_n = control(t_n, x_n, y_n) at the state reached by
    ΔW̃_{<n}; without control, iid N(0, dt). ``log_prob`` re-runs the path, so the density
    ratio to the uncontrolled law is exact, −Σ u_n ΔW̃_n + ½ Σ u_n² dt, whose expectation under
    this law is −½ Σ u_n² dt (Girsanov): the ELBO and the importance weights over paths are
    the true ones for the discretised SDE.

    A control may also return a pair ``(u, s)`` with a noise scale ``s > 0`` of the same
    shape: then ΔW̃_n | past ~ N(u_n dt, s_n² dt). This family exists only in discrete time
    (the expected log ratio gains ½Σ(s_n² − 1 − log s_n²), which diverges as dt → 0 unless
    s → 1). On a coarse grid with precise observations it can undo the noise of the last step
    before an observation, which a drift change alone cannot do.

    :param sde: a :class:`MarkovSDE`.
    :param x0: the start ``[*batch, D]``; ``y0``: ``[*batch, D, K]``.
    :param num_steps: N; ``dt``: the step; ``control``: u(t, x, y) ``-> [*batch, D]`` (or
        ``-> (u, s)``, both ``[*batch, D]``).
    :param kl_gradient: ``"exact"`` (default): a drawn value's log density is differentiated
        as it is, so the gradient of log p − log q carries the zero-mean martingale term
        −Σ ξ_n ∂u_n (ξ_n = ΔW̃_n − u_n dt, the noise part of the increment), unbiased for
        every objective. ``"expected"``: the same value, with that term removed from the
        gradient, so the ELBO's gradient is that of the Girsanov expectation ½Σ u_n² dt (the
        reference's estimator): lower variance, unbiased for the ELBO (any number of
        averaged particles), **biased** for IWELBO/Rényi, whose weights correlate with ξ.

    :param resid: ``sde.ou_step == "exact"`` only: the residual noise of the OU states
        ``[*batch, N, D, K]`` (a given draw, the same under both laws; see
        :meth:`MarkovSDE.ou_transition`).

    Batch shape ``batch``, event shape ``[N, D]`` (values ``[*batch, N, D]``).
    """

    arg_constraints = {}
    support = dist.constraints.real
    has_rsample = True
    pytree_data_fields = ()
    pytree_aux_fields = (
        "sde", "x0", "y0", "num_steps", "dt", "control", "kl_gradient", "resid",
    )  # fmt: skip

    def __init__(self, sde, x0, y0, num_steps, dt, control=None, kl_gradient="exact", resid=None):
        if kl_gradient not in ("exact", "expected"):
            raise ValueError(f"kl_gradient must be 'exact' or 'expected', got {kl_gradient!r}")
        if (resid is None) != (sde.ou_step != "exact"):
            raise ValueError("resid is needed with ou_step='exact', and only then")
        self.sde, self.x0, self.y0 = sde, jnp.asarray(x0), jnp.asarray(y0)
        self.num_steps, self.dt, self.control = int(num_steps), float(dt), control
        self.kl_gradient = kl_gradient
        self.resid = None if resid is None else jnp.asarray(resid)
        batch, d = jnp.shape(self.x0)[:-1], jnp.shape(self.x0)[-1]
        super().__init__(batch_shape=batch, event_shape=(self.num_steps, d))

    def _walk(self, inc, add_drift):
        """Walk the path. ``add_drift``: ``inc`` is the noise ξ ``[*lead, N, D]`` (ξ_n ~ N(0,
        dt)) and ΔW̃_n = s_n ξ_n + u_n dt; else ``inc`` is ΔW̃ itself. Returns (ΔW̃
        ``[N, *lead, D]``, the path X ``[N+1, *lead, D]``, u ``[N, *lead, D]``, s (or None),
        the increment's noise part ΔW̃ − u dt ``[N, *lead, D]``)."""
        dt, sde, control = self.dt, self.sde, self.control

        def step(carry, inputs):
            x, y, t = carry
            d, r, feats = inputs
            u, s = _drift_and_scale(_call_control(control, feats, t, x, y), x)
            if add_drift:  # d is ξ_n ~ N(0, dt)
                dw = (d if s is None else s * d) + u * dt
            else:
                dw = d
            x, y = sde.step(t, x, y, dw, dt, r)
            return (x, y, t + dt), (dw, x, u, s)

        lead = jnp.shape(inc)[:-2]  # [*sample, *batch]
        x0 = jnp.broadcast_to(self.x0, (*lead, self.x0.shape[-1]))
        y0 = jnp.broadcast_to(self.y0, (*x0.shape, sde.num_ou))
        t0 = jnp.zeros((), dtype=jnp.result_type(float))
        feats = _control_inputs(control, t0, dt, self.num_steps)
        inc = jnp.moveaxis(inc, -2, 0)
        resid = self.resid
        if resid is not None:  # [*batch, N, D, K] -> [N, *lead, D, K]
            resid = jnp.broadcast_to(resid, (*lead, *resid.shape[-3:]))
            resid = jnp.moveaxis(resid, -3, 0)
        _, (dws, xs, us, ss) = jax.lax.scan(step, (x0, y0, t0), (inc, resid, feats))
        if add_drift:
            noise = inc if ss is None else ss * inc
        else:
            noise = dws - us * dt
        return dws, jnp.concatenate([x0[None], xs]), us, ss, noise

    def _scan(self, inc, add_drift):
        """Walk the path; returns (controlled increments ``[*batch, N, D]``,
        Σ_n log N(ΔW̃_n; u_n dt, s_n² dt) ``[*batch]`` (s ≡ 1 for a drift-only control), the
        path X ``[N+1, *batch, D]``).

        The density is summed after the scan from the stacked u, s and noise: no running sum
        in the loop. From a draw (``add_drift``) the noise is s ξ, so log N(s ξ; 0, s² dt) =
        log N(ξ; 0, dt) − log s, which depends on the parameters through s only (u cancels).
        """
        dws, xs, us, ss, noise = self._walk(inc, add_drift)
        dt = self.dt
        if add_drift:
            xi = jnp.moveaxis(inc, -2, 0)
            terms = -0.5 * math.log(2 * math.pi * dt) - 0.5 * xi**2 / dt
            if ss is not None:
                terms = terms - jnp.log(ss)
        else:
            var = dt if ss is None else ss * ss * dt
            terms = -0.5 * jnp.log(2 * math.pi * var) - 0.5 * noise**2 / var
        lp = jnp.sum(terms, axis=(0, -1))
        if add_drift and self.kl_gradient == "expected":
            # value unchanged; gradient −Σ ξ ∂u cancels the martingale term in log p
            m = jnp.sum(noise * us, axis=(0, -1))
            lp = lp - m + jax.lax.stop_gradient(m)
        return jnp.moveaxis(dws, 0, -2), lp, xs

    def rsample(self, key, sample_shape=()):
        shape = (*sample_shape, *self.batch_shape, *self.event_shape)
        xi = jax.random.normal(key, shape, dtype=jnp.result_type(float)) * math.sqrt(self.dt)
        if self.control is None:
            return xi
        # One pass gives the draw, its log density and the path: ξ ↦ ΔW̃ is triangular with
        # diagonal s_n (1 without a scale), so log q(ΔW̃) = Σ log N(ξ_n; 0, dt) − Σ log s_n in
        # value and in θ-derivative.
        value, lp, xs = self._scan(xi, add_drift=True)
        self._cache = (value, lp, xs)
        return value

    def sample(self, key, sample_shape=()):
        return self.rsample(key, sample_shape)

    def _cached(self, value):
        cache = getattr(self, "_cache", None)
        return cache if cache is not None and cache[0] is value else None

    def log_prob(self, value):
        cache = self._cached(value)
        return cache[1] if cache is not None else self._scan(value, add_drift=False)[1]

    def path(self, value):
        """The X path ``[N+1, *batch, D]`` these increments drive (cached after a draw)."""
        cache = self._cached(value)
        return cache[2] if cache is not None else self._scan(value, add_drift=False)[2]


def _check_times(times, dt=None, allow_zero: bool = True) -> np.ndarray:
    if not _is_concrete(times):
        raise TypeError("times must be concrete (the grid of an fbm_sde is fixed)")
    ts = np.asarray(times, dtype=np.float64)
    if ts.ndim != 1 or ts.size < 1:
        raise ValueError(f"times must be a non-empty 1-d array, got shape {ts.shape}")
    first_ok = ts[0] >= 0.0 if allow_zero else ts[0] > 0.0
    if not np.all(np.isfinite(ts)) or not first_ok or np.any(np.diff(ts) <= 0.0):
        bound = "≥ 0" if allow_zero else "> 0"
        raise ValueError(f"times must be finite, {bound} and strictly increasing, got {ts}")
    return ts


def interpolate(xs, times, dt):
    """Linear interpolation of a path on the grid n·dt (``xs [N+1, ..., D]``) at ``times``.

    :param times: ``[T]`` in [0, N·dt] (may be traced).
    :return: ``[T, ..., D]``.

    >>> print(interpolate(jnp.arange(5.0)[:, None], jnp.array([0.0, 0.25, 0.4]), 0.1)[:, 0])
    [0.  2.5 4. ]
    """
    pos = jnp.asarray(times, dtype=xs.dtype) / dt
    lo = jnp.clip(jnp.floor(pos + 1e-6).astype(jnp.int32), 0, xs.shape[0] - 1)
    hi = jnp.minimum(lo + 1, xs.shape[0] - 1)
    frac = jnp.clip(pos - lo, 0.0, 1.0).reshape((-1,) + (1,) * (xs.ndim - 1))
    return xs[lo] * (1.0 - frac) + xs[hi] * frac


def _raise_setup_end(name, last, t_end):
    """Run-time error for traced ``times`` that end off the grid taken from a concrete run
    (a host callback, run only when they do)."""

    def check(last):
        if abs(float(last) - t_end) > 1e-6 * t_end:
            raise ValueError(
                f"fbm_sde {name!r}: the traced times end at {float(last):g}, but markov_fbm "
                f"set the Euler grid up for times ending at {t_end:g} (its last run with "
                "concrete times): for times that change, give fbm_sde a t_end= that covers "
                "them all"
            )

    jax.debug.callback(check, last)


#: Key of a guide's increments site ``infer`` dict that carries its law (``share_path``).
_SHARED_PATH = "fbm_shared_path"


class _site_infer(Messenger):
    """Record the ``infer`` dict of site ``name`` as it leaves the handler stack (after a
    ``replay`` has copied the guide's)."""

    def __init__(self, name):
        self.name, self.infer = name, {}
        super().__init__()

    def __enter__(self):
        super().__enter__()
        return self.infer

    def postprocess_message(self, msg):
        if msg["type"] == "sample" and msg["name"] == self.name:
            self.infer.update(msg.get("infer") or {})


def _shared_path(infer, inc, sde, x0, y0, dt, resid=None):
    """The guide's path ``[N+1, *lead, D]`` for increments ``inc`` if the guide shared it
    (``share_path``), ``inc`` is the guide's own draw, and the guide walked it from the same
    start (``x0``; ``y0`` for type I; ``resid`` for ``ou_step="exact"``: the same arrays,
    e.g. the replayed sites) on the same grid, OU speeds and scheme; else None (the model
    replays). The drift, diffusion, H and their
    parameters cannot be compared: ``share_path=True`` promises that they are the model's.
    """
    law = infer.get(_SHARED_PATH)
    cache = law._cached(inc) if isinstance(law, ControlledIncrements) else None
    if cache is None:
        return None
    guide = law.sde
    same = (
        law.dt == dt
        and law.x0 is x0
        and guide.fbm_type == sde.fbm_type
        and guide.ou_step == sde.ou_step
        and np.array_equal(np.asarray(guide.gammas), np.asarray(sde.gammas))
        and (sde.fbm_type == "II" or law.y0 is y0)
        and law.resid is resid
    )
    shape = (inc.shape[-2] + 1, *inc.shape[:-2], inc.shape[-1])
    return cache[2] if same and cache[2].shape == shape else None


class markov_fbm(Messenger):
    """The program transformation: every :func:`fbm_sde` becomes the Markov MA-fBM SDE.

    Each ``fbm_sde(name, ...)`` call is replaced by the augmented SDE of :func:`markov_sde`,
    simulated by Euler–Maruyama on the grid n·dt, with sample sites

    * ``f"{name}.y0"`` ``[*batch, D, K]`` — type I only: the stationary OU start N(0, C),
      C_ij = 1/(γ_i+γ_j) (the same law under prior and posterior: it cancels in the ELBO);
    * ``f"{name}.resid"`` ``[*batch, N, D, K]`` — ``ou_step="exact"`` only: the OU states'
      residual noise given ΔW, iid N(0, 1) (the same law under prior and posterior: it
      cancels in the ELBO);
    * ``f"{name}.dW"`` ``[*batch, N, D]`` — the Brownian increments: iid N(0, dt) without a
      control, :class:`ControlledIncrements` with one;

    and the deterministic site ``name`` (X at the observation ``times``, ``[*batch, T, D]``).

    :param num_ou: K; ``gamma_max``: the largest speed (with ``ou_step="euler"`` the guard
        γ_max·dt < 0.5 is enforced).
    :param horizon: T of the ω optimisation; default: the last observation time.
    :param exact_bm: at H = ½, exactly Brownian motion (γ = [0], ω = [1]).
    :param unit_variance: target unit-variance fBM instead of the Γ-normalised one.
    :param kl_gradient: ``"exact"`` or ``"expected"`` (the ELBO-only, lower-variance path
        gradient): see :class:`ControlledIncrements`.
    :param ou_step: ``"euler"`` (default; the reference's scheme) or ``"exact"`` (the OU
        states take their exact Gaussian transition over each step, X stays Euler; no step
        guard): see :meth:`MarkovSDE.ou_transition`.

    The number of Euler steps ⌈t_end/dt⌉ is static. When a site's ``times`` are traced (a
    jitted argument, as in :class:`ppl.inference.SVI`'s compiled step) and its ``t_end`` is not
    given, the handler uses the ``times[-1]`` of its last run of that site with concrete times
    of the same shape (``SVI.init`` is one), as ``numpyro.infer.SVI.run``, which closes over
    its arguments, does; traced times that end elsewhere give NaN and a run-time error.

    Example (an fOU prior; the guide would pass ``control=``):

    >>> from numpyro.handlers import seed, trace
    >>> def model():
    ...     xs = fbm_sde("x", lambda t, x: -x, lambda t, x: 1.0, jnp.zeros(1), hurst=0.7,
    ...                  times=jnp.linspace(0.1, 1.0, 10), dt=0.02)
    ...     numpyro.sample("obs", dist.Normal(xs, 0.1).to_event(2), obs=jnp.zeros((10, 1)))
    >>> tr = trace(seed(markov_fbm(model, num_ou=5, gamma_max=20.0), 0)).get_trace()
    >>> [(k, tr[k]["value"].shape) for k in tr]
    [('x.y0', (1, 5)), ('x.dW', (50, 1)), ('x', (10, 1)), ('obs', (10, 1))]
    """

    def __init__(
        self,
        fn=None,
        *,
        num_ou: int = 5,
        gamma_max: float = 20.0,
        horizon: float | None = None,
        exact_bm: bool = False,
        unit_variance: bool = False,
        kl_gradient: str = "exact",
        ou_step: str = "euler",
    ):
        gamma_grid(num_ou, gamma_max)  # validates both
        check_ou_step(ou_step)
        if kl_gradient not in ("exact", "expected"):
            raise ValueError(f"kl_gradient must be 'exact' or 'expected', got {kl_gradient!r}")
        if horizon is not None:
            _check_horizon(horizon)
        self.config = dict(
            num_ou=int(num_ou),
            gamma_max=float(gamma_max),
            horizon=horizon,
            exact_bm=bool(exact_bm),
            unit_variance=bool(unit_variance),
            kl_gradient=kl_gradient,
            ou_step=ou_step,
        )
        # site name -> (shape, last value) of the concrete times it last ran with: the
        # static grid of a later traced run with the same times (no t_end needed, as when
        # numpyro.infer.SVI.run closes over them)
        self._setup_ends: dict[str, tuple[tuple, float]] = {}
        super().__init__(fn)

    def process_message(self, msg):
        if msg["type"] == FBM_SDE:
            msg["fn"] = self._path

    def _path(
        self,
        name,
        drift,
        diffusion,
        x0,
        *,
        hurst,
        times,
        dt,
        fbm_type,
        control,
        t_end,
        share_path=False,
    ):
        cfg = self.config
        guard_end = None  # the traced times' last value must equal this (a grid from setup)
        if _is_concrete(times):
            ts = _check_times(times, dt)
            if t_end is None:
                t_end = float(ts[-1])
                self._setup_ends[name] = (ts.shape, t_end)
            t_end = float(t_end)
            if ts[-1] > t_end * (1 + 1e-6):
                raise ValueError(f"times reach {ts[-1]:g}, beyond t_end = {t_end:g}")
        elif t_end is None:
            seen = self._setup_ends.get(name)
            if seen is None or seen[0] != jnp.shape(times):
                raise ValueError(
                    f"fbm_sde {name!r}: times is traced (a jitted argument) and this "
                    "markov_fbm has not run the site with concrete times of that shape, so "
                    "the number of Euler steps ⌈t_end/dt⌉ is unknown: give t_end= (the end "
                    "of the simulated interval), or run the program once with concrete "
                    "times first (ppl.inference.SVI.init does)"
                )
            t_end = guard_end = seen[1]
        t_end = _check_horizon(t_end)
        ts = times
        x0 = jnp.asarray(x0)
        if x0.ndim < 1:
            raise ValueError(f"x0 must have a latent dimension [..., D], got shape {x0.shape}")
        horizon = cfg["horizon"] if cfg["horizon"] is not None else t_end
        sde = markov_sde(
            drift,
            diffusion,
            hurst,
            num_ou=cfg["num_ou"],
            gamma_max=cfg["gamma_max"],
            horizon=horizon,
            fbm_type=fbm_type,
            exact_bm=cfg["exact_bm"],
            unit_variance=cfg["unit_variance"],
            ou_step=cfg["ou_step"],
        )
        dt = check_step(dt, sde.gammas, ou_step=sde.ou_step)
        num_steps = int(math.ceil(t_end / dt - 1e-9))
        batch, d = x0.shape[:-1], x0.shape[-1]
        if sde.fbm_type == "I":
            y0_law = dist.MultivariateNormal(jnp.zeros(sde.num_ou), scale_tril=sde.y0_scale_tril())
            y0 = numpyro.sample(f"{name}.y0", y0_law.expand((*batch, d)).to_event(1))
        else:
            y0 = jnp.zeros((*batch, d, sde.num_ou), dtype=jnp.result_type(float))
        resid = None
        if sde.ou_step == "exact":
            r_law = dist.Normal(0.0, 1.0).expand((*batch, num_steps, d, sde.num_ou))
            resid = numpyro.sample(f"{name}.resid", r_law.to_event(3))
        if control is None:
            law = dist.Normal(0.0, math.sqrt(dt)).expand((*batch, num_steps, d)).to_event(2)
            with _site_infer(f"{name}.dW") as infer:
                inc = numpyro.sample(f"{name}.dW", law)
            xs = _shared_path(infer, inc, sde, x0, y0, dt, resid)
            if xs is None:
                r = None if resid is None else jnp.moveaxis(resid, -3, 0)
                xs, _, _ = sde.euler(x0, y0, jnp.moveaxis(inc, -2, 0), dt, resid=r)
        else:
            law = ControlledIncrements(
                sde, x0, y0, num_steps, dt, control, cfg["kl_gradient"], resid
            )
            infer = {_SHARED_PATH: law} if share_path else None
            inc = numpyro.sample(f"{name}.dW", law, infer=infer)
            xs = law.path(inc)
        at_times = jnp.moveaxis(interpolate(xs, ts, dt), 0, -2)
        if guard_end is not None:  # NaN, and an error from the host, if times end elsewhere
            off = jnp.abs(times[-1] - guard_end) > 1e-6 * guard_end
            lax.cond(off, lambda: _raise_setup_end(name, times[-1], guard_end), lambda: None)
            at_times = jnp.where(off, jnp.nan, at_times)
        return numpyro.deterministic(name, at_times)
