"""Kalman filtering, RTS smoothing and bridging for linear-Gaussian chains (spec ``funbat.md``).

The chain is ``z_0 = A_0 z_{-1} + q_0``, ``z_s = A_s z_{s-1} + q_s``, ``q_s ~ N(0, Q_s)``,
started from ``z_{-1} ~ N(m0, P0)`` (with :func:`ppl.transforms.state_space.discretize`'s
``A_0 = I``, ``Q_0 = Pinf`` and the default ``m0 = 0``, ``P0 = 0`` that is the stationary
start). Observations are **information-form** Gaussian factors on ``H z_s``::

    exp(η_sᵀ H z_s − ½ z_sᵀ Hᵀ Λ_s H z_s)          (Λ_s ⪰ 0, possibly singular or zero)

so the messages of expectation propagation plug in directly and an index with no data
(``Λ = 0``, ``η = 0``) can sit on the chain. For ordinary observations ``y_s ~ N(H z_s, R_s)``
use ``Λ = R⁻¹``, ``η = R⁻¹ y``; the evidence is then ``logZ + Σ_s [½ log det(Λ_s / 2π) −
½ y_sᵀ Λ_s y_s]``.

* :func:`filter` -- forward pass, ``(m, P, logZ)``; :func:`smoother` -- RTS backward pass,
  ``(m_s, P_s, cross)``. ``parallel=True`` uses ``lax.associative_scan`` (O(log n) depth,
  Särkkä & García-Fernández 2021) instead of ``lax.scan``; the results agree to rounding.
* :func:`bridge` -- the posterior at new indexes (between, before or after the grid).

Everything is pure and jit-able; batch over modes or ranks with ``jax.vmap``. Work in
float64 (``jax.enable_x64(True)``) when the chain is ill-conditioned (close indexes, ν=5/2).

Example (GP regression on 3 points)::

    >>> import jax.numpy as jnp, numpy as np
    >>> from ppl.transforms.state_space import Matern, discretize, lti_sde
    >>> sde = lti_sde(Matern(1.5, 1.0, 1.0))
    >>> t = np.array([0.0, 0.5, 2.0]); y = np.array([1.0, 0.5, -0.2])
    >>> A, Q = discretize(sde, t)
    >>> lam = jnp.full((3, 1, 1), 1 / 0.1); eta = (y / 0.1)[:, None]
    >>> m, P, cross = smoother(A, Q, sde.H, lam, eta)
    >>> m.shape, P.shape, cross.shape
    ((3, 2), (3, 2, 2), (2, 2, 2))
    >>> mean, cov = bridge(sde, t, m, P, cross, np.array([1.0, 3.0]))
    >>> mean.shape, bool(jnp.all(jnp.linalg.eigvalsh(cov) >= -1e-6))
    ((2, 2), True)
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ppl.transforms.state_space import LTISDE, transition

__all__ = ["bridge", "filter", "smoother"]

_LOG_2PI = math.log(2.0 * math.pi)


def _sym(M):
    return 0.5 * (M + jnp.swapaxes(M, -1, -2))


def _t(M):
    return jnp.swapaxes(M, -1, -2)


def _solve(a, b):
    """``a⁻¹ b`` for small square ``a`` (batched; ``b`` a matrix or a vector): LU with partial
    pivoting through ``lax.linalg`` directly (much less to compile than ``jnp.linalg.solve``
    inside the associative scans)."""
    vec = b.ndim == a.ndim - 1
    if vec:
        b = b[..., None]
    lu, _, perm = lax.linalg.lu(a)
    b = jnp.take_along_axis(b, perm[..., None], axis=-2)
    x = lax.linalg.triangular_solve(lu, b, left_side=True, lower=True, unit_diagonal=True)
    x = lax.linalg.triangular_solve(lu, x, left_side=True, lower=False)
    return x[..., 0] if vec else x


def _right_solve(X, Y):
    """``X Y⁻¹`` (batched)."""
    return _t(_solve(_t(Y), _t(X)))


def _check(A, Q, H, obs_lam, obs_eta, m0, P0):
    A = jnp.asarray(A)
    Q = jnp.asarray(Q, A.dtype)
    H = jnp.asarray(H, A.dtype)
    obs_lam = jnp.asarray(obs_lam, A.dtype)
    obs_eta = jnp.asarray(obs_eta, A.dtype)
    if A.ndim != 3 or A.shape[1] != A.shape[2]:
        raise ValueError(f"A must have shape [n, D, D], got {A.shape}")
    n, D, _ = A.shape
    if Q.shape != A.shape:
        raise ValueError(f"Q must have the shape of A {A.shape}, got {Q.shape}")
    if H.ndim != 2 or H.shape[1] != D:
        raise ValueError(f"H must have shape [p, {D}], got {H.shape}")
    p = H.shape[0]
    if obs_lam.shape != (n, p, p):
        raise ValueError(f"obs_lam must have shape {(n, p, p)}, got {obs_lam.shape}")
    if obs_eta.shape != (n, p):
        raise ValueError(f"obs_eta must have shape {(n, p)}, got {obs_eta.shape}")
    m0 = jnp.zeros(D, A.dtype) if m0 is None else jnp.asarray(m0, A.dtype)
    P0 = jnp.zeros((D, D), A.dtype) if P0 is None else jnp.asarray(P0, A.dtype)
    if m0.shape != (D,):
        raise ValueError(f"m0 must have shape {(D,)}, got {m0.shape}")
    if P0.shape != (D, D):
        raise ValueError(f"P0 must have shape {(D, D)}, got {P0.shape}")
    return A, Q, H, obs_lam, obs_eta, m0, P0


def _update(m, P, H, lam, eta, with_logz=True):
    """Information-form update of ``N(m, P)`` by ``exp(ηᵀHz − ½zᵀHᵀΛHz)``; returns the
    posterior and the log of the factor's integral under the prior."""
    p = H.shape[0]
    eye = jnp.eye(p, dtype=P.dtype)
    PHt = P @ H.T
    S = _sym(H @ PHt)
    mu = H @ m
    r = eta - lam @ mu
    Mx = eye + lam @ S  # I + ΛS
    m_new = m + PHt @ _solve(Mx, r)
    P_new = P - PHt @ _solve(Mx, lam @ PHt.T)
    if not with_logz:
        return m_new, _sym(P_new), jnp.zeros((), P.dtype)
    SG = _solve(eye + S @ lam, S)  # S (I + ΛS)⁻¹
    _, logdet = jnp.linalg.slogdet(eye + S @ lam)
    logz = eta @ mu - 0.5 * mu @ lam @ mu + 0.5 * r @ SG @ r - 0.5 * logdet
    return m_new, _sym(P_new), logz


def _predict(m, P, A, Q):
    return A @ m, _sym(A @ P @ A.T + Q)


@functools.partial(jax.jit, static_argnames="with_logz")
def _filter_seq(A, Q, H, lam, eta, m0, P0, with_logz=True):
    def body(carry, inp):
        m, P = carry
        a, q, la, et = inp
        m, P = _predict(m, P, a, q)
        m, P, lz = _update(m, P, H, la, et, with_logz)
        return (m, P), (m, P, lz)

    _, (m, P, lz) = lax.scan(body, (m0, P0), (A, Q, lam, eta))
    return m, P, jnp.sum(lz)


def _filter_elements(A, Q, H, lam, eta, m0, P0):
    n, D, _ = A.shape
    p = H.shape[0]
    eye_p = jnp.eye(p, dtype=A.dtype)
    eye_d = jnp.eye(D, dtype=A.dtype)

    def generic(a, q, la, et):
        S = _sym(H @ q @ H.T)
        Mx = eye_p + la @ S
        QHt = q @ H.T
        gl = _solve(Mx, la)  # (I + ΛS)⁻¹ Λ
        ge = _solve(Mx, et)  # (I + ΛS)⁻¹ η
        Kl = QHt @ gl
        AA = (eye_d - Kl @ H) @ a
        b = QHt @ ge
        C = _sym(q - Kl @ H @ q)
        HA = H @ a
        return AA, b, C, HA.T @ ge, _sym(HA.T @ gl @ HA)

    AA, b, C, et, J = jax.vmap(generic)(A, Q, lam, eta)
    mp, Pp = _predict(m0, P0, A[0], Q[0])
    b0, C0, _ = _update(mp, Pp, H, lam[0], eta[0])
    AA = AA.at[0].set(jnp.zeros((D, D), A.dtype))
    b = b.at[0].set(b0)
    C = C.at[0].set(C0)
    et = et.at[0].set(jnp.zeros(D, A.dtype))
    J = J.at[0].set(jnp.zeros((D, D), A.dtype))
    return AA, b, C, et, J


def _filter_op(ei, ej):
    """Combine filter elements, ``ei`` before ``ej`` (batched)."""
    Ai, bi, Ci, ei_, Ji = ei
    Aj, bj, Cj, ej_, Jj = ej
    eye = jnp.eye(Ai.shape[-1], dtype=Ai.dtype)
    M = _right_solve(Aj, eye + Ci @ Jj)
    Nn = _right_solve(_t(Ai), eye + Jj @ Ci)
    A = M @ Ai
    b = (M @ (bi + (Ci @ ej_[..., None])[..., 0])[..., None])[..., 0] + bj
    C = _sym(M @ Ci @ _t(Aj) + Cj)
    e = (Nn @ (ej_ - (Jj @ bi[..., None])[..., 0])[..., None])[..., 0] + ei_
    J = _sym(Nn @ Jj @ Ai + Ji)
    return A, b, C, e, J


def _doubling_scan(op, elems):
    """Inclusive scan of an associative ``op`` by recursive doubling (Hillis–Steele):
    ⌈log₂ n⌉ rounds in a ``fori_loop``, each applying ``op`` to all n elements at once
    (depth O(log n), work O(n log n); ``op`` is compiled once)."""
    n = jax.tree.leaves(elems)[0].shape[0]
    rounds = max(1, math.ceil(math.log2(max(n, 2))))
    idx = jnp.arange(n)

    def body(r, x):
        shift = 2**r
        src = jnp.maximum(idx - shift, 0)
        prev = jax.tree.map(lambda a: a[src], x)
        new = op(prev, x)
        keep = idx >= shift
        return jax.tree.map(
            lambda a, b: jnp.where(keep.reshape((-1,) + (1,) * (a.ndim - 1)), a, b), new, x
        )

    return lax.fori_loop(0, rounds, body, elems)


def _parallel_scan(op, elems, reverse=False):
    """Inclusive scan of an associative ``op`` (batched over leading dims) in O(log n) depth
    and O(n) work, with ``op`` compiled three times only.

    The n elements are cut into B ≈ n / log₂ n blocks of L = ⌈log₂ n⌉: (1) a ``lax.scan``
    of length L runs all blocks at once, (2) the B block totals are scanned by recursive
    doubling (⌈log₂ B⌉ rounds of B operations), (3) each block's exclusive prefix is combined
    with its elements in one batched ``op``. (``lax.associative_scan`` inlines ``op``
    2 log₂ n times, which takes tens of seconds to compile for these matrix operators.) With
    ``reverse`` the result at i combines elements i..n-1 and ``op(later, earlier)`` is called.
    """
    if reverse:
        elems = jax.tree.map(lambda x: jnp.flip(x, 0), elems)
    n = jax.tree.leaves(elems)[0].shape[0]
    L = max(1, math.ceil(math.log2(max(n, 2))))
    B = -(-n // L)
    pad = B * L - n

    def blocks(x):  # [n, ...] -> [L, B, ...], padded at the end with copies of the last
        x = jnp.concatenate([x, jnp.repeat(x[-1:], pad, axis=0)]) if pad else x
        return jnp.swapaxes(x.reshape((B, L) + x.shape[1:]), 0, 1)

    xb = jax.tree.map(blocks, elems)
    first = jax.tree.map(lambda a: a[0], xb)
    rest = jax.tree.map(lambda a: a[1:], xb)

    def step(carry, x):
        c = op(carry, x)
        return c, c

    last, within = lax.scan(step, first, rest)
    within = jax.tree.map(lambda f, w: jnp.concatenate([f[None], w]), first, within)  # [L, B]
    totals = _doubling_scan(op, last)  # inclusive over blocks, [B, ...]
    prefix = jax.tree.map(lambda t: jnp.broadcast_to(t[:-1], (L,) + t[:-1].shape), totals)
    tail = jax.tree.map(lambda w: w[:, 1:], within)
    combined = op(prefix, tail)  # [L, B-1, ...]
    out = jax.tree.map(lambda w, c: jnp.concatenate([w[:, :1], c], axis=1), within, combined)
    out = jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1).reshape((B * L,) + x.shape[2:])[:n], out)
    if reverse:
        out = jax.tree.map(lambda x: jnp.flip(x, 0), out)
    return out


@jax.jit
def _filter_par(A, Q, H, lam, eta, m0, P0):
    elems = _filter_elements(A, Q, H, lam, eta, m0, P0)
    _, m, P, _, _ = _parallel_scan(_filter_op, elems)
    m_prev = jnp.concatenate([m0[None], m[:-1]])
    P_prev = jnp.concatenate([P0[None], P[:-1]])
    mp, Pp = jax.vmap(_predict)(m_prev, P_prev, A, Q)
    lz = jax.vmap(lambda a, b, c, d: _update(a, b, H, c, d)[2])(mp, Pp, lam, eta)
    return m, P, jnp.sum(lz)


def filter(A, Q, H, obs_lam, obs_eta, m0=None, P0=None, parallel: bool = False):
    """Kalman filter with information-form observations.

    :param A: ``f[n, D, D]`` transitions (``A[s]`` maps ``z_{s-1}`` to ``z_s``).
    :param Q: ``f[n, D, D]`` transition noise covariances.
    :param H: ``f[p, D]`` observation matrix.
    :param obs_lam: ``f[n, p, p]`` observation precisions Λ_s ⪰ 0 (zero: no data).
    :param obs_eta: ``f[n, p]`` observation information vectors η_s.
    :param m0: ``f[D]`` mean before the first transition (default 0).
    :param P0: ``f[D, D]`` covariance before the first transition (default 0).
    :param bool parallel: associative scan instead of ``lax.scan``.
    :return: ``(m f[n, D], P f[n, D, D], logZ f[])``: filtered moments and the log-integral
        of the product of observation factors under the prior.
    """
    A, Q, H, lam, eta, m0, P0 = _check(A, Q, H, obs_lam, obs_eta, m0, P0)
    return (_filter_par if parallel else _filter_seq)(A, Q, H, lam, eta, m0, P0)


@jax.jit
def _smooth_seq(A, Q, m, P):
    def body(carry, inp):
        ms_next, Ps_next = carry
        mf, Pf, a, q = inp
        mp, Pp = _predict(mf, Pf, a, q)
        G = _t(_solve(Pp, a @ Pf))  # P Aᵀ Pp⁻¹
        ms = mf + G @ (ms_next - mp)
        Ps = _sym(Pf + G @ (Ps_next - Pp) @ G.T)
        return (ms, Ps), (ms, Ps, G @ Ps_next)

    init = (m[-1], P[-1])
    _, (ms, Ps, cross) = lax.scan(body, init, (m[:-1], P[:-1], A[1:], Q[1:]), reverse=True)
    return jnp.concatenate([ms, m[-1:]]), jnp.concatenate([Ps, P[-1:]]), cross


def _smooth_op(later, earlier):
    El, gl, Ll = later
    Ee, ge, Le = earlier
    return Ee @ El, (Ee @ gl[..., None])[..., 0] + ge, _sym(Ee @ Ll @ _t(Ee) + Le)


@jax.jit
def _smooth_par(A, Q, m, P):
    def elem(mf, Pf, a, q):
        mp, Pp = _predict(mf, Pf, a, q)
        E = _t(_solve(Pp, a @ Pf))
        return E, mf - E @ mp, _sym(Pf - E @ a @ Pf)

    E, g, L = jax.vmap(elem)(m[:-1], P[:-1], A[1:], Q[1:])
    D = m.shape[-1]
    E = jnp.concatenate([E, jnp.zeros((1, D, D), E.dtype)])
    g = jnp.concatenate([g, m[-1:]])
    L = jnp.concatenate([L, P[-1:]])
    _, ms, Ps = _parallel_scan(_smooth_op, (E, g, L), reverse=True)
    cross = E[:-1] @ Ps[1:]
    return ms, Ps, cross


def smoother(A, Q, H, obs_lam, obs_eta, m0=None, P0=None, parallel: bool = False):
    """Rauch–Tung–Striebel smoother (arguments as :func:`filter`).

    :return: ``(m_s f[n, D], P_s f[n, D, D], cross f[n-1, D, D])``, the smoothed marginals
        and ``cross[s] = Cov(z_s, z_{s+1} | all data)``.
    """
    A, Q, H, lam, eta, m0, P0 = _check(A, Q, H, obs_lam, obs_eta, m0, P0)
    if parallel:
        m, P, _ = _filter_par(A, Q, H, lam, eta, m0, P0)
        return _smooth_par(A, Q, m, P)
    m, P, _ = _filter_seq(A, Q, H, lam, eta, m0, P0, with_logz=False)
    return _smooth_seq(A, Q, m, P)


def bridge(sde: LTISDE, t, m_s, P_s, cross, t_new):
    """The smoothed posterior of the state at new indexes (spec §1.6, exact).

    Between grid points ``t_s < x < t_{s+1}`` the state is conditioned on both neighbours
    (``E[z|z_s, z_{s+1}] = B₁z_s + B₂z_{s+1}``, computed with the gain ``K = Q₁A₂ᵀQ_{s+1}⁻¹``
    so that nothing is inverted that vanishes as ``x → t_s``), and the joint smoothed law of
    ``(z_s, z_{s+1})`` (with ``cross``) is pushed through. After the last index: the
    prediction ``N(A m_n, A P_n Aᵀ + Q)``; before the first: the backward conditional of the
    stationary chain. At a grid index it returns that index's marginal.

    :param LTISDE sde: the chain's SDE (:func:`~ppl.transforms.state_space.stack_sde` for
        several independent functions in one state).
    :param t: ``f[n]`` the sorted grid of the smoother.
    :param m_s, P_s, cross: the output of :func:`smoother` on ``t``.
    :param t_new: ``f[m]`` finite new indexes, any order.
    :return: ``(mean f[m, D], cov f[m, D, D])``.
    """
    t = jnp.asarray(t, m_s.dtype)
    t_new = jnp.asarray(t_new, m_s.dtype)
    if not isinstance(t_new, jax.core.Tracer) and not np.all(np.isfinite(np.asarray(t_new))):
        raise ValueError("t_new must be finite (got NaN or inf)")
    if t_new.ndim != 1:
        raise ValueError(f"t_new must be a 1-D array, got shape {t_new.shape}")
    return _bridge(sde, t, m_s, P_s, cross, t_new)


@jax.jit
def _bridge(sde, t, m_s, P_s, cross, t_new):
    n, D = m_s.shape
    cross_p = jnp.concatenate([cross, jnp.zeros((1, D, D), m_s.dtype)])
    eye = jnp.eye(D, dtype=m_s.dtype)
    Pinf = sde.Pinf

    def one(x):
        idx = jnp.searchsorted(t, x, side="right") - 1
        i0 = jnp.clip(idx, 0, n - 1)
        i1 = jnp.clip(idx + 1, 0, n - 1)
        m0, P0, m1, P1, X = m_s[i0], P_s[i0], m_s[i1], P_s[i1], cross_p[i0]
        before = idx < 0
        after = idx >= n - 1
        d1 = jnp.where(before, t[0] - x, x - t[i0])
        d2 = jnp.where(before | after, 0.0, t[i1] - x)
        A1, Q1 = transition(sde, jnp.clip(d1, 0.0))
        A2, Q2 = transition(sde, jnp.clip(d2, 0.0))
        # interior
        Qf = jnp.where(before | after, eye, A2 @ Q1 @ A2.T + Q2)
        K = _right_solve(Q1 @ A2.T, Qf)
        B1 = (eye - K @ A2) @ A1
        B2 = K
        Cs = Q1 - K @ A2 @ Q1
        mean_in = B1 @ m0 + B2 @ m1
        cov_in = Cs + B1 @ P0 @ B1.T + B1 @ X @ B2.T + B2 @ X.T @ B1.T + B2 @ P1 @ B2.T
        # after the last index
        mean_after = A1 @ m0
        cov_after = A1 @ P0 @ A1.T + Q1
        # before the first index: z_1 = A1 z + q with z stationary
        B = _t(_solve(Pinf, A1 @ Pinf))  # Pinf A1ᵀ Pinf⁻¹
        mean_before = B @ m0
        cov_before = Pinf - B @ A1 @ Pinf + B @ P0 @ B.T
        mean = jnp.where(before, mean_before, jnp.where(after, mean_after, mean_in))
        cov = jnp.where(before, cov_before, jnp.where(after, cov_after, cov_in))
        return mean, _sym(cov)

    return jax.vmap(one)(t_new)
