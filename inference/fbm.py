"""Exact inference for linear SDEs driven by Markov-approximate fBM (MA-fBM): Van Loan + Kalman.

With a linear drift and a constant diffusion, the fBM-driven SDE of spec ``fbm.md`` §1.4,
dX = −θX dt + σ dB̂^H, is an ordinary **linear** Markov SDE on the augmented state
Z = (X, Y_1..Y_K) (:func:`linear_system`)::

    dY_k = −γ_k Y_k dt + dW,                 (K OU processes sharing one W)
    dX   = (−θX − σ Σ_k ω_k γ_k Y_k) dt + σ ω̄ dW,        ω̄ = Σ_k ω_k,

i.e. dZ = F Z dt + L dW with a rank-one diffusion L, X_0 = 0, and Y_0 = 0 (type II,
Riemann–Liouville) or Y_0 ~ N(0, C), C_ij = 1/(γ_i+γ_j) (type I, the stationary start), the
speeds γ on the geometric grid and the weights ω(H) optimal over the **horizon** T
(:func:`ppl.transforms.fbm.markov_sde`). Its law is Gaussian, so no neural control or ELBO is
needed to get the exact answer:

* **Van Loan** (:func:`van_loan`): the exact transition over a step Δ is
  Z_{t+Δ} = A Z_t + ε, ε ~ N(0, Q), with A = e^{FΔ} and Q = ∫_0^Δ e^{Fs} LLᵀ e^{Fᵀs} ds, read
  off one matrix exponential of the block matrix [[−F, LLᵀ], [0, Fᵀ]]Δ. No Euler error, so no
  step guard γ_max·Δ < 0.5 either (any observation spacing is exact).
* **Kalman filter** (:func:`kalman_log_likelihood`): observations o_i = X_{t_i} + N(0, s²)
  give the exact log-evidence log p(o_{1:n} | H) by the prediction-error decomposition,
  differentiable in H (ω(H) is closed form) and jit-able with H traced. The covariance
  recursion does not depend on the data, so it is run once and shared by all paths.
* **Hurst MLE** (:func:`hurst_mle`, spec §4 test 8): the summed log-evidence over paths,
  maximised over H on a grid and refined by a bounded scalar search.
* **Posterior marginals** (:func:`posterior_marginals`): the exact posterior mean and sd of X
  at query times (dense Gaussian conditioning with the prior covariance of X computed from
  the same Van Loan transitions) -- the reference band of the spec's fOU bridge (B1).

**Precision.** The augmented system is ill-conditioned (rates from 1/γ_max to γ_max, large ω
for type II at small H): use **float64**. :func:`kalman_log_likelihood` works in the ambient
dtype (run it under ``jax.enable_x64(True)``); :func:`hurst_mle` and
:func:`posterior_marginals` enable float64 locally themselves.

Example (Brownian paths, 16 × 48 noisy observations on (0, 2.4]: the MLE of H is ½):

>>> import numpy as np
>>> from ppl.inference import fbm
>>> ts = 2.4 * np.arange(1, 49) / 48
>>> rng = np.random.default_rng(0)
>>> ys = np.cumsum(rng.normal(0.0, 0.05**0.5, (16, 48)), axis=1) + rng.normal(0, 0.01, (16, 48))
>>> h = fbm.hurst_mle(ts, ys, 0.01, fbm_type="II", grid=np.arange(0.1, 0.95, 0.1))
>>> abs(h - 0.5) < 0.05
True
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ppl.transforms import fbm as _tf

__all__ = [
    "hurst_mle",
    "kalman_log_likelihood",
    "linear_system",
    "log_evidence",
    "posterior_marginals",
    "van_loan",
]

#: Van Loan is applied on a sub-step whose block matrix has ∞-norm ≤ this, then composed
#: exactly by doubling.
_VL_NORM = 1.0 / 16.0
#: Degree of the Taylor polynomial for e^M on that sub-step (remainder < 1e-16 relative).
_TAYLOR_DEGREE = 8
#: The largest number of doublings (steps Δ up to 2^40/(16‖M‖) are exact).
_VL_MAX_DOUBLINGS = 40
_LOG_2PI = math.log(2.0 * math.pi)


# --------------------------------------------------------------------------- validation


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _check_ts(ts) -> None:
    if jnp.ndim(ts) != 1 or jnp.shape(ts)[0] < 1:
        raise ValueError(f"ts must be a non-empty 1-d array of times, got shape {jnp.shape(ts)}")
    if _is_concrete(ts):
        t = np.asarray(ts, dtype=np.float64)
        if not np.all(np.isfinite(t)):
            raise ValueError("ts must be finite")
        if t[0] <= 0.0:
            raise ValueError(f"ts must be > 0 (X_0 = 0 is known at t = 0), got ts[0] = {t[0]}")
        if np.any(np.diff(t) <= 0.0):
            raise ValueError("ts must be strictly increasing")


def _check_ys(ys, num_times: int) -> None:
    shape = jnp.shape(ys)
    if len(shape) not in (1, 2) or shape[-1] != num_times:
        raise ValueError(
            f"ys must be [num_paths, num_times] (or [num_times] for one path) with "
            f"num_times = len(ts) = {num_times}, got shape {shape}"
        )
    if _is_concrete(ys) and not np.all(np.isfinite(np.asarray(ys, dtype=np.float64))):
        raise ValueError("ys must be finite (no NaN/inf; missing observations are not supported)")


def _check_obs_sd(obs_sd, num_times: int) -> None:
    shape = jnp.shape(obs_sd)
    if len(shape) > 1 or (len(shape) == 1 and shape[0] not in (1, num_times)):
        raise ValueError(
            f"obs_sd must be a scalar or a [num_times] array (num_times = {num_times}), "
            f"got shape {shape}"
        )
    if _is_concrete(obs_sd):
        s = np.asarray(obs_sd, dtype=np.float64)
        if not np.all(np.isfinite(s)) or np.any(s <= 0.0):
            raise ValueError(f"obs_sd must be finite and > 0, got {obs_sd}")


def _check_scalar(value, name: str, positive: bool) -> None:
    if jnp.ndim(value) != 0:
        raise ValueError(f"{name} must be a scalar, got shape {jnp.shape(value)}")
    if _is_concrete(value):
        v = float(value)
        if not math.isfinite(v) or (positive and v <= 0.0):
            what = "finite and > 0" if positive else "finite"
            raise ValueError(f"{name} must be {what}, got {value}")


def _check_hurst(hurst) -> None:
    if jnp.ndim(hurst) != 0:
        raise ValueError(f"hurst must be a scalar, got shape {jnp.shape(hurst)}")
    if _is_concrete(hurst):
        h = float(hurst)
        if not (math.isfinite(h) and 0.0 < h < 1.0):
            raise ValueError(f"hurst must lie in (0, 1), got {hurst}")


def _check_model(fbm_type, num_ou, gamma_max, horizon, drift_rate, sigma) -> None:
    if fbm_type not in ("I", "II"):
        raise ValueError(f"fbm_type must be 'I' or 'II', got {fbm_type!r}")
    _tf.gamma_grid(num_ou, gamma_max)  # validates num_ou and gamma_max
    if horizon is not None:
        try:
            t = float(horizon)
        except TypeError as err:
            raise TypeError(f"horizon must be a concrete number > 0, got {horizon!r}") from err
        if not math.isfinite(t) or t <= 0.0:
            raise ValueError(f"horizon must be finite and > 0, got {horizon}")
    _check_scalar(drift_rate, "drift_rate", positive=False)
    _check_scalar(sigma, "sigma", positive=True)


def _default_horizon(ts, horizon) -> float:
    if horizon is not None:
        return float(horizon)
    if not _is_concrete(ts):
        raise TypeError("horizon must be given when ts is traced (it defaults to ts[-1])")
    return float(np.asarray(ts)[-1])


def _float(x):
    return jnp.asarray(x, dtype=jnp.result_type(float))


# --------------------------------------------------------------------------- the model


def linear_system(
    hurst,
    fbm_type: str = "II",
    num_ou: int = 5,
    gamma_max: float = 20.0,
    horizon: float = 1.0,
    drift_rate=0.0,
    sigma=1.0,
    exact_bm: bool = False,
):
    """The augmented linear SDE dZ = F Z dt + L dW of dX = −θX dt + σ dB̂^H, Z = (X, Y_1..Y_K).

    dY_k = −γ_k Y_k dt + dW and dX = (−θX − σ Σ_k ω_k γ_k Y_k) dt + σ ω̄ dW (θ = ``drift_rate``,
    σ = ``sigma``, ω̄ = Σ_k ω_k), started at X_0 = 0 and Y_0 = 0 (type II) or
    Y_0 ~ N(0, C), C_ij = 1/(γ_i+γ_j) (type I). γ = :func:`~ppl.transforms.fbm.gamma_grid`
    ``(num_ou, gamma_max)`` and ω = :func:`~ppl.transforms.fbm.optimal_omega` over [0, horizon]
    (Γ-normalised targets, see :mod:`ppl.transforms.fbm`); ``exact_bm=True`` (needs
    ``hurst == 0.5``) uses γ = [0], ω = [1], Y_0 = 0: X is then exactly σ·W (an OU if θ ≠ 0).

    :param hurst: H ∈ (0, 1), a scalar (may be traced: F and L are differentiable in H).
    :param fbm_type: ``"I"`` (Mandelbrot–van Ness) or ``"II"`` (Riemann–Liouville).
    :param num_ou: K; ``gamma_max``: the largest OU speed.
    :param horizon: T of the ω optimisation (the span of the data; default 1.0).
    :param drift_rate: θ (may be traced); ``sigma``: σ > 0 (may be traced).
    :param exact_bm: exactly Brownian motion instead of the K-term approximation.
    :return: ``(F [1+K, 1+K], L [1+K], m0 [1+K], P0 [1+K, 1+K])`` (K = 1 when ``exact_bm``),
        the drift matrix, the diffusion column, and the mean and covariance of Z_0.

    >>> import jax, numpy as np
    >>> with jax.enable_x64(True):
    ...     F, L, m0, P0 = map(np.asarray, linear_system(0.7, "I", horizon=6.0, drift_rate=1.0))
    >>> F.shape, L.shape, m0.shape, P0.shape, F.dtype
    ((6, 6), (6,), (6,), (6, 6), dtype('float64'))
    >>> print(P0[0, 0], round(P0[1, 1], 4))   # X_0 = 0; Var Y_1(0) = 1/(2γ_1)
    0.0 10.0
    """
    _check_hurst(hurst)
    _check_model(fbm_type, num_ou, gamma_max, horizon, drift_rate, sigma)
    if exact_bm:  # markov_sde checks hurst == 0.5 and gives γ = [0], ω = [1], Y_0 = 0
        sde = _tf.markov_sde(None, None, hurst, fbm_type=fbm_type, exact_bm=True)
        g_np, y0_type = np.zeros(1), sde.fbm_type
        return _assemble(g_np, _float(sde.omega), drift_rate, sigma, y0_type)
    return _linear_system(
        hurst,
        drift_rate,
        sigma,
        fbm_type=fbm_type,
        num_ou=int(num_ou),
        gamma_max=float(gamma_max),
        horizon=float(horizon),
    )


@functools.partial(jax.jit, static_argnames=("fbm_type", "num_ou", "gamma_max", "horizon"))
def _linear_system(hurst, drift_rate, sigma, *, fbm_type, num_ou, gamma_max, horizon):
    with jax.ensure_compile_time_eval():  # the speeds are constants, also under jit
        g_np = np.asarray(_tf.gamma_grid(num_ou, gamma_max), dtype=np.float64)
    omega = _tf.optimal_omega(hurst, g_np, horizon, fbm_type)
    return _assemble(g_np, omega, drift_rate, sigma, fbm_type)


def _assemble(g_np, omega, drift_rate, sigma, y0_type):
    g = _float(g_np)
    w = _float(omega)
    theta, sig = _float(drift_rate), _float(sigma)
    k = g_np.size
    top = jnp.concatenate([-theta[None], -sig * w * g])
    bottom = jnp.concatenate([jnp.zeros((k, 1), dtype=g.dtype), -jnp.diag(g)], axis=1)
    F = jnp.concatenate([top[None, :], bottom], axis=0)
    L = jnp.concatenate([(sig * jnp.sum(w))[None], jnp.ones(k, dtype=g.dtype)])
    m0 = jnp.zeros(k + 1, dtype=g.dtype)
    p0 = np.zeros((k + 1, k + 1))
    if y0_type == "I":
        p0[1:, 1:] = 1.0 / (g_np[:, None] + g_np[None, :])
    return F, L, m0, _float(p0)


def _expm_small(M):
    """e^M by its Taylor series to degree 8, for ‖M‖_∞ ≤ 1/16 (remainder < 1e-16 relative)."""
    eye = jnp.eye(M.shape[0], dtype=M.dtype)
    E = eye
    for k in range(_TAYLOR_DEGREE, 0, -1):  # Horner: I + M(I + M/2(I + M/3(…)))
        E = eye + (M @ E) / k
    return E


def _van_loan_one(F, LLt, dt):
    """Van Loan on Δ/2^s (block norm ≤ 1/16), then s exact doublings (A, Q) → (A², AQAᵀ + Q)."""
    n = F.shape[0]
    M = jnp.block([[-F, LLt], [jnp.zeros_like(F), F.T]])
    norm = lax.stop_gradient(jnp.max(jnp.sum(jnp.abs(M), axis=1)) * jnp.abs(dt))
    s = jnp.clip(jnp.ceil(jnp.log2(jnp.maximum(norm / _VL_NORM, 1.0))), 0, _VL_MAX_DOUBLINGS)
    E = _expm_small(M * (dt * jnp.exp2(-s)))
    A = E[n:, n:].T
    Q = A @ E[:n, n:]

    def double(i, aq):
        a, q = aq
        a2, q2 = a @ a, a @ q @ a.T + q
        keep = i >= s
        return jnp.where(keep, a, a2), jnp.where(keep, q, q2)

    A, Q = lax.fori_loop(0, _VL_MAX_DOUBLINGS, double, (A, Q))
    return A, 0.5 * (Q + Q.T)


@jax.jit
def _van_loan_flat(F, L, dts):
    return jax.vmap(_van_loan_one, in_axes=(None, None, 0))(F, jnp.outer(L, L), dts)


def van_loan(F, L, dt):
    """Exact discretisation of dZ = F Z dt + L dW over a step Δ: Z_{t+Δ} = A Z_t + N(0, Q).

    A = e^{FΔ} and Q = ∫_0^Δ e^{Fs} LLᵀ e^{Fᵀs} ds, from the Van Loan block exponential
    exp([[−F, LLᵀ], [0, Fᵀ]]Δ) = [[·, B₁₂], [0, B₂₂]]: A = B₂₂ᵀ, Q = A B₁₂ (symmetrised).
    For large ‖F‖Δ that product cancels catastrophically (e^{+γΔ} against e^{−γΔ}), so the
    exponential is taken on Δ/2^s, where the block matrix has ∞-norm ≤ 1/16 and a degree-8
    Taylor polynomial is exact to rounding, and the step is composed exactly by s doublings
    (A, Q) → (A², AQAᵀ + Q). Differentiable in F, L and Δ; Δ may be traced.

    :param F: ``[n, n]``; ``L``: ``[n]`` (one driving Brownian motion).
    :param dt: Δ ≥ 0, a scalar or an array ``[...]`` of steps.
    :return: ``(A [..., n, n], Q [..., n, n])``.

    >>> A, Q = van_loan(jnp.array([[-2.0]]), jnp.array([1.0]), 0.5)   # OU, γ = 2
    >>> print(round(float(A[0, 0]), 6), round(float(Q[0, 0]), 6))   # e^{−γΔ}, (1−e^{−2γΔ})/2γ
    0.367879 0.216166
    """
    F = _float(F)
    L = _float(L)
    if F.ndim != 2 or F.shape[0] != F.shape[1]:
        raise ValueError(f"F must be a square matrix [n, n], got shape {F.shape}")
    if L.shape != (F.shape[0],):
        raise ValueError(f"L must be a vector [n] = [{F.shape[0]}], got shape {L.shape}")
    dt = _float(dt)
    if _is_concrete(dt):
        d = np.asarray(dt)
        if not np.all(np.isfinite(d)) or np.any(d < 0.0):
            raise ValueError(f"dt must be finite and ≥ 0, got {dt}")
    A, Q = _van_loan_flat(F, L, dt.reshape(-1))
    n = F.shape[0]
    return A.reshape(*dt.shape, n, n), Q.reshape(*dt.shape, n, n)


# --------------------------------------------------------------------------- Kalman filter


def _kalman(ts, ys2, obs_var, F, L, m0, P0):
    """Σ log N(o_i; predicted mean, S_i) for paths ``ys2 [P, n]``; covariances shared."""
    dts = jnp.diff(ts, prepend=jnp.zeros((1,), dtype=ts.dtype))
    As, Qs = van_loan(F, L, dts)
    num_paths = ys2.shape[0]
    m_init = jnp.broadcast_to(m0, (num_paths, m0.shape[0]))
    eye = jnp.eye(m0.shape[0], dtype=m0.dtype)

    def step(carry, inp):
        m, P, ll = carry
        A, Q, y, r2 = inp
        m = m @ A.T
        P = A @ P @ A.T + Q
        S = P[0, 0] + r2
        v = y - m[:, 0]
        ll = ll - 0.5 * (_LOG_2PI + jnp.log(S) + v * v / S)
        gain = P[:, 0] / S
        m = m + v[:, None] * gain[None, :]
        J = eye - jnp.outer(gain, eye[0])  # Joseph form keeps P symmetric PSD
        P = J @ P @ J.T + r2 * jnp.outer(gain, gain)
        P = 0.5 * (P + P.T)
        return (m, P, ll), None

    ll0 = jnp.zeros((num_paths,), dtype=m0.dtype)
    (_, _, ll), _ = lax.scan(step, (m_init, P0, ll0), (As, Qs, ys2.T, obs_var))
    return ll


_kalman_jit = jax.jit(_kalman)


@functools.partial(jax.jit, static_argnames=("fbm_type", "num_ou", "gamma_max", "horizon"))
def _loglik(hurst, ts, ys2, obs_var, drift_rate, sigma, *, fbm_type, num_ou, gamma_max, horizon):
    F, L, m0, P0 = linear_system(
        hurst, fbm_type, num_ou, gamma_max, horizon, drift_rate, sigma, exact_bm=False
    )
    return _kalman(ts, ys2, obs_var, F, L, m0, P0)


def _prepare(ts, ys, obs_sd):
    ts = _float(ts)
    ys = _float(ys)
    ys2 = ys[None] if ys.ndim == 1 else ys
    obs_var = jnp.broadcast_to(_float(obs_sd) ** 2, ts.shape)
    return ts, ys, ys2, obs_var


def kalman_log_likelihood(
    ts,
    ys,
    obs_sd,
    hurst,
    fbm_type: str = "II",
    num_ou: int = 5,
    gamma_max: float = 20.0,
    horizon: float | None = None,
    drift_rate=0.0,
    sigma=1.0,
    exact_bm: bool = False,
):
    """Exact log p(ys[i] | H) of each path under the MA-fBM linear SDE (Kalman filter).

    Observations o_j = X_{t_j} + N(0, obs_sd²) of dX = −θX dt + σ dB̂^H, X_0 = 0 (the model of
    :func:`linear_system`), with exact Van Loan transitions between observation times and the
    prediction-error decomposition in ``lax.scan``. The covariance recursion is shared by all
    paths (it does not depend on the data). Works in the ambient dtype -- use float64
    (``jax.enable_x64(True)``): the augmented system is ill-conditioned. Differentiable in
    ``hurst``, ``drift_rate``, ``sigma`` and ``obs_sd``, and jit-able with any of them (and
    ``ts``, ``ys``) traced; inputs are validated when they are concrete.

    :param ts: observation times ``[num_times]``, > 0, strictly increasing.
    :param ys: observations ``[num_paths, num_times]`` (or ``[num_times]``: one path).
    :param obs_sd: the observation noise sd > 0, a scalar or ``[num_times]``.
    :param hurst: H ∈ (0, 1), scalar.
    :param fbm_type, num_ou, gamma_max, drift_rate, sigma, exact_bm: see :func:`linear_system`.
    :param horizon: T of the ω optimisation; default ``ts[-1]`` (must be given if ``ts`` is
        traced).
    :return: the log-likelihoods ``[num_paths]`` (a scalar for a 1-d ``ys``).

    >>> import jax, numpy as np
    >>> ts = 2.4 * np.arange(1, 49) / 48
    >>> ys = np.cumsum(np.random.default_rng(0).normal(0.0, 0.05**0.5, (16, 48)), axis=1)
    >>> with jax.enable_x64(True):
    ...     ll = kalman_log_likelihood(ts, ys, 0.01, 0.5, fbm_type="II")
    ...     prefers_bm = bool(ll.sum() > kalman_log_likelihood(ts, ys, 0.01, 0.2).sum())
    >>> ll.shape, prefers_bm   # Brownian paths: H = ½ beats H = 0.2
    ((16,), True)

    ``jax.grad(lambda h: kalman_log_likelihood(ts, ys, 0.01, h).sum())(0.7)`` is the score in
    H (compiling the gradient of the incomplete gamma functions takes several seconds on CPU).
    """
    _check_ts(ts)
    _check_ys(ys, jnp.shape(ts)[0])
    _check_obs_sd(obs_sd, jnp.shape(ts)[0])
    _check_hurst(hurst)
    _check_model(fbm_type, num_ou, gamma_max, horizon, drift_rate, sigma)
    horizon = _default_horizon(ts, horizon)
    ts, ys, ys2, obs_var = _prepare(ts, ys, obs_sd)
    if exact_bm:
        F, L, m0, P0 = linear_system(
            hurst, fbm_type, num_ou, gamma_max, horizon, drift_rate, sigma, exact_bm=True
        )
        ll = _kalman_jit(ts, ys2, obs_var, F, L, m0, P0)
    else:
        ll = _loglik(
            _float(hurst),
            ts,
            ys2,
            obs_var,
            _float(drift_rate),
            _float(sigma),
            fbm_type=fbm_type,
            num_ou=int(num_ou),
            gamma_max=float(gamma_max),
            horizon=horizon,
        )
    return ll[0] if ys.ndim == 1 else ll


#: The log-evidence log p(ys | H) is the Kalman log-likelihood (an alias).
log_evidence = kalman_log_likelihood


# --------------------------------------------------------------------------- Hurst MLE


def hurst_mle(
    ts,
    ys,
    obs_sd,
    fbm_type: str = "II",
    num_ou: int = 5,
    gamma_max: float = 20.0,
    horizon: float | None = None,
    drift_rate=0.0,
    sigma=1.0,
    grid=None,
) -> float:
    """The maximum-likelihood Hurst index Ĥ = argmax_H Σ_i log p(ys[i] | H) (spec §4 test 8).

    The summed :func:`kalman_log_likelihood` is evaluated on ``grid`` (one compiled filter,
    shared with :func:`kalman_log_likelihood`, dispatched once per grid point), then refined
    by a bounded scalar search (SciPy's ``minimize_scalar``, to 1e-6) between the neighbours
    of the best grid point. Runs in float64 internally (``jax.enable_x64``), whatever the
    ambient dtype.

    :param ts: ``[num_times]``; ``ys``: ``[num_paths, num_times]`` or ``[num_times]``;
        ``obs_sd``: scalar or ``[num_times]`` (all concrete).
    :param fbm_type, num_ou, gamma_max, horizon, drift_rate, sigma: the model, as in
        :func:`kalman_log_likelihood` (θ and σ are held fixed).
    :param grid: candidate H values in (0, 1), increasing; default 0.02, 0.04, …, 0.98.
    :return: Ĥ as a Python float.

    >>> import numpy as np
    >>> ts = 2.4 * np.arange(1, 49) / 48
    >>> rng = np.random.default_rng(1)
    >>> w = np.cumsum(rng.normal(0.0, 0.05**0.5, (16, 48)), axis=1)   # Brownian paths
    >>> h = hurst_mle(ts, w + rng.normal(0, 0.01, w.shape), 0.01, grid=np.arange(0.1, 0.95, 0.1))
    >>> abs(h - 0.5) < 0.05
    True
    """
    for name, x in (("ts", ts), ("ys", ys), ("obs_sd", obs_sd)):
        if not _is_concrete(x):
            raise TypeError(f"{name} must be concrete for hurst_mle (it runs its own search)")
    _check_ts(ts)
    _check_ys(ys, np.shape(ts)[0])
    _check_obs_sd(obs_sd, np.shape(ts)[0])
    _check_model(fbm_type, num_ou, gamma_max, horizon, drift_rate, sigma)
    if grid is None:
        grid = np.arange(0.02, 0.99, 0.02)
    grid = np.asarray(grid, dtype=np.float64)
    if (
        grid.ndim != 1
        or grid.size < 1
        or not np.all(np.isfinite(grid))
        or np.any(grid <= 0.0)
        or np.any(grid >= 1.0)
        or np.any(np.diff(grid) <= 0.0)
    ):
        raise ValueError("grid must be a non-empty increasing 1-d array of H values in (0, 1)")
    horizon = _default_horizon(ts, horizon)
    static = dict(
        fbm_type=fbm_type, num_ou=int(num_ou), gamma_max=float(gamma_max), horizon=horizon
    )
    from scipy.optimize import minimize_scalar

    with jax.enable_x64(True):
        ts_, _, ys2, obs_var = _prepare(ts, ys, obs_sd)
        args = (ts_, ys2, obs_var, _float(drift_rate), _float(sigma))
        # one compiled filter (shared with kalman_log_likelihood), dispatched per H
        pending = [jnp.sum(_loglik(_float(h), *args, **static)) for h in grid]
        values = np.array([float(v) for v in pending])
        values = np.where(np.isfinite(values), values, -np.inf)
        if not np.any(np.isfinite(values)):
            raise FloatingPointError("the log-likelihood is not finite anywhere on the grid")
        i = int(np.argmax(values))
        if grid.size == 1:
            return float(grid[0])
        lo = grid[i - 1] if i > 0 else max(0.5 * grid[0], 1e-4)
        hi = grid[i + 1] if i < grid.size - 1 else min(0.5 * (1.0 + grid[-1]), 1.0 - 1e-4)

        def negative(h):
            v = float(jnp.sum(_loglik(_float(h), *args, **static)))
            return -v if math.isfinite(v) else np.inf

        res = minimize_scalar(negative, bounds=(lo, hi), method="bounded", options={"xatol": 1e-6})
    return float(res.x) if res.fun <= -values[i] else float(grid[i])


# --------------------------------------------------------------------------- posterior


def _x_covariances(F, L, P0, ts, q):
    """Cov(X_ts, X_ts) ``[n, n]``, Cov(X_q, X_ts) ``[Q, n]`` and Var X_q ``[Q]``.

    Cov(X_a, X_b) = [e^{F|a−b|} P(min(a, b))]_{00} with P(t) = A(t) P0 A(t)ᵀ + Q(t); all the
    steps go through one :func:`van_loan` call, padded to a power of two (few compilations).
    """
    a = np.concatenate([ts, q])
    d = np.abs(a[:, None] - ts[None, :]).ravel()
    m = np.minimum(a[:, None], ts[None, :]).ravel()
    steps = np.concatenate([d, m, q])
    size = max(64, 1 << int(math.ceil(math.log2(steps.size))))
    A, Q = van_loan(F, L, _float(np.pad(steps, (0, size - steps.size))))
    A, Q = np.asarray(A), np.asarray(Q)
    P0 = np.asarray(P0)
    nd = d.size
    A_d, A_m, Q_m = A[:nd], A[nd : 2 * nd], Q[nd : 2 * nd]
    P_m = A_m @ P0 @ np.swapaxes(A_m, -1, -2) + Q_m
    cov = np.einsum("kj,kj->k", A_d[:, 0, :], P_m[:, :, 0]).reshape(a.size, ts.size)
    A_q, Q_q = A[2 * nd : 2 * nd + q.size], Q[2 * nd : 2 * nd + q.size]
    var_q = (A_q @ P0 @ np.swapaxes(A_q, -1, -2) + Q_q)[:, 0, 0]
    return cov[: ts.size], cov[ts.size :], var_q


def posterior_marginals(
    ts,
    ys,
    obs_sd,
    hurst,
    query_ts,
    fbm_type: str = "II",
    num_ou: int = 5,
    gamma_max: float = 20.0,
    horizon: float | None = None,
    drift_rate=0.0,
    sigma=1.0,
    exact_bm: bool = False,
):
    """The exact posterior mean and sd of X at ``query_ts`` given the observations.

    Gaussian conditioning of X at the query times on o = X_ts + N(0, obs_sd²), with the prior
    covariance of X under the linear model of :func:`linear_system`,
    Cov(X_t, X_s) = [e^{F|t−s|} P(min(t, s))]_{00} and P(t) = Cov Z_t from :func:`van_loan`
    (for θ = 0 this is σ²·:func:`~ppl.transforms.fbm.ma_covariance`). Exact for the MA-fBM
    model: the reference band of the fOU bridge (spec §3, B1). Computed in float64
    (``jax.enable_x64``) from concrete inputs; O(n³ + Q·n) in n = len(ts) observations.

    :param ts: ``[n]``; ``ys``: ``[num_paths, n]`` or ``[n]``; ``obs_sd``: scalar or ``[n]``.
    :param hurst: H ∈ (0, 1).
    :param query_ts: query times ``[Q]``, ≥ 0, any order.
    :param fbm_type, num_ou, gamma_max, drift_rate, sigma, exact_bm: see
        :func:`linear_system`; ``horizon``: T of the ω optimisation, default ``ts[-1]``
        (the bridge of the paper uses 6 with data on [0, 2]: pass it).
    :return: ``(mean [num_paths, Q] (or [Q] for a 1-d ys), sd [Q])`` as NumPy float64.

    Example (the B1 bridge: X_0 = 0, X_2 observed as 0 with sd 0.1, θ = 1, H = 0.7, type I):

    >>> import numpy as np
    >>> q = np.linspace(0.0, 2.0, 5)
    >>> mean, sd = posterior_marginals(np.array([2.0]), np.array([0.0]), 0.1, 0.7, q,
    ...                                fbm_type="I", horizon=6.0, drift_rate=1.0)
    >>> mean.shape, sd.shape, float(sd[0])
    ((5,), (5,), 0.0)
    >>> bool(np.all(sd[1:4] > sd[4]))   # widest in the middle, pinned near 0 at T
    True
    """
    for name, x in (("ts", ts), ("ys", ys), ("obs_sd", obs_sd), ("query_ts", query_ts)):
        if not _is_concrete(x):
            raise TypeError(f"{name} must be concrete for posterior_marginals")
    _check_ts(ts)
    n = np.shape(ts)[0]
    _check_ys(ys, n)
    _check_obs_sd(obs_sd, n)
    _check_hurst(hurst)
    _check_model(fbm_type, num_ou, gamma_max, horizon, drift_rate, sigma)
    q = np.asarray(query_ts, dtype=np.float64)
    if q.ndim != 1 or q.size < 1 or not np.all(np.isfinite(q)) or np.any(q < 0.0):
        raise ValueError(f"query_ts must be a non-empty 1-d array of finite times ≥ 0, got {q}")
    horizon = _default_horizon(ts, horizon)
    with jax.enable_x64(True):
        F, L, _, P0 = linear_system(
            float(hurst), fbm_type, num_ou, gamma_max, horizon, drift_rate, sigma, exact_bm
        )
        c_oo, c_qo, var_q = _x_covariances(F, L, P0, np.asarray(ts, dtype=np.float64), q)
    y = np.asarray(ys, dtype=np.float64)
    r2 = np.broadcast_to(np.asarray(obs_sd, dtype=np.float64) ** 2, (n,))
    from scipy.linalg import cho_factor, cho_solve

    fac = cho_factor(0.5 * (c_oo + c_oo.T) + np.diag(r2), lower=True)
    w = cho_solve(fac, c_qo.T)  # [n, Q]
    mean = y @ w
    var = var_q - np.sum(c_qo * w.T, axis=1)
    return mean, np.sqrt(np.maximum(var, 0.0))
