"""Gaussian processes in state-space form: Matérn kernels as linear SDEs (spec ``funbat.md`` §1.2).

A Matérn GP with smoothness ν ∈ {½, 3/2, 5/2} on a 1-D index is the first coordinate of a
linear time-invariant SDE ``dz = F z dt + L dβ`` (``E[dβ²] = Qc dt``), ``u = H z``, started
in its stationary law ``N(0, Pinf)``. On sorted indexes ``t_1 < … < t_n`` it is a Gaussian
Markov chain ``z_{s+1} = A_s z_s + q_s``, ``A_s = expm(F Δ_s)``, ``q_s ~ N(0, Q_s)``,
``Q_s = Pinf − A_s Pinf A_sᵀ``, so densities, posteriors and draws cost O(n d³) by Kalman
filtering (:mod:`ppl.inference.kalman`) instead of O(n³) for the dense covariance.

* :class:`Matern` -- the kernel (a pytree; ``nu`` is static), callable as ``k(x1, x2)``.
* :func:`lti_sde` -- ``Matern -> LTISDE(F, L, Qc, H, Pinf)``; :func:`discretize` -- the chain's
  ``(A, Q)`` on a grid.
* :class:`GaussianProcess` -- a NumPyro distribution over the values at ``index`` (dense
  covariance); :class:`StateSpaceGP` -- the same law, log-density by Kalman filtering.
* :func:`state_space` -- the program transformation that swaps every ``GaussianProcess``
  site of a model (or the listed ones) for its ``StateSpaceGP``.

Example (the two densities agree)::

    >>> import jax, numpy as np
    >>> from numpyro import handlers
    >>> import numpyro
    >>> def model():
    ...     numpyro.sample("f", GaussianProcess(Matern(1.5, 0.7, 1.3), np.array([0.3, 0.1, 2.0])))
    >>> with jax.enable_x64(True):
    ...     dense = handlers.trace(handlers.seed(model, 0)).get_trace()["f"]
    ...     ss = handlers.trace(handlers.seed(state_space(model), 0)).get_trace()["f"]
    ...     x = np.array([0.2, -0.1, 0.5])
    ...     bool(abs(dense["fn"].log_prob(x) - ss["fn"].log_prob(x)) < 1e-10)
    True
    >>> type(ss["fn"]).__name__, ss["infer"]["state_space"]["perm"].tolist()
    ('StateSpaceGP', [1, 0, 2])
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
from jax import lax
from numpyro.distributions import constraints
from numpyro.distributions.util import lazy_property
from numpyro.primitives import Messenger

__all__ = [
    "GaussianProcess",
    "LTISDE",
    "Matern",
    "StateSpaceGP",
    "discretize",
    "lti_sde",
    "stack_sde",
    "state_space",
    "transition",
]

_NUS = (0.5, 1.5, 2.5)
_LOG_2PI = math.log(2.0 * math.pi)


def _check_nu(nu) -> float:
    if isinstance(nu, bool) or not isinstance(nu, numbers.Real):
        raise TypeError(f"nu must be one of 1/2, 3/2, 5/2 (a Python number), got {nu!r}")
    for ok in _NUS:
        if abs(float(nu) - ok) < 1e-12:
            return ok
    raise ValueError(f"nu must be one of 1/2, 3/2, 5/2 (Matérn state-space forms), got {nu!r}")


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _check_positive(value, name: str, *, allow_zero: bool = False):
    if _is_concrete(value):
        v = np.asarray(value, dtype=np.float64)
        bad = np.any(v < 0) if allow_zero else np.any(v <= 0)
        if not np.all(np.isfinite(v)) or bad:
            bound = ">= 0" if allow_zero else "> 0"
            raise ValueError(f"{name} must be finite and {bound}, got {value!r}")
    return value


def _is_zero(value) -> bool:
    """``value`` is known (concrete) to be 0; a traced value is not."""
    return _is_concrete(value) and not np.any(np.asarray(value))


@jax.tree_util.register_pytree_node_class
class Matern:
    """Matérn kernel ``k(r) = σ² · p_ν(√(2ν) r/ℓ) · exp(−√(2ν) r/ℓ)`` for ν ∈ {½, 3/2, 5/2}.

    :param float nu: smoothness, one of ``0.5, 1.5, 2.5`` (static: a Python number).
    :param lengthscale: ℓ > 0, scalar (may be traced).
    :param variance: σ² > 0, scalar (may be traced).

    Calling it gives the covariance matrix: ``Matern(...)(x1: f[n], x2: f[m]) -> f[n, m]``.

    >>> k = Matern(0.5, 2.0, 3.0)
    >>> abs(float(k(np.array([0.0]), np.array([2.0]))[0, 0]) - 3.0 * math.exp(-1.0)) < 1e-6
    True
    """

    def __init__(self, nu, lengthscale=1.0, variance=1.0):
        self.nu = _check_nu(nu)
        self.lengthscale = _check_positive(lengthscale, "lengthscale")
        self.variance = _check_positive(variance, "variance")

    def tree_flatten(self):
        return (self.lengthscale, self.variance), self.nu

    @classmethod
    def tree_unflatten(cls, nu, leaves):
        obj = object.__new__(cls)
        obj.nu = nu
        obj.lengthscale, obj.variance = leaves
        return obj

    def __repr__(self):
        return f"Matern(nu={self.nu}, lengthscale={self.lengthscale}, variance={self.variance})"

    def __call__(self, x1, x2):
        x1 = jnp.asarray(x1)
        x2 = jnp.asarray(x2)
        r = jnp.abs(x1[:, None] - x2[None, :]) * math.sqrt(2.0 * self.nu) / self.lengthscale
        if self.nu == 0.5:
            poly = 1.0
        elif self.nu == 1.5:
            poly = 1.0 + r
        else:
            poly = 1.0 + r + r * r / 3.0
        return self.variance * poly * jnp.exp(-r)


class LTISDE(NamedTuple):
    """``dz = F z dt + L dβ``, ``E[dβ²] = Qc dt``, ``u = H z``, stationary covariance ``Pinf``.

    Shapes ``F (d, d)``, ``L (d, 1)``, ``Qc ()``, ``H (1, d)``, ``Pinf (d, d)``.
    """

    F: jax.Array
    L: jax.Array
    Qc: jax.Array
    H: jax.Array
    Pinf: jax.Array


def lti_sde(kernel: Matern) -> LTISDE:
    """The LTI SDE of a Matérn kernel (spec §1.2 table, λ = √(2ν)/ℓ).

    :param Matern kernel: the kernel.
    :return: ``LTISDE(F (d,d), L (d,1), Qc (), H (1,d), Pinf (d,d))`` with d = ν + ½.

    >>> sde = lti_sde(Matern(1.5, 1.0, 2.0))
    >>> np.asarray(sde.Pinf).round(6).tolist()
    [[2.0, 0.0], [0.0, 6.0]]
    """
    if not isinstance(kernel, Matern):
        raise TypeError(f"kernel must be a Matern, got {type(kernel).__name__}")
    lam = math.sqrt(2.0 * kernel.nu) / jnp.asarray(kernel.lengthscale, dtype=float)
    s2 = jnp.asarray(kernel.variance, dtype=float)
    z = jnp.zeros_like(lam)
    one = jnp.ones_like(lam)
    if kernel.nu == 0.5:
        F = jnp.reshape(-lam, (1, 1))
        Qc = 2.0 * s2 * lam
        Pinf = jnp.reshape(s2, (1, 1))
    elif kernel.nu == 1.5:
        F = jnp.array([[z, one], [-(lam**2), -2.0 * lam]])
        Qc = 4.0 * s2 * lam**3
        Pinf = jnp.array([[s2, z], [z, lam**2 * s2]])
    else:
        F = jnp.array([[z, one, z], [z, z, one], [-(lam**3), -3.0 * lam**2, -3.0 * lam]])
        Qc = 16.0 / 3.0 * s2 * lam**5
        kap = s2 * lam**2 / 3.0
        Pinf = jnp.array([[s2, z, -kap], [z, kap, z], [-kap, z, s2 * lam**4]])
    d = F.shape[0]
    L = jnp.zeros((d, 1)).at[d - 1, 0].set(1.0)
    H = jnp.zeros((1, d)).at[0, 0].set(1.0)
    return LTISDE(F, L, Qc, H, Pinf)


def transition(sde: LTISDE, dt) -> tuple[jax.Array, jax.Array]:
    """``(A, Q)`` of one step ``dt >= 0`` (any batch shape ``[...]``): ``A, Q f[..., d, d]``."""
    return _transition(sde, jnp.asarray(dt, dtype=sde.F.dtype))


@jax.jit
def _transition(sde, dt):
    d = sde.F.shape[0]
    if d == 1:
        A = jnp.exp(sde.F[0, 0] * dt)[..., None, None]
    else:
        flat = dt.reshape(-1)
        A = jax.vmap(lambda h: jax.scipy.linalg.expm(sde.F * h))(flat)
        A = A.reshape(dt.shape + (d, d))
    Q = sde.Pinf - A @ sde.Pinf @ jnp.swapaxes(A, -1, -2)
    return A, 0.5 * (Q + jnp.swapaxes(Q, -1, -2))


def discretize(sde: LTISDE, t) -> tuple[jax.Array, jax.Array]:
    """The Markov chain of ``sde`` on sorted indexes ``t f[n]``.

    :return: ``(A f[n, d, d], Q f[n, d, d])`` with ``A[0] = I``, ``Q[0] = Pinf`` (the
        stationary start) and, for s ≥ 1, ``A[s] = expm(F (t[s] − t[s−1]))``,
        ``Q[s] = Pinf − A[s] Pinf A[s]ᵀ``.

    >>> A, Q = discretize(lti_sde(Matern(0.5, 0.7, 1.3)), np.array([0.0, 0.25]))
    >>> round(float(A[1, 0, 0]), 6), round(float(Q[1, 0, 0]), 6)
    (0.699673, 0.663596)
    """
    t = jnp.asarray(t, dtype=sde.F.dtype)
    if t.ndim != 1:
        raise ValueError(f"t must be a 1-D array of sorted indexes, got shape {t.shape}")
    if _is_concrete(t) and t.size > 1 and np.any(np.diff(np.asarray(t)) < 0):
        raise ValueError("t must be sorted in increasing order")
    dt = jnp.concatenate([jnp.zeros((1,), t.dtype), jnp.diff(t)])
    A, Q = transition(sde, dt)
    d = sde.F.shape[0]
    A = A.at[0].set(jnp.eye(d, dtype=A.dtype))
    Q = Q.at[0].set(sde.Pinf)
    return A, Q


def _check_index(index, name: str = "index") -> np.ndarray | jax.Array:
    if _is_concrete(index):
        arr = np.asarray(index)
        if arr.ndim != 1 or arr.size == 0:
            raise ValueError(f"{name} must be a non-empty 1-D array, got shape {arr.shape}")
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"{name} must be finite (got NaN or inf)")
        return arr
    if jnp.ndim(index) != 1:
        raise ValueError(f"{name} must be a 1-D array, got shape {jnp.shape(index)}")
    return index


def _batched(fn, value, event_ndim: int):
    """Apply ``fn`` to each event of ``value`` (leading batch dims flattened)."""
    batch = value.shape[: value.ndim - event_ndim]
    flat = value.reshape((-1,) + value.shape[value.ndim - event_ndim :])
    return jax.vmap(fn)(flat).reshape(batch)


class GaussianProcess(dist.Distribution):
    """The values ``f(index)`` of a zero-mean GP with a :class:`Matern` kernel: a dense MVN.

    :param Matern kernel: the covariance function.
    :param index: ``f[n]`` the (finite) indexes; the event shape is ``(n,)``.
    :param jitter: ``σ² >= 0`` added to the covariance diagonal (default 0: none), a scalar
        (may be traced). It is the variance of white noise on each value: ``f(index) + ε``,
        ``ε ~ N(0, σ² I)``.

    Under :func:`state_space` the site becomes a :class:`StateSpaceGP` with the same density
    (the jitter becomes that white noise on the state-space observations).
    The covariance and its Cholesky factor are computed lazily (a substituted site costs
    nothing).

    >>> gp = GaussianProcess(Matern(0.5, 1.0, 1.0), np.array([0.0, 1.0]))
    >>> gp.event_shape
    (2,)
    """

    arg_constraints = {}
    support = constraints.real_vector
    reparametrized_params = []
    pytree_aux_fields = ("kernel", "index", "jitter")

    def __init__(self, kernel: Matern, index, *, jitter: float = 0.0, validate_args=None):
        if not isinstance(kernel, Matern):
            raise TypeError(f"kernel must be a Matern, got {type(kernel).__name__}")
        self.kernel = kernel
        self.index = _check_index(index)
        if jnp.ndim(jitter) != 0:
            raise ValueError(f"jitter must be a scalar, got shape {jnp.shape(jitter)}")
        self.jitter = _check_positive(jitter, "jitter", allow_zero=True)
        super().__init__(
            batch_shape=(), event_shape=(jnp.shape(self.index)[0],), validate_args=validate_args
        )

    @lazy_property
    def covariance_matrix(self):
        x = jnp.asarray(self.index, dtype=float)
        K = self.kernel(x, x)
        return K + self.jitter * jnp.eye(x.shape[0], dtype=K.dtype)

    @lazy_property
    def scale_tril(self):
        return jnp.linalg.cholesky(self.covariance_matrix)

    def sample(self, key, sample_shape=()):
        n = self.event_shape[0]
        eps = jax.random.normal(key, sample_shape + self.batch_shape + (n,))
        return jnp.einsum("ij,...j->...i", self.scale_tril, eps)

    def log_prob(self, value):
        Lc = self.scale_tril
        n = self.event_shape[0]

        def one(v):
            w = jax.scipy.linalg.solve_triangular(Lc, v, lower=True)
            return -0.5 * (w @ w) - jnp.sum(jnp.log(jnp.diag(Lc))) - 0.5 * n * _LOG_2PI

        return _batched(one, jnp.asarray(value), 1)

    @property
    def mean(self):
        return jnp.zeros(self.batch_shape + self.event_shape)

    @property
    def variance(self):
        return jnp.broadcast_to(jnp.diag(self.covariance_matrix), self.event_shape)


def _sqrt_psd(M):
    """A square root ``S`` with ``S Sᵀ = M`` for a PSD ``M`` (eigen-decomposition; exact at
    singular M, e.g. the zero-gap transitions of merged indexes)."""
    w, V = jnp.linalg.eigh(0.5 * (M + M.T))
    return V * jnp.sqrt(jnp.clip(w, 0.0))


class StateSpaceGP(dist.Distribution):
    """:class:`GaussianProcess` in state-space form: the same law, O(n d³) log-density.

    :param LTISDE sde: from :func:`lti_sde`.
    :param index: ``f[n]`` finite indexes in any order. Without noise, repeats are merged
        (the value at a repeated index must be repeated; the density is that of the unique
        ones); with noise each value has its own.
    :param noise: ``σ² >= 0``, the variance of white observation noise: the law is that of
        ``H z(index) + ε``, ``ε ~ N(0, σ² I)`` (:class:`GaussianProcess`'s ``jitter``), a scalar
        (may be traced). The Kalman filter adds it to each innovation variance.

    ``perm`` is the sorting permutation (``index[perm]`` is sorted) and ``grid`` the sorted
    unique indexes.

    >>> ss = StateSpaceGP(lti_sde(Matern(0.5, 1.0, 1.0)), np.array([1.0, 0.0]))
    >>> ss.perm.tolist(), ss.grid.tolist()
    ([1, 0], [0.0, 1.0])
    """

    arg_constraints = {}
    support = constraints.real_vector
    reparametrized_params = []
    pytree_aux_fields = ("sde", "index", "perm", "grid", "first", "inverse", "noise")

    def __init__(self, sde: LTISDE, index, *, noise=0.0, validate_args=None):
        self.sde = sde
        index = _check_index(index)
        self.index = index
        if jnp.ndim(noise) != 0:
            raise ValueError(f"noise must be a scalar, got shape {jnp.shape(noise)}")
        self.noise = _check_positive(noise, "noise", allow_zero=True)
        if _is_concrete(index):
            grid, first, inverse = np.unique(index, return_index=True, return_inverse=True)
            self.perm = np.argsort(index, kind="stable")
            self.grid, self.first, self.inverse = grid, first, inverse.reshape(-1)
        else:  # traced indexes: sorted, repeats not merged
            self.perm = jnp.argsort(index)
            self.grid = index[self.perm]
            self.first = self.perm
            self.inverse = jnp.argsort(self.perm)
        super().__init__(
            batch_shape=(), event_shape=(jnp.shape(index)[0],), validate_args=validate_args
        )

    @lazy_property
    def transitions(self):
        """The chain's ``(A, Q)`` on ``grid`` (:func:`discretize`)."""
        return discretize(self.sde, self.grid)

    def log_prob(self, value):
        if _is_zero(self.noise):  # noiseless: filter the sorted unique values
            A, Q = self.transitions
            take, R = self.first, 0.0
        else:  # every value is observed with its own noise; a repeat is a zero-gap step
            A, Q = discretize(self.sde, jnp.asarray(self.index)[self.perm])
            take, R = self.perm, jnp.asarray(self.noise, A.dtype)
        H = self.sde.H[0]
        d = H.shape[0]

        def one(v):
            u = v[take]

            def body(carry, inp):
                m, P, ll = carry
                a, q, obs = inp
                m = a @ m
                P = a @ P @ a.T + q
                S = H @ P @ H + R
                e = obs - H @ m
                K = P @ H / S
                ll = ll - 0.5 * (_LOG_2PI + jnp.log(S) + e * e / S)
                m = m + K * e
                P = P - S * jnp.outer(K, K)
                return (m, 0.5 * (P + P.T), ll), None

            init = (jnp.zeros(d, A.dtype), jnp.zeros((d, d), A.dtype), jnp.zeros((), A.dtype))
            (_, _, ll), _ = lax.scan(body, init, (A, Q, u))
            return ll

        return _batched(one, jnp.asarray(value), 1)

    def sample(self, key, sample_shape=()):
        A, Q = self.transitions
        H = self.sde.H[0]
        d = H.shape[0]
        roots = jax.vmap(_sqrt_psd)(Q)
        shape = sample_shape + self.batch_shape
        eps = jax.random.normal(key, (A.shape[0],) + shape + (d,), dtype=A.dtype)

        def body(z, inp):
            a, r, e = inp
            z = jnp.einsum("ij,...j->...i", a, z) + jnp.einsum("ij,...j->...i", r, e)
            return z, z @ H

        _, u = lax.scan(body, jnp.zeros(shape + (d,), A.dtype), (A, roots, eps))
        u = jnp.moveaxis(u, 0, -1)[..., self.inverse]  # [..., n]
        if _is_zero(self.noise):
            return u
        e = jax.random.normal(jax.random.fold_in(key, 1), u.shape, dtype=u.dtype)
        return u + jnp.sqrt(jnp.asarray(self.noise, u.dtype)) * e

    @property
    def mean(self):
        return jnp.zeros(self.batch_shape + self.event_shape)


def _swap(fn):
    """``fn`` with each ``GaussianProcess`` (possibly inside ``ExpandedDistribution``s from
    plates) replaced by its ``StateSpaceGP``; ``None`` if there is none."""
    if isinstance(fn, GaussianProcess):
        return StateSpaceGP(lti_sde(fn.kernel), fn.index, noise=fn.jitter)
    if isinstance(fn, dist.ExpandedDistribution):
        base = _swap(fn.base_dist)
        return None if base is None else base.expand(fn.batch_shape)
    if isinstance(fn, dist.Independent):
        base = _swap(fn.base_dist)
        return None if base is None else dist.Independent(base, fn.reinterpreted_batch_ndims)
    return None


def _base(fn):
    while isinstance(fn, (dist.ExpandedDistribution, dist.Independent)):
        fn = fn.base_dist
    return fn


class state_space(Messenger):
    """Program transformation: ``GaussianProcess`` sample sites → ``StateSpaceGP`` sites.

    :param model: a NumPyro model (or ``None`` to use it as a context manager).
    :param sites: names of the sites to transform (default: every ``GaussianProcess`` site);
        a listed site that is not a ``GaussianProcess`` raises ``ValueError``.

    Each transformed site keeps its value, name, plates and observation; its density is the
    same (computed by Kalman filtering in O(n d³)); a ``jitter`` becomes white observation
    noise of that variance, filtered exactly (``StateSpaceGP(..., noise=jitter)``).
    ``msg["infer"]["state_space"]`` records ``{"kernel", "sde", "grid", "perm", "inverse",
    "noise"}`` (the sorted unique indexes, the sorting permutation, the map from each index to
    its grid position and the white-noise variance) for inference drivers.

    >>> import numpyro
    >>> from numpyro import handlers
    >>> def model():
    ...     numpyro.sample("f", GaussianProcess(Matern(0.5, 1.0, 1.0), np.array([2.0, 1.0])))
    >>> tr = handlers.trace(handlers.seed(state_space(model), 0)).get_trace()
    >>> tr["f"]["infer"]["state_space"]["grid"].tolist()
    [1.0, 2.0]
    """

    def __init__(self, fn=None, sites=None):
        if sites is not None:
            if isinstance(sites, str):
                sites = (sites,)
            sites = tuple(sites)
            if not all(isinstance(s, str) for s in sites):
                raise TypeError(f"sites must be a sequence of site names, got {sites!r}")
        self.sites = sites
        super().__init__(fn)

    def process_message(self, msg):
        if msg["type"] != "sample":
            return
        if self.sites is not None and msg["name"] not in self.sites:
            return
        new = _swap(msg["fn"])
        if new is None:
            if self.sites is not None:
                raise ValueError(
                    f"state_space: site {msg['name']!r} is not a GaussianProcess "
                    f"(got {type(_base(msg['fn'])).__name__})"
                )
            return
        gp = _base(msg["fn"])
        ss = _base(new)
        msg["fn"] = new
        msg["infer"] = dict(msg.get("infer") or {})
        msg["infer"]["state_space"] = {
            "kernel": gp.kernel,
            "sde": ss.sde,
            "grid": ss.grid,
            "perm": ss.perm,
            "inverse": ss.inverse,
            "noise": ss.noise,
        }


def stack_sde(sde: LTISDE, num: int) -> LTISDE:
    """``num`` independent copies of ``sde`` as one state of dimension ``num·d``.

    ``F̃ = I ⊗ F``, ``L̃ = I ⊗ L``, ``H̃ = I ⊗ H``, ``P̃inf = I ⊗ Pinf`` (rank-major: state
    ``r·d + j`` is component ``j`` of copy ``r``); ``H̃ z`` are the ``num`` function values.

    >>> s = stack_sde(lti_sde(Matern(1.5, 1.0, 1.0)), 3)
    >>> s.F.shape, s.H.shape
    ((6, 6), (3, 6))
    """
    eye = jnp.eye(int(num), dtype=sde.F.dtype)
    return LTISDE(
        jnp.kron(eye, sde.F),
        jnp.kron(eye, sde.L),
        sde.Qc,
        jnp.kron(eye, sde.H),
        jnp.kron(eye, sde.Pinf),
    )
