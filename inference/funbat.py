"""Conditional EP with Kalman smoothing for FunBaT (spec ``funbat.md`` §1.3–§1.6).

The approximate posterior is ``q(τ) q(vec W) Π_k q(Z^k)``: a Gamma, a full Gaussian over the
core and, per mode, the Gaussian smoothing posterior of the mode's state-space chain on its
sorted unique indexes (the ``R_k`` functions of a mode share one state of dimension
``R_k·d``, so the full ``R_k × R_k`` messages couple them). One :func:`step` (a CEP sweep):

1. for each mode k: the conditional-moment-matched messages of all entries to ``u^k``,
   summed per unique index (``Λ^k_s = E[τ] Σ_n E[a_n a_nᵀ]`` with the core covariance
   included, ``η^k_s = E[τ] Σ_n y_n E[a_n]``), damped, then Kalman filter + RTS smoother on
   the chain (information-form updates: singular Λ is fine);
2. the core: ``Σ_W = (I/s_W² + E[τ] Σ_n E[z zᵀ])⁻¹``, ``m_W = Σ_W E[τ] Σ_n y_n E[z_n]``;
3. the noise: ``a = a0 + N/2``, ``b = b0 + ½ Σ_n E[(y_n − Wᵀz_n)²]``.

Only per-index and core **sums** of messages are stored (damping is linear, so this equals
damping each per-entry message): memory O(Σ_k n_k R_k² + (Π R_k)²), not O(N (Π R_k)²). The
sums over entries of Kronecker products are accumulated in chunks.

* :class:`FunBaTConfig`, :func:`init`, :func:`step` (pure, jitted), :func:`fit` (runs to
  ``max|Δ train prediction| / sd(y) < tol`` or ``num_iters``, best of ``num_restarts``
  random initialisations by train RMSE);
* :func:`predict` (entry mean and variance at new indexes, by exact state-space bridging),
  :func:`latent` (the factor functions), :func:`to_inference_data`.

Everything runs in float64 (enabled locally). The model must have the layout of
:func:`ppl.models.funbat.model` (``u_k`` GaussianProcess sites in mode order, ``W``, ``tau``,
``y``); kernels, grids, ranks and priors are read from the trace of
:func:`ppl.transforms.state_space.state_space` ``(model)``.

Example::

    >>> import functools, jax, numpy as np
    >>> from ppl.models import funbat as fm
    >>> from ppl.transforms.state_space import Matern
    >>> d = fm.load_default("synthetic2")
    >>> model = functools.partial(fm.model, ranks=2, kernels=Matern(0.5, 0.2, 1.0))
    >>> res = fit(jax.random.PRNGKey(0), model, d["train_indexes"], d["train_y"],
    ...           FunBaTConfig(num_iters=40))
    >>> mean, var = predict(res, d["test_indexes"][:3])
    >>> mean.shape, bool((var > 0.01).all())
    ((3,), True)
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
from jax import lax
from numpyro import handlers

from ppl.inference import kalman
from ppl.inference._precision import x64
from ppl.inference.arviz import as_prng_key, check_positive_int
from ppl.transforms.state_space import Matern, discretize, lti_sde, stack_sde, state_space

__all__ = [
    "FunBaTConfig",
    "FunBaTData",
    "FunBaTResult",
    "FunBaTState",
    "check_data",
    "fit",
    "init",
    "latent",
    "predict",
    "step",
    "to_inference_data",
]

#: Kronecker sums are accumulated over chunks of at most this many floats.
_CHUNK_FLOATS = 1 << 22


@dataclasses.dataclass(frozen=True)
class FunBaTConfig:
    """Settings of CEP + Kalman (spec §6). Hashable: it is a static argument of :func:`step`.

    :param ranks, kernels, a0, b0, core_scale: ``None`` (default): read from the model's
        trace; a value given here must agree with the model.
    :param damping: ``(ρ_U, ρ_τ, ρ_W)``, weight on the old message (0: no damping).
    :param int num_iters: most CEP sweeps per run.
    :param float tol: stop when ``max|Δ train prediction| / sd(y) < tol``.
    :param str schedule: ``"per_mode"`` (the only one: modes in turn, then core, then τ).
    :param str smoother: ``"sequential"`` (``lax.scan``) or ``"parallel"`` (associative scan);
        ``"dense"``: the same update by dense GP algebra, O((n_k R_k)³) -- a baseline for
        benchmarks only (it does not keep the chain, so :func:`predict` is unavailable).
    :param float init_core_var: initial ``Σ_W = init_core_var · I`` (spec §1.4: 1e-2).
    :param init_tau: initial ``E[τ]``: ``"10/var(y)"`` (spec §1.4) or a positive number.
    :param bool reference_compat: the reference code's D3 (an extra ``N(0, I)`` factor on
        each pseudo-observation) and D4 (Cov(W) dropped from the factor messages and the
        noise update). Never D1, D5, D6 or D7.
    :param int num_restarts: random initialisations; the best by final train RMSE is kept.
    :param str rank_coupling: ``"full"`` (default: full ``R_k × R_k`` messages, the ranks of a
        mode filtered jointly) or ``"diagonal"`` (mean-field over ranks: off-diagonal message
        entries dropped, so the chain splits into independent per-rank chains; spec §1.2).
    :param bool cp: set from the model (no ``W`` site: CP core, not updated).
    """

    ranks: tuple[int, ...] | None = None
    kernels: tuple[Matern, ...] | None = None
    a0: float | None = None
    b0: float | None = None
    core_scale: float | None = None
    damping: tuple[float, float, float] = (0.5, 0.5, 0.0)
    num_iters: int = 100
    tol: float = 1e-4
    schedule: str = "per_mode"
    smoother: str = "sequential"
    init_core_var: float = 1e-2
    init_tau: Any = "10/var(y)"
    reference_compat: bool = False
    num_restarts: int = 1
    rank_coupling: str = "full"
    cp: bool = False

    def validate(self):
        """Raise ``ValueError``/``TypeError`` naming the bad field."""
        if len(tuple(self.damping)) != 3 or not all(0.0 <= float(r) < 1.0 for r in self.damping):
            raise ValueError(f"damping must be 3 numbers in [0, 1), got {self.damping}")
        check_positive_int(self.num_iters, "num_iters")
        check_positive_int(self.num_restarts, "num_restarts")
        if not (self.tol >= 0 and math.isfinite(self.tol)):
            raise ValueError(f"tol must be >= 0, got {self.tol}")
        if self.rank_coupling not in ("full", "diagonal"):
            raise ValueError(
                f"rank_coupling must be 'full' or 'diagonal', got {self.rank_coupling!r}"
            )
        if self.schedule != "per_mode":
            raise ValueError(f"schedule must be 'per_mode', got {self.schedule!r}")
        if self.smoother not in ("sequential", "parallel", "dense"):
            raise ValueError(
                f"smoother must be 'sequential', 'parallel' or 'dense', got {self.smoother!r}"
            )
        if not (self.init_core_var > 0):
            raise ValueError(f"init_core_var must be > 0, got {self.init_core_var}")
        if self.init_tau != "10/var(y)" and not (
            isinstance(self.init_tau, (int, float)) and self.init_tau > 0
        ):
            raise ValueError(f"init_tau must be '10/var(y)' or a number > 0, got {self.init_tau}")
        if self.ranks is not None and any(int(r) < 1 for r in self.ranks):
            raise ValueError(f"ranks must be >= 1, got {self.ranks}")
        return self


class FunBaTData(NamedTuple):
    """The fixed inputs of :func:`step`: ``pos i[N, K]`` (grid position of each entry in each
    mode), ``y f[N]``, per mode ``grid f[n_k]``, ``A, Q f[n_k, D_k, D_k]`` (stacked chain,
    ``D_k = R_k d_k``) and ``H f[R_k, D_k]``."""

    pos: jax.Array
    y: jax.Array
    grids: tuple
    A: tuple
    Q: tuple
    H: tuple


class FunBaTState(NamedTuple):
    """CEP state (a pytree). Per mode k (tuples): ``mu f[n_k, R_k]``, ``V f[n_k, R_k, R_k]``
    (marginals of ``u^k`` at the grid), ``ms f[n_k, D_k]``, ``Ps f[n_k, D_k, D_k]``, ``cross
    f[n_k-1, D_k, D_k]`` (smoothed chain), ``lam f[n_k, R_k, R_k]``, ``eta f[n_k, R_k]`` (summed
    messages); core ``mW f[P]``, ``SW f[P, P]``, ``lamW``, ``etaW`` (summed data messages),
    ``P = Π R_k``; Gamma ``a``, ``b``; ``pred f[N]`` (train predictions); ``it``."""

    mu: tuple
    V: tuple
    ms: tuple
    Ps: tuple
    cross: tuple
    lam: tuple
    eta: tuple
    mW: jax.Array
    SW: jax.Array
    lamW: jax.Array
    etaW: jax.Array
    a: jax.Array
    b: jax.Array
    pred: jax.Array
    it: jax.Array


@dataclasses.dataclass
class FunBaTResult:
    """What :func:`fit` returns: the final ``state``, the ``data`` and resolved ``config``,
    ``history`` (``{"train_rmse", "max_delta", "noise_sd"}`` per sweep of the kept run),
    ``n_iter``, ``converged``, ``restart_rmse`` (final train RMSE of every restart), the
    ``model`` with its ``indexes`` and ``y``, and the mode ``grids``."""

    state: FunBaTState
    data: FunBaTData
    config: FunBaTConfig
    history: dict
    n_iter: int
    converged: bool
    restart_rmse: list
    model: Any
    indexes: np.ndarray
    y: np.ndarray
    grids: tuple

    def to_inference_data(self, key=None, num_samples: int = 200):
        return to_inference_data(self, key, num_samples)


# ------------------------------------------------------------------------- model reading


def check_data(indexes, y=None) -> tuple[np.ndarray, np.ndarray | None]:
    """Validate ``indexes f[N, K]`` (finite) and ``y f[N]`` (finite, same N); returns them as
    float64 NumPy arrays. Errors name the argument."""
    if isinstance(indexes, jax.core.Tracer) or isinstance(y, jax.core.Tracer):
        raise TypeError("indexes and y must be concrete arrays (not traced)")
    idx = np.asarray(indexes, dtype=np.float64)
    if idx.ndim != 2 or idx.shape[0] == 0 or idx.shape[1] == 0:
        raise ValueError(f"indexes must have shape [N, K] with N, K >= 1, got {idx.shape}")
    if not np.all(np.isfinite(idx)):
        raise ValueError("indexes must be finite (found NaN or inf)")
    if y is None:
        return idx, None
    yy = np.asarray(y, dtype=np.float64)
    if yy.ndim != 1:
        raise ValueError(f"y must be a 1-D array of N values, got shape {yy.shape}")
    if yy.shape[0] != idx.shape[0]:
        raise ValueError(
            f"y has {yy.shape[0]} values but indexes has {idx.shape[0]} rows (length mismatch)"
        )
    if not np.all(np.isfinite(yy)):
        raise ValueError("y must be finite (found NaN or inf)")
    return idx, yy


#: What CEP cannot do, and what can (the error messages name it).
_OTHER_ROUTE = (
    "CEP updates only the Tucker factors 'u_k', the core 'W' and the noise precision 'tau' of "
    "y ~ Normal(Σ_r W[r] Π_k u^k_r(x), 1/√tau); run ppl.inference.NUTS or ppl.inference.SVI "
    "on ppl.transforms.state_space.state_space(model) to infer the rest of the model too"
)


def _check_sites(tr, modes, indexes):
    """Refuse a model CEP would only partly fit: latent sites other than ``u_k``, ``W`` and
    ``tau``, ``param`` sites, observed sites other than ``y``, a likelihood that is not
    ``Normal(tucker_mean(W, u), 1/√tau)`` (checked on the traced values)."""
    known = {s["name"] for s in modes} | {"W", "tau"}
    other = [
        name
        for name, s in tr.items()
        if (s["type"] == "sample" and not s["is_observed"] and name not in known)
        or s["type"] == "param"
    ]
    if other:
        raise ValueError(f"model has sites CEP cannot update: {other}. {_OTHER_ROUTE}")
    for name in ("W", "tau"):
        if name in tr and tr[name]["type"] == "sample" and tr[name]["is_observed"]:
            raise ValueError(f"site {name!r} is observed; CEP infers it. {_OTHER_ROUTE}")
    if type(tr["tau"]["fn"]) is not dist.Gamma:
        raise ValueError(
            f"site 'tau' must have a Gamma prior, got {type(tr['tau']['fn']).__name__}. "
            + _OTHER_ROUTE
        )
    if "W" in tr:
        base = tr["W"]["fn"]
        while isinstance(base, (dist.ExpandedDistribution, dist.Independent)):
            base = base.base_dist
        scale = np.asarray(getattr(base, "scale", np.nan))
        if (
            type(base) is not dist.Normal
            or np.any(np.asarray(base.loc) != 0)
            or np.any(scale != scale.ravel()[0])
        ):
            raise ValueError(
                "site 'W' must have an i.i.d. Normal(0, core_scale) prior. " + _OTHER_ROUTE
            )
    observed = [n for n, s in tr.items() if s["type"] == "sample" and s["is_observed"]]
    if observed != ["y"]:
        raise ValueError(
            f"model must observe exactly one site 'y' (the entries), got {observed}. {_OTHER_ROUTE}"
        )
    lik = tr["y"]["fn"]
    while isinstance(lik, (dist.ExpandedDistribution, dist.Independent)):
        lik = lik.base_dist
    if type(lik) is not dist.Normal:
        raise ValueError(
            f"site 'y' has a {type(lik).__name__} likelihood; CEP needs a Normal one. "
            + _OTHER_ROUTE
        )
    # The mean and scale of y at the traced values must be the Tucker model's.
    us = []
    for k, s in enumerate(modes):
        ss = s["infer"]["state_space"]
        noise = float(np.asarray(ss.get("noise", 0.0)))
        if noise != 0.0:
            raise ValueError(
                f"site {s['name']!r} is a GaussianProcess with jitter={noise} (white noise); "
                "CEP's Kalman smoother fits noiseless factor trajectories. Use jitter=0, or "
                "run ppl.inference.NUTS or ppl.inference.SVI on "
                "ppl.transforms.state_space.state_space(model)"
            )
        grid = np.asarray(ss["grid"], np.float64)
        on_grid = np.zeros((s["value"].shape[0], grid.shape[0]))
        on_grid[:, np.asarray(ss["inverse"]).reshape(-1)] = np.asarray(s["value"])
        us.append(on_grid[:, np.clip(np.searchsorted(grid, indexes[:, k]), 0, len(grid) - 1)].T)
    ranks = tuple(u.shape[1] for u in us)
    W = np.asarray(tr["W"]["value"]) if "W" in tr else np.asarray(_cp_core(ranks)).reshape(ranks)
    expected = np.asarray(_predictions(jnp.asarray(W).reshape(-1), us, _diag_pos(us), ranks))
    N = indexes.shape[0]
    loc = np.broadcast_to(np.asarray(lik.loc), (N,))
    scale = np.broadcast_to(np.asarray(lik.scale), (N,))
    sd = 1.0 / np.sqrt(float(tr["tau"]["value"]))
    tol = 1e-6 * (1.0 + np.max(np.abs(expected)))
    if not np.allclose(loc, expected, rtol=1e-6, atol=tol):
        raise ValueError(
            "the mean of site 'y' is not the Tucker mean Σ_r W[r] Π_k u^k_r(x) of the sites "
            f"{[s['name'] for s in modes] + (['W'] if 'W' in tr else [])} (an offset or a "
            f"transformed mean?). {_OTHER_ROUTE}"
        )
    if not np.allclose(scale, sd, rtol=1e-6):
        raise ValueError(f"the scale of site 'y' is not 1/√tau. {_OTHER_ROUTE}")


def _diag_pos(us):
    """Positions ``[N, K]`` that read row n of every ``us[k] f[N, R_k]``."""
    return jnp.tile(jnp.arange(us[0].shape[0])[:, None], (1, len(us)))


def _read_model(model, indexes, y, config: FunBaTConfig):
    """Trace ``state_space(model)`` and resolve the config from the sites."""
    tr = handlers.trace(handlers.seed(state_space(model), 0)).get_trace(indexes, y=y)
    modes = [s for s in tr.values() if s["type"] == "sample" and "state_space" in s["infer"]]
    K = indexes.shape[1]
    if len(modes) != K:
        raise ValueError(
            f"model must have one GaussianProcess site per index column ({K}), found {len(modes)}"
        )
    ranks = tuple(int(s["value"].shape[0]) for s in modes)
    kernels = tuple(s["infer"]["state_space"]["kernel"] for s in modes)
    grids = tuple(np.asarray(s["infer"]["state_space"]["grid"], np.float64) for s in modes)
    if "tau" not in tr:
        raise ValueError("model must have a Gamma noise-precision site 'tau'")
    _check_sites(tr, modes, indexes)
    a0 = float(tr["tau"]["fn"].concentration)
    b0 = float(tr["tau"]["fn"].rate)
    cp = "W" not in tr
    core_scale = 1.0
    if not cp:
        base = tr["W"]["fn"]
        while hasattr(base, "base_dist"):
            base = base.base_dist
        core_scale = float(np.asarray(base.scale).ravel()[0])
    resolved = {"ranks": ranks, "a0": a0, "b0": b0, "core_scale": core_scale}
    for name, val in resolved.items():
        given = getattr(config, name)
        if given is not None and not np.allclose(np.asarray(given), np.asarray(val)):
            raise ValueError(f"config.{name} = {given} disagrees with the model's {val}")
    if config.kernels is not None:
        given = tuple(config.kernels)
        same = len(given) == K and all(
            g.nu == m.nu
            and np.allclose(float(g.lengthscale), float(m.lengthscale))
            and np.allclose(float(g.variance), float(m.variance))
            for g, m in zip(given, kernels, strict=False)
        )
        if not same:
            raise ValueError(f"config.kernels = {given} disagree with the model's {kernels}")
    return dataclasses.replace(config, kernels=kernels, cp=cp, **resolved), grids


def _make_data(indexes, y, grids, config) -> FunBaTData:
    pos, As, Qs, Hs = [], [], [], []
    for k, grid in enumerate(grids):
        p = np.searchsorted(grid, indexes[:, k])
        p = np.clip(p, 0, len(grid) - 1)
        if not np.array_equal(grid[p], indexes[:, k]):
            raise ValueError(f"mode {k}: the model's grid does not contain every index")
        pos.append(p)
        sde = stack_sde(lti_sde(config.kernels[k]), config.ranks[k])
        A, Q = discretize(sde, grid)
        As.append(A)
        Qs.append(Q)
        Hs.append(sde.H)
    return FunBaTData(
        jnp.asarray(np.stack(pos, -1), jnp.int32),
        jnp.asarray(y),
        tuple(jnp.asarray(g) for g in grids),
        tuple(As),
        tuple(Qs),
        tuple(Hs),
    )


# ------------------------------------------------------------------------ kron helpers


def _kron_rows(mats):
    """Row-wise Kronecker product of ``[c, a_i, b_i]`` matrices (C order) -> ``[c, Πa, Πb]``."""
    c = mats[0].shape[0] if mats else 0
    out = None
    for m in mats:
        if out is None:
            out = m
        else:
            out = jnp.einsum("nab,ncd->nacbd", out, m)
            out = out.reshape(c, out.shape[1] * out.shape[2], out.shape[3] * out.shape[4])
    return out


def _kron_sums(mu, V, pos, y, modes, seg=None, num_segments=None):
    """``Σ_n ⊗_{j∈modes} E[u^j uʲᵀ](x_n)`` and ``Σ_n y_n ⊗_j E[u^j](x_n)``, grouped by ``seg``
    (entries with ``seg[n] = s`` add to row s) or totalled; accumulated over chunks."""
    N = y.shape[0]
    if not modes:
        ones = jnp.ones((N, 1, 1), y.dtype)
        vec = y[:, None]
        if seg is None:
            return ones.sum(0), vec.sum(0)
        return (
            jax.ops.segment_sum(ones, seg, num_segments),
            jax.ops.segment_sum(vec, seg, num_segments),
        )
    P = int(np.prod([mu[j].shape[1] for j in modes]))
    chunk = int(max(1, min(N, _CHUNK_FLOATS // (P * P))))
    num_chunks = -(-N // chunk)
    pad = num_chunks * chunk - N
    w = jnp.concatenate([jnp.ones(N, y.dtype), jnp.zeros(pad, y.dtype)])
    posp = jnp.concatenate([pos, jnp.zeros((pad, pos.shape[1]), pos.dtype)])
    yp = jnp.concatenate([y, jnp.zeros(pad, y.dtype)])
    segp = None if seg is None else jnp.concatenate([seg, jnp.zeros(pad, seg.dtype)])

    def part(i):
        sl = lambda a: lax.dynamic_slice_in_dim(a, i * chunk, chunk)
        p, ww, yy = sl(posp), sl(w), sl(yp)
        S = _kron_rows(
            [
                V[j][p[:, j]] + jnp.einsum("na,nb->nab", mu[j][p[:, j]], mu[j][p[:, j]])
                for j in modes
            ]
        )
        z = _kron_rows([mu[j][p[:, j]][:, :, None] for j in modes])[:, :, 0]
        S = S * ww[:, None, None]
        z = z * (ww * yy)[:, None]
        if seg is None:
            return S.sum(0), z.sum(0)
        s = sl(segp)
        return (
            jax.ops.segment_sum(S, s, num_segments),
            jax.ops.segment_sum(z, s, num_segments),
        )

    if num_chunks == 1:
        return part(0)

    def body(acc, i):
        a, b = part(i)
        return (acc[0] + a, acc[1] + b), None

    zero = part(0)
    zero = (jnp.zeros_like(zero[0]), jnp.zeros_like(zero[1]))
    acc, _ = lax.scan(body, zero, jnp.arange(num_chunks))
    return acc


def _unfold_mean(mW, ranks, k):
    M = mW.reshape(ranks)
    return jnp.moveaxis(M, k, 0).reshape(ranks[k], -1)


def _unfold_cov(SW, ranks, k):
    K = len(ranks)
    S = SW.reshape(ranks + ranks)
    S = jnp.moveaxis(S, (k, K + k), (0, K))
    P = int(np.prod(ranks)) // ranks[k]
    return S.reshape(ranks[k], P, ranks[k], P)


def _dense_update(kernel, grid, lam, eta):
    """Dense-GP version of the factor update: ``q(u) ∝ N(u | 0, K ⊗ I_R) Π_s exp(η_sᵀu_s −
    ½u_sᵀΛ_s u_s)`` on the ``[n, R]`` values (row-major), ``C = K̃ (I + Λ̃ K̃)⁻¹``."""
    n, R = eta.shape
    Kf = jnp.kron(kernel(grid, grid), jnp.eye(R))
    Lf = jnp.zeros((n, R, n, R)).at[jnp.arange(n), :, jnp.arange(n), :].set(lam)
    Lf = Lf.reshape(n * R, n * R)
    C = jnp.linalg.solve((jnp.eye(n * R) + Lf @ Kf).T, Kf.T).T  # K̃ (I + Λ̃K̃)⁻¹
    C = 0.5 * (C + C.T)
    m = C @ eta.reshape(-1)
    Cb = C.reshape(n, R, n, R)
    V = Cb[jnp.arange(n), :, jnp.arange(n), :]
    return m.reshape(n, R), V


def _predictions(mW, mu, pos, ranks):
    out = mW.reshape(ranks)[None]
    for k in range(len(ranks)):
        out = jnp.einsum("nr...,nr->n...", out, mu[k][pos[:, k]])
    return out


def _cp_core(ranks):
    K = len(ranks)
    W = jnp.zeros(ranks).at[(jnp.arange(ranks[0]),) * K].set(1.0)
    return W.reshape(-1)


# ---------------------------------------------------------------------------- init / step


def init(key, model, indexes, y, config: FunBaTConfig | None = None):
    """Initial CEP state (spec §1.4): ``q(u)`` means ~ U(0,1), V = I; ``m_W`` ~ U(0,1),
    ``Σ_W = init_core_var·I``; ``E[τ] = 10/var(y)``; message sums zero.

    :return: ``(state, data, config)`` with the config resolved from the model's trace.
    """
    config = (config or FunBaTConfig()).validate()
    idx, yy = check_data(indexes, y)
    if yy is None:
        raise ValueError("y must be given (the observed values)")
    key = as_prng_key(key)
    with x64():
        config, grids = _read_model(model, idx, yy, config)
        data = _make_data(idx, yy, grids, config)
        state = _init_state(key, data, config)
    return state, data, config


def _init_state(key, data: FunBaTData, config: FunBaTConfig) -> FunBaTState:
    ranks = config.ranks
    K = len(ranks)
    keys = jax.random.split(key, K + 1)
    mu, V, ms, Ps, cross, lam, eta = [], [], [], [], [], [], []
    for k in range(K):
        n, R = data.grids[k].shape[0], ranks[k]
        D = data.A[k].shape[-1]
        d = D // R
        m_k = jax.random.uniform(keys[k], (n, R), dtype=jnp.float64)
        mu.append(m_k)
        V.append(jnp.broadcast_to(jnp.eye(R), (n, R, R)))
        ms.append(jnp.zeros((n, D)).at[:, ::d].set(m_k))
        Ps.append(jnp.broadcast_to(data.Q[k][0], (n, D, D)))
        cross.append(jnp.zeros((n - 1, D, D)))
        lam.append(jnp.zeros((n, R, R)))
        eta.append(jnp.zeros((n, R)))
    P = int(np.prod(ranks))
    if config.cp:
        mW = _cp_core(ranks)
        SW = jnp.zeros((P, P))
    else:
        mW = jax.random.uniform(keys[K], (P,), dtype=jnp.float64)
        SW = config.init_core_var * jnp.eye(P)
    prior_prec = 1.0 / config.core_scale**2
    lamW = max(1.0 / config.init_core_var - prior_prec, 0.0) * jnp.eye(P)
    etaW = mW / config.init_core_var
    y = data.y
    N = y.shape[0]
    tau0 = 10.0 / jnp.var(y) if config.init_tau == "10/var(y)" else float(config.init_tau)
    a = jnp.asarray(config.a0 + N / 2.0)
    b = a / tau0
    pred = _predictions(mW, mu, data.pos, ranks)
    return FunBaTState(
        tuple(mu), tuple(V), tuple(ms), tuple(Ps), tuple(cross), tuple(lam), tuple(eta),
        mW, SW, lamW, etaW, a, b, pred, jnp.asarray(0),
    )  # fmt: skip


@functools.partial(jax.jit, static_argnames="config")
def step(state: FunBaTState, data: FunBaTData, config: FunBaTConfig):
    """One CEP sweep (modes in turn → core → noise). Pure; ``config`` is static.

    :return: ``(state, info)`` with ``info = {"train_rmse", "max_delta", "noise_sd"}``:
        the train RMSE of the new predictions, ``max|Δ prediction| / sd(y)`` against the
        previous sweep, and ``E[τ]^{-1/2}``.
    """
    ranks = config.ranks
    K = len(ranks)
    rho_u, rho_tau, rho_w = (float(r) for r in config.damping)
    y, pos = data.y, data.pos
    mu, V, ms, Ps, cross = (list(x) for x in (state.mu, state.V, state.ms, state.Ps, state.cross))
    lam, eta = list(state.lam), list(state.eta)
    Etau = state.a / state.b
    for k in range(K):
        others = [j for j in range(K) if j != k]
        n = data.grids[k].shape[0]
        Ssum, zsum = _kron_sums(mu, V, pos, y, others, seg=pos[:, k], num_segments=n)
        Mk = _unfold_mean(state.mW, ranks, k)
        Wt = jnp.einsum("rp,sq->rpsq", Mk, Mk)
        if not config.reference_compat:
            Wt = Wt + _unfold_cov(state.SW, ranks, k)
        lam_new = Etau * jnp.einsum("npq,rpsq->nrs", Ssum, Wt)
        eta_new = Etau * zsum @ Mk.T
        if config.rank_coupling == "diagonal":  # mean-field over ranks
            lam_new = lam_new * jnp.eye(ranks[k])
        if config.reference_compat:  # D3: an extra N(0, I) factor on each pseudo-observation
            lam_new = lam_new + jnp.eye(ranks[k])
        lam[k] = rho_u * lam[k] + (1 - rho_u) * 0.5 * (lam_new + jnp.swapaxes(lam_new, 1, 2))
        eta[k] = rho_u * eta[k] + (1 - rho_u) * eta_new
        H = data.H[k]
        if config.smoother == "dense":
            mu[k], V[k] = _dense_update(config.kernels[k], data.grids[k], lam[k], eta[k])
            continue
        m_s, P_s, cr = kalman.smoother(
            data.A[k], data.Q[k], H, lam[k], eta[k], parallel=config.smoother == "parallel"
        )
        ms[k], Ps[k], cross[k] = m_s, P_s, cr
        mu[k] = m_s @ H.T
        V[k] = H @ P_s @ H.T
    # core and noise from the same sums
    Szz, zy = _kron_sums(mu, V, pos, y, list(range(K)))
    if config.cp:
        mW, SW, lamW, etaW = state.mW, state.SW, state.lamW, state.etaW
    else:
        lamW = rho_w * state.lamW + (1 - rho_w) * Etau * Szz
        etaW = rho_w * state.etaW + (1 - rho_w) * Etau * zy
        Pn = Szz.shape[0]
        prec = jnp.eye(Pn) / config.core_scale**2 + lamW
        SW = jnp.linalg.inv(0.5 * (prec + prec.T))
        SW = 0.5 * (SW + SW.T)
        mW = SW @ etaW
    second = jnp.outer(mW, mW) if config.reference_compat else SW + jnp.outer(mW, mW)
    sse = jnp.sum(y * y) - 2 * mW @ zy + jnp.sum(second * Szz)
    b_fresh = 0.5 * jnp.maximum(sse, 0.0)
    b = config.b0 + rho_tau * (state.b - config.b0) + (1 - rho_tau) * b_fresh
    a = state.a
    pred = _predictions(mW, mu, pos, ranks)
    info = {
        "train_rmse": jnp.sqrt(jnp.mean((y - pred) ** 2)),
        "max_delta": jnp.max(jnp.abs(pred - state.pred)) / jnp.std(y),
        "noise_sd": jnp.sqrt(b / a),
    }
    new = FunBaTState(
        tuple(mu), tuple(V), tuple(ms), tuple(Ps), tuple(cross), tuple(lam), tuple(eta),
        mW, SW, lamW, etaW, a, b, pred, state.it + 1,
    )  # fmt: skip
    return new, info


@functools.partial(jax.jit, static_argnames="config")
def _run(state, data, config):
    T = config.num_iters
    hist0 = {k: jnp.full((T,), jnp.nan) for k in ("train_rmse", "max_delta", "noise_sd")}

    def cond(carry):
        s, _, done = carry
        return (s.it < T) & ~done

    def body(carry):
        s, hist, _ = carry
        i = s.it
        s, info = step(s, data, config)
        hist = {k: hist[k].at[i].set(info[k]) for k in hist}
        return s, hist, info["max_delta"] < config.tol

    return lax.while_loop(cond, body, (state, hist0, jnp.asarray(False)))


def fit(key, model, indexes, y, config: FunBaTConfig | None = None) -> FunBaTResult:
    """Run CEP + Kalman to convergence (or ``num_iters``), best of ``num_restarts`` runs.

    :param key: PRNG key of the random initialisations.
    :param model: a model with the layout of :func:`ppl.models.funbat.model` (e.g.
        ``functools.partial(model, ranks=..., kernels=...)``), called ``model(indexes, y=y)``.
    :param indexes: ``f[N, K]`` continuous indexes; ``y``: ``f[N]`` finite values.
    :param FunBaTConfig config: settings (default ``FunBaTConfig()``).
    :return: :class:`FunBaTResult`.
    """
    config = (config or FunBaTConfig()).validate()
    key = as_prng_key(key)
    state0, data, config = init(key, model, indexes, y, config)
    with x64():
        best = None
        rmses = []
        for r, k in enumerate(jax.random.split(key, config.num_restarts)):
            s0 = state0 if r == 0 and config.num_restarts == 1 else _init_state(k, data, config)
            s, hist, done = jax.device_get(_run(s0, data, config))
            it = int(s.it)
            hist = {name: np.asarray(v[:it]) for name, v in hist.items()}
            rmse = float(hist["train_rmse"][-1])
            rmses.append(rmse)
            if best is None or rmse < best[0]:
                best = (rmse, s, hist, it, bool(done))
        _, s, hist, it, done = best
        s = jax.tree.map(jnp.asarray, s)  # float64 device arrays (inside x64)
    idx = np.asarray(indexes, np.float64)
    return FunBaTResult(
        state=s,
        data=data,
        config=config,
        history=hist,
        n_iter=it,
        converged=done,
        restart_rmse=rmses,
        model=model,
        indexes=idx,
        y=np.asarray(y, np.float64),
        grids=tuple(np.asarray(g) for g in data.grids),
    )


# ---------------------------------------------------------------------------- prediction


def _check_result(result):
    if not isinstance(result, FunBaTResult):
        raise TypeError(f"result must be a FunBaTResult, got {type(result).__name__}")


def latent(result: FunBaTResult, k: int, x):
    """Posterior of mode ``k``'s functions ``u^k(x)`` at new indexes ``x f[m]``.

    :return: ``(mean f[m, R_k], cov f[m, R_k, R_k])`` (exact state-space bridging).
    """
    _check_result(result)
    K = len(result.grids)
    if not (isinstance(k, (int, np.integer)) and 0 <= k < K):
        raise ValueError(f"k must be a mode number in [0, {K}), got {k!r}")
    x = np.asarray(x, np.float64)
    if x.ndim != 1 or not np.all(np.isfinite(x)):
        raise ValueError("x must be a finite 1-D array of indexes")
    with x64():
        cfg = result.config
        sde = stack_sde(lti_sde(cfg.kernels[k]), cfg.ranks[k])
        s = result.state
        mean, cov = kalman.bridge(sde, result.data.grids[k], s.ms[k], s.Ps[k], s.cross[k], x)
        H = sde.H
        return mean @ H.T, H @ cov @ H.T


@jax.jit
def _second_moment(SW, mW, mus, Vs):
    """``tr((Σ_W + m_W m_Wᵀ) ⊗_k (V_k + μ_k μ_kᵀ))`` per entry, in chunks (lax.map)."""
    B = SW + jnp.outer(mW, mW)
    P = B.shape[0]
    chunk = int(max(1, min(mus[0].shape[0], _CHUNK_FLOATS // (P * P))))

    def second(args):
        m, v = args
        S = _kron_rows([vk[None] + jnp.outer(mk, mk)[None] for mk, vk in zip(m, v, strict=True)])
        return jnp.sum(B * S[0])

    return lax.map(second, (mus, Vs), batch_size=chunk)


def predict(result: FunBaTResult, new_indexes):
    """Predictive mean and variance of entries at ``new_indexes f[M, K]``.

    ``mean = m_Wᵀ ⊗_k μ^k(x*ᵏ)``; ``var = tr((Σ_W + m_W m_Wᵀ) ⊗_k E[u uᵀ]) − mean² +
    E[τ⁻¹]`` with ``E[τ⁻¹] = b/(a−1)`` (spec §1.6), so ``var`` ≥ the noise estimate.

    :return: ``(mean f[M], var f[M])``.
    """
    _check_result(result)
    x = np.asarray(new_indexes, np.float64)
    K = len(result.grids)
    if x.ndim != 2 or x.shape[1] != K:
        raise ValueError(f"new_indexes must have shape [M, {K}], got {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError("new_indexes must be finite (found NaN or inf)")
    with x64():
        mus, Vs = zip(*(latent(result, k, x[:, k]) for k in range(K)), strict=True)
        s = result.state
        pos = jnp.tile(jnp.arange(x.shape[0])[:, None], (1, K))
        mean = _predictions(s.mW, list(mus), pos, result.config.ranks)
        ef2 = _second_moment(s.SW, s.mW, mus, Vs)
        noise = s.b / (s.a - 1.0)
        return mean, jnp.maximum(ef2 - mean**2, 0.0) + noise


# ------------------------------------------------------------------------------- ArviZ


def _sample_chain(key, ms, Ps, cross, num):
    """Joint draws of the smoothed Gaussian chain: ``z_0 ~ N(m_0, P_0)``, then ``z_{s+1} |
    z_s`` from the joint of ``(z_s, z_{s+1})`` (the smoothed posterior is Markov)."""
    n, D = ms.shape

    def sqrt_psd(M):
        w, U = jnp.linalg.eigh(0.5 * (M + M.T))
        return U * jnp.sqrt(jnp.clip(w, 0.0))

    keys = jax.random.split(key, n)
    z0 = ms[0] + jax.random.normal(keys[0], (num, D)) @ sqrt_psd(Ps[0]).T

    def body(z, inp):
        k, m0, P0, m1, P1, C = inp
        G = jnp.linalg.lstsq(P0, C)[0].T  # Cᵀ P0⁺
        mean = m1 + (z - m0) @ G.T
        cov = P1 - G @ C
        z1 = mean + jax.random.normal(k, (num, D)) @ sqrt_psd(cov).T
        return z1, z1

    _, zs = lax.scan(body, z0, (keys[1:], ms[:-1], Ps[:-1], ms[1:], Ps[1:], cross))
    return jnp.concatenate([z0[None], zs])  # [n, num, D]


def to_inference_data(result: FunBaTResult, key=None, num_samples: int = 200):
    """ArviZ ``InferenceData`` of a fit: ``posterior`` (``num_samples`` draws from q of ``u_k``
    on the grid, ``W``, ``tau``; dims ``rank_k``, ``mode_k_index``), ``posterior_predictive``,
    ``log_likelihood``, ``observed_data`` (through the model) and ``sample_stats`` (the
    per-sweep ``train_rmse``, ``max_delta``, ``noise_sd`` over ``iteration``)."""
    import xarray as xr

    from ppl.inference.arviz import build_inference_data

    _check_result(result)
    num_samples = check_positive_int(num_samples, "num_samples")
    key = as_prng_key(key)
    with x64():
        s = result.state
        cfg = result.config
        K = len(cfg.ranks)
        keys = jax.random.split(key, K + 3)
        samples = {}
        for k in range(K):
            z = _sample_chain(keys[k], s.ms[k], s.Ps[k], s.cross[k], num_samples)
            u = jnp.einsum("rd,nsd->srn", result.data.H[k], z)  # [S, R_k, n_k]
            samples[f"u_{k}"] = u[None]
        if not cfg.cp:
            L = jnp.linalg.cholesky(s.SW + 1e-12 * jnp.eye(s.SW.shape[0]))  # jitter: draws only
            w = s.mW + jax.random.normal(keys[K], (num_samples, s.mW.shape[0])) @ L.T
            samples["W"] = w.reshape((1, num_samples) + tuple(cfg.ranks))
        samples["tau"] = (jax.random.gamma(keys[K + 1], s.a, (num_samples,)) / s.b)[None]
        stats = xr.Dataset({k: ("iteration", np.asarray(v)) for k, v in result.history.items()})
        idata = build_inference_data(
            result.model,
            samples,
            (result.indexes,),
            {"y": result.y},
            rng_key=keys[K + 2],
            sample_stats=stats,
        )
    idata.posterior.attrs.update({"n_iter": int(result.n_iter), "converged": int(result.converged)})
    return idata
