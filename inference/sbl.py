"""Sparse Bayesian learning by EM, classic and Kronecker-structured (KroSBL).

Model (see :mod:`ppl.transforms.kronecker`): ``y = Φ x + n`` with ``Φ = A_1 ⊗ … ⊗ A_I``,
``n ~ N(0, σ² I)``, ``x ~ N(0, diag γ)``. EM over the hyperparameters γ alternates

* the **E-step** -- ``μ``, ``diag Σ`` and the cost ``L = log|C| + yᴴC⁻¹y`` of the Gaussian
  posterior of x (:func:`estep`, exact and Kronecker-aware: never ``N×N`` or ``M×M``);
* the **M-step** -- minimise ``Q(γ) = Σ_j log γ_j + d_j/γ_j`` with ``d_j = Σ_jj + |μ_j|²``:

  - ``"classic"``: γ unstructured, ``γ = d`` (Wipf & Rao 2004);
  - ``"am"``: ``γ = γ_1 ⊗ … ⊗ γ_I``, alternating closed-form updates of each factor
    (:func:`am_mstep`; each update minimises Q over its block, so L never increases);
  - ``"svd"``: the best rank-one Kronecker fit of d (:func:`svd_mstep`; fewer iterations
    in practice, no monotonicity guarantee).

plus, optionally, noise-variance learning, pruning of negligible γ entries (boolean
*masks* per mode, so every shape stays fixed under ``jit``) and pattern coupling of
block-sparse modes (PC-KroSBL, :func:`am_mstep` with ``coupling``).

The algorithm is BlackJAX-style: pure :func:`init` / :func:`step` over the pytree
:class:`SBLState`, and :func:`run` (a ``lax.while_loop``) on top; :func:`fit` is the entry
point on a list of factors. Everything is jittable; functions called on concrete (non
traced) inputs compute in float64 (enabled locally, never globally) and return NumPy
arrays.

Example::

    >>> import numpy as np
    >>> from ppl.inference import sbl
    >>> rng = np.random.default_rng(0)
    >>> a1, a2 = rng.normal(size=(8, 12)), rng.normal(size=(8, 12))
    >>> x = np.kron(np.eye(12)[3] * 2.0, np.eye(12)[7] * -1.5)      # one active entry
    >>> y = np.kron(a1, a2) @ x
    >>> res = sbl.fit([a1, a2], y, m_step="am", noise_var=1e-6)
    >>> int(np.argmax(np.abs(res.mean))), bool(res.converged)
    (43, True)
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ppl.transforms.kronecker import KronOperator, kron_posterior, kron_vector

__all__ = [
    "M_STEPS",
    "SBLResult",
    "SBLState",
    "am_mstep",
    "coupling_matrix",
    "estep",
    "fit",
    "fit_model",
    "init",
    "komp",
    "omp",
    "run",
    "step",
    "svd_mstep",
]

M_STEPS = ("am", "svd", "classic")
#: The reference code's settings (spec §2), without its defects: pruning ratios per M-step.
PAPER_PRUNE = {"am": 1e-2, "svd": 1e-3, "classic": 1e-3}
#: Entries of the classic (dense) dictionary beyond which ``m_step="classic"`` refuses.
CLASSIC_DENSE_LIMIT = 50_000_000
#: ε of the coupled hyperparameter γ̃ = ε + C_β g, relative to the slice-mean target's max.
COUPLING_EPS = 1e-5


# ------------------------------------------------------------------------------ helpers


def _x64(fn):
    """Run ``fn`` in float64 when called on concrete inputs (JAX x64 enabled locally) and
    return NumPy arrays; under ``jit`` (tracer inputs) or with x64 on, call straight through."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        leaves = jax.tree_util.tree_leaves((args, kwargs))
        if jax.config.jax_enable_x64 or any(isinstance(v, jax.core.Tracer) for v in leaves):
            return fn(*args, **kwargs)
        with jax.enable_x64(True):
            out = fn(*args, **kwargs)
            return jax.tree_util.tree_map(
                lambda v: np.asarray(v) if isinstance(v, jax.Array) else v, out
            )

    return wrapper


def _mode_sum(t, keep: int):
    """Sum a tensor over every axis but ``keep``."""
    return jnp.sum(t, axis=tuple(a for a in range(t.ndim) if a != keep))


def _outer(vectors):
    """``v_1 ∘ … ∘ v_I`` as a tensor ``[n_1, …, n_I]``."""
    return kron_vector(vectors).reshape(tuple(v.shape[0] for v in vectors))


def _normalise(gammas):
    """Unit norm for every factor but the last, which carries the scale (spec §1.1)."""
    gammas = list(gammas)
    scale = 1.0
    for i in range(len(gammas) - 1):
        norm = jnp.linalg.norm(gammas[i])
        safe = jnp.where(norm > 0, norm, 1.0)
        gammas[i] = gammas[i] / safe
        scale = scale * safe
    gammas[-1] = gammas[-1] * scale
    return gammas


def _default_masks(gammas):
    return [jnp.ones(jnp.shape(g), bool) for g in gammas]


def coupling_matrix(n: int, beta: float, half_width: int = 1):
    """The pattern-coupling matrix ``C_β`` ``[n, n]``: 1 on the diagonal, β on the
    off-diagonals up to ``half_width`` (1: tridiagonal, the PC-KroSBL choice).

    Example::

        >>> coupling_matrix(3, 0.5).tolist()
        [[1.0, 0.5, 0.0], [0.5, 1.0, 0.5], [0.0, 0.5, 1.0]]
    """
    idx = jnp.arange(n)
    dist_ = jnp.abs(idx[:, None] - idx[None, :])
    return jnp.where(dist_ == 0, 1.0, jnp.where(dist_ <= half_width, beta, 0.0))


def _nnls(c, t, iters: int = 300):
    """``argmin_{g ≥ 0} ‖C g − t‖²`` by accelerated projected gradient (FISTA)."""
    lip = jnp.linalg.norm(c, 2) ** 2
    ctc, ctt = c.T @ c, c.T @ t

    def body(_, carry):
        g, z, s = carry
        g_new = jnp.clip(z - (ctc @ z - ctt) / lip, 0.0)
        s_new = 0.5 * (1.0 + jnp.sqrt(1.0 + 4.0 * s * s))
        z_new = g_new + ((s - 1.0) / s_new) * (g_new - g)
        return g_new, z_new, s_new

    g0 = jnp.clip(t, 0.0) / jnp.sum(c, axis=1)
    g, _, _ = lax.fori_loop(0, iters, body, (g0, g0, jnp.asarray(1.0, t.dtype)))
    return g


def _check_coupling(coupling, num_modes):
    """``{mode: (beta, half_width)}`` from ``{mode: beta}`` or ``{mode: (beta, hw)}``."""
    if coupling is None:
        return {}
    if not isinstance(coupling, Mapping):
        raise TypeError(f"coupling must be a dict {{mode: beta}}, got {type(coupling).__name__}")
    out = {}
    for mode, spec in coupling.items():
        beta, hw = spec if isinstance(spec, tuple) else (spec, 1)
        if not isinstance(mode, (int, np.integer)) or not 0 <= mode < num_modes:
            raise ValueError(f"coupling: mode {mode!r} is not in 0..{num_modes - 1}")
        if not 0.0 <= float(beta) < 1.0:
            raise ValueError(f"coupling: beta of mode {mode} must be in [0, 1), got {beta}")
        if int(hw) < 1:
            raise ValueError(f"coupling: half width of mode {mode} must be >= 1, got {hw}")
        out[int(mode)] = (float(beta), int(hw))
    return out


# ------------------------------------------------------------------------------ E-step


def _concrete(*values) -> bool:
    return not any(isinstance(v, jax.core.Tracer) for v in jax.tree_util.tree_leaves(values))


def _check_estep_inputs(op, gammas, noise_var, y):
    """Shape and range checks on concrete inputs (skipped under ``jit``)."""
    if len(gammas) != op.num_modes:
        raise ValueError(f"gammas must hold {op.num_modes} vectors, got {len(gammas)}")
    for i, (g, n) in enumerate(zip(gammas, op.in_shape, strict=True)):
        if jnp.shape(g) != (n,):
            raise ValueError(f"gammas[{i}] must have shape ({n},), got {jnp.shape(g)}")
    if jnp.ndim(y) == 0 or jnp.shape(y)[-1] != op.shape[0]:
        raise ValueError(
            f"y must have shape [..., {op.shape[0]}] (Π m_i of {op.out_shape}), got {jnp.shape(y)}"
        )
    if not _concrete(gammas, noise_var, y):
        return
    for i, g in enumerate(gammas):
        g = np.asarray(g)
        if not np.all(np.isfinite(g)) or np.any(g < 0):
            raise ValueError(f"gammas[{i}] must be finite and >= 0 (0 = pruned)")
    _validate_scalar(noise_var, "noise_var", allow_none=False)
    if not np.all(np.isfinite(np.asarray(y))):
        raise ValueError("y contains NaN or inf values; clean the data first")


@_x64
def estep(op, gammas, noise_var, y, form: str = "measurement"):
    """The exact E-step of (Kronecker) SBL: ``(μ, diag Σ, L)``.

    See :func:`ppl.transforms.kronecker.kron_posterior` for the maths of the two routes.

    :param op: the dictionary, a :class:`~ppl.transforms.kronecker.KronOperator` or its list of
        factors ``A_i [m_i, n_i]``.
    :param gammas: per-mode hyperparameters ``γ_i [n_i]`` (≥ 0; 0 means pruned).
    :param noise_var: σ² > 0.
    :param y: observations ``[M]`` (or ``[T, M]``: snapshots sharing γ).
    :param form: ``"measurement"`` (default; ``O(Σ m_i³ + N max m_i)``) or ``"parameter"``
        (``O(Σ n_i³ + N Σ n_i)``).
    :return: ``(mu [N] (or [T, N]), var_diag [N], cost)``.

    Example::

        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> mu, var, cost = estep([rng.normal(size=(3, 5))], [np.ones(5)], 0.1, np.ones(3))
        >>> mu.shape, var.shape, cost.dtype
        ((5,), (5,), dtype('float64'))
    """
    op = op if isinstance(op, KronOperator) else KronOperator(op)
    _check_estep_inputs(op, list(gammas), noise_var, y)
    return kron_posterior(op, list(gammas), noise_var, y, form=form)


# ------------------------------------------------------------------------------ M-steps


def _am_target(d_t, gammas, masks, i):
    """The AM slice mean of mode ``i``: ``(1/c_i) Σ_{j: j_i = k} d_j / Π_{l≠i} γ_l[j_l]``."""
    inv = [
        jnp.where(m & (g > 0), 1.0 / jnp.where(g > 0, g, 1.0), 0.0)
        for g, m in zip(gammas, masks, strict=True)
    ]
    inv[i] = jnp.ones_like(gammas[i])
    count = 1.0
    for o, (g, m) in enumerate(zip(gammas, masks, strict=True)):
        if o != i:
            count = count * jnp.sum(m & (g > 0))
    total = _mode_sum(d_t * _outer(inv), i)
    return total / jnp.maximum(count, 1.0)


def _am_sweep(d_t, gammas, masks, coupling):
    gammas = list(gammas)
    for i in range(len(gammas)):
        target = _am_target(d_t, gammas, masks, i)
        if i in coupling:
            beta, hw = coupling[i]
            c = coupling_matrix(target.shape[0], beta, hw).astype(target.dtype)
            g = _nnls(c, target)
            target = COUPLING_EPS * jnp.max(target) + c @ g
        gammas[i] = jnp.where(masks[i], target, 0.0)
    return _normalise(gammas)


@_x64
def am_mstep(
    d,
    gammas,
    masks=None,
    sweeps: int | None = 1,
    tol: float = 1e-6,
    max_sweeps: int = 50,
    coupling=None,
):
    """Alternating-minimisation M-step (AM-KroSBL).

    With every factor but γ_i fixed, ``Q(γ) = Σ_j log γ_j + d_j/γ_j`` separates over the
    entries of γ_i and each has the closed-form minimiser

        ``γ_i[k] = (1/c_i) Σ_{j: j_i = k} d_j / Π_{l≠i} γ_l[j_l]``

    (``c_i``: the number of active entries of the other modes). Factors are updated in
    turn (Gauss-Seidel) and then normalised (``‖γ_i‖ = 1`` for ``i < I``, the scale in
    ``γ_I``). Each update minimises Q over its block, so Q never increases, and neither does
    the SBL cost L of the EM iteration (generalised EM).

    With ``coupling={mode: beta}`` (PC-KroSBL, block-sparse modes) the coupled modes use
    ``γ̃_i = ε + C_β g`` with ``g = argmin_{g≥0} ‖C_β g − t_i‖`` (t_i the slice mean above,
    C_β :func:`coupling_matrix`, ε = 1e-5·max t_i): a heuristic, not monotone.

    :param d: ``Σ_jj + |μ_j|²``, flat ``[N]`` (C order) or a tensor ``[n_1, …, n_I]``.
    :param gammas: the current factors ``γ_i [n_i]`` (the starting point of the sweeps).
    :param masks: ``None`` or per-mode bool ``[n_i]`` (``False``: pruned, γ stays 0).
    :param sweeps: number of Gauss-Seidel sweeps (1 keeps the generalised-EM guarantee at
        the least cost), or ``None`` to sweep until the relative change of ``⊗γ_i`` is below
        ``tol`` (at most ``max_sweeps``).
    :param coupling: ``None`` or ``{mode: beta}`` / ``{mode: (beta, half_width)}``.
    :return: the list of new factors ``γ_i [n_i]``.

    Example::

        >>> import numpy as np
        >>> d = np.outer([1.0, 2.0], [3.0, 1.0, 1.0]).ravel()      # exactly rank one
        >>> g = am_mstep(d, [np.ones(2), np.ones(3)])
        >>> bool(np.allclose(np.kron(*g), d))
        True
    """
    gammas = [jnp.asarray(g) for g in gammas]
    shape = tuple(g.shape[0] for g in gammas)
    masks = _default_masks(gammas) if masks is None else [jnp.asarray(m, bool) for m in masks]
    coupling = _check_coupling(coupling, len(gammas))
    d_t = jnp.reshape(jnp.asarray(d), shape)
    dtype = jnp.result_type(d_t, *gammas)
    d_t = d_t.astype(dtype)
    gammas = [jnp.where(m, g, 0.0).astype(dtype) for g, m in zip(gammas, masks, strict=True)]
    if sweeps is not None:
        for _ in range(int(sweeps)):
            gammas = _am_sweep(d_t, gammas, masks, coupling)
        return gammas

    def cond(carry):
        _, rel, k = carry
        return (rel >= tol) & (k < max_sweeps)

    def body(carry):
        gs, _, k = carry
        new = _am_sweep(d_t, gs, masks, coupling)
        a, b = kron_vector(new), kron_vector(gs)
        rel = jnp.linalg.norm(a - b) / jnp.maximum(jnp.linalg.norm(a), 1e-300)
        return new, rel, k + 1

    init_carry = (gammas, jnp.asarray(jnp.inf, dtype), jnp.asarray(0))
    return lax.while_loop(cond, body, init_carry)[0]


def _leading_pair(mat):
    """Leading singular triple ``(s₁, u, v)`` of a non-negative matrix and the ratio s₂/s₁,
    from the eigendecomposition of its smaller Gram matrix (exact; ``O(min(r,c)·r·c)``)."""
    rows, cols = mat.shape
    gram = mat @ mat.T if rows <= cols else mat.T @ mat
    lam, vec = jnp.linalg.eigh(gram)
    lam = jnp.clip(lam, 0.0)
    s1 = jnp.sqrt(lam[-1])
    s2 = jnp.sqrt(lam[-2]) if lam.shape[0] > 1 else jnp.zeros_like(s1)
    w = jnp.abs(vec[:, -1])  # Perron-Frobenius: non-negative up to sign
    safe = jnp.where(s1 > 0, s1, 1.0)
    if rows <= cols:
        u, v = w, mat.T @ w / safe
    else:
        v, u = w, mat @ w / safe
    return s1, jnp.abs(u), jnp.abs(v), s2 / safe


def _svd_fit(d_t, masks, refine, hopm_iters=50):
    """Sequential rank-one fit (and the smallest gap ratio s₂/s₁ met on the way)."""
    shape = d_t.shape
    gammas, ratio = [], jnp.zeros((), d_t.dtype)
    rest = d_t
    for i in range(len(shape) - 1):
        s1, u, v, r = _leading_pair(rest.reshape(shape[i], -1))
        gammas.append(u)
        rest = (s1 * v).reshape(shape[i + 1 :])
        ratio = jnp.maximum(ratio, r)
    gammas.append(rest.reshape(-1))
    if refine == "hopm":  # higher-order power method: best rank-one CP fit, monotone residual
        for _ in range(hopm_iters):
            for i in range(len(shape)):
                others = [g if o != i else jnp.ones_like(g) for o, g in enumerate(gammas)]
                norm2 = math.prod([jnp.sum(g**2) for o, g in enumerate(gammas) if o != i])
                gammas[i] = _mode_sum(d_t * _outer(others), i) / jnp.where(norm2 > 0, norm2, 1.0)
    gammas = [jnp.where(m, jnp.abs(g), 0.0) for g, m in zip(gammas, masks, strict=True)]
    return _normalise(gammas), ratio


@_x64
def svd_mstep(d, shape, masks=None, refine: str = "none"):
    """SVD M-step (SVD-KroSBL): the rank-one Kronecker fit of d in the Frobenius norm.

    ``I = 2``: the leading singular triple ``(s, u, v)`` of ``d`` reshaped ``[n_1, n_2]``
    gives ``γ_1 = |u|``, ``γ_2 = s|v|`` (Eckart-Young; d ≥ 0, so the leading singular
    vectors are non-negative up to sign). ``I ≥ 3``: the sequential (tensor-train style)
    fit of the reference code -- unfold ``n_1 × (n_2⋯n_I)``, keep ``|u|``, recurse on
    ``s|v|``. ``refine="hopm"`` then runs the higher-order power method (best rank-one CP
    fit; never increases the residual). ``I = 1``: ``γ = d``.

    The leading pair comes from the eigendecomposition of the smaller Gram matrix of the
    unfolding (exact, ``O(n_i N)``). Output normalised like :func:`am_mstep`. Unlike AM it
    does not minimise Q.

    :param d: ``Σ_jj + |μ_j|²``, flat ``[N]`` or ``[n_1, …, n_I]``.
    :param shape: ``(n_1, …, n_I)``.
    :param masks: ``None`` or per-mode bool ``[n_i]``.
    :param refine: ``"none"`` or ``"hopm"``.
    :return: the list of factors ``γ_i [n_i]``.

    Example::

        >>> import numpy as np
        >>> d = np.outer([1.0, 2.0], [3.0, 1.0, 1.0]).ravel()
        >>> g = svd_mstep(d, (2, 3))
        >>> bool(np.allclose(np.kron(*g), d))
        True
    """
    if refine not in ("none", "hopm"):
        raise ValueError(f"refine must be 'none' or 'hopm', got {refine!r}")
    shape = tuple(int(n) for n in shape)
    d_t = jnp.reshape(jnp.asarray(d), shape)
    if not jnp.issubdtype(d_t.dtype, jnp.floating):
        d_t = d_t.astype(float)
    masks = (
        [jnp.ones(n, bool) for n in shape]
        if masks is None
        else [jnp.asarray(m, bool) for m in masks]
    )
    return _svd_fit(d_t, masks, refine)[0]


# ------------------------------------------------------------------------------ state


class SBLState(NamedTuple):
    """The EM state (a pytree).

    :param gammas: tuple of factors ``γ_i [n_i]`` (classic SBL: one factor ``[N]``).
    :param masks: tuple of bool ``[n_i]`` (``False``: pruned).
    :param noise_var: σ² (scalar).
    :param mu: posterior mean of the last E-step, ``[N]`` (or ``[T, N]``).
    :param var: posterior variances of the last E-step, ``[N]``.
    :param cost: SBL cost L at the last E-step's γ.
    :param rel_change: ``‖Δγ‖/‖γ‖`` of the last M-step (flat, zero-padded γ).
    :param it: iterations done.
    :param offset_mean: posterior mean of the additive offset b (0 without one).
    :param offset_var: posterior variance of b (0 without one).
    """

    gammas: tuple
    masks: tuple
    noise_var: Any
    mu: Any
    var: Any
    cost: Any
    rel_change: Any
    it: Any
    offset_mean: Any = 0.0
    offset_var: Any = 0.0


def _num_snapshots(op, y):
    return math.prod(jnp.shape(y)[:-1])


@_x64
def init(op, y, *, noise_var=None, gamma0: float = 1.0, shape=None) -> SBLState:
    """The initial :class:`SBLState`: ``γ = gamma0`` everywhere (as factors: unit-norm
    constants for ``i < I``, the scale in ``γ_I``), nothing pruned, and σ² = ``noise_var``
    or ``0.1·var(y)`` when it is to be learned.

    :param op: the dictionary (:class:`~ppl.transforms.kronecker.KronOperator` or factors).
    :param y: observations ``[M]`` or ``[T, M]``.
    :param shape: the factor shapes; default ``op.in_shape`` (classic SBL passes ``(N,)``).

    Example::

        >>> import numpy as np
        >>> s = init([np.eye(3), np.eye(2)], np.ones(6), noise_var=0.1)
        >>> [g.shape for g in s.gammas], float(s.noise_var)
        ([(3,), (2,)], 0.1)
    """
    op = op if isinstance(op, KronOperator) else KronOperator(op)
    if _concrete(y, noise_var, gamma0):
        _validate_y(op, y)
        _validate_scalar(noise_var, "noise_var")
        _validate_scalar(gamma0, "gamma0", allow_none=False)
    y = jnp.asarray(y)
    shape = op.in_shape if shape is None else tuple(shape)
    rdtype = jnp.finfo(jnp.result_type(y, *op.factors)).dtype
    gammas = [jnp.full(n, 1.0, rdtype) for n in shape]
    gammas = _normalise(gammas)
    gammas[-1] = gammas[-1] * gamma0
    if noise_var is None:
        noise_var = 0.1 * jnp.var(y)
    n = math.prod(shape)
    mu = jnp.zeros(y.shape[:-1] + (n,), jnp.result_type(y, *op.factors))
    return SBLState(
        gammas=tuple(gammas),
        masks=tuple(jnp.ones(k, bool) for k in shape),
        noise_var=jnp.asarray(noise_var, rdtype),
        mu=mu,
        var=jnp.zeros(n, rdtype),
        cost=jnp.asarray(jnp.inf, rdtype),
        rel_change=jnp.asarray(jnp.inf, rdtype),
        it=jnp.asarray(0),
        offset_mean=jnp.zeros((), rdtype),
        offset_var=jnp.zeros((), rdtype),
    )


def _prune(gammas, masks, ratio, abs_floor):
    new_masks = []
    for g, m in zip(gammas, masks, strict=True):
        keep = m & (g >= ratio * jnp.max(g)) & (g >= abs_floor) & (g > 0)
        new_masks.append(keep)
    return [jnp.where(m, g, 0.0) for g, m in zip(gammas, new_masks, strict=True)], new_masks


def _learn_noise(op, y, mu, var, gammas_flat, noise_var, extra_dof=0.0):
    """σ² ← (‖y − Φμ‖² + σ²_old Σ_j (1 − Σ_jj/γ_j)) / M (per snapshot), floored.

    ``extra_dof``: the term ``1 − Var b / s0²`` of an additive offset (``y`` is then
    ``y − E[b]``), the same identity for the augmented dictionary ``[Φ, 1]``."""
    m = op.shape[0]
    t = _num_snapshots(op, y)
    resid = jnp.sum(jnp.abs(y - op.matvec(mu)) ** 2)
    active = gammas_flat > 0
    dof = jnp.sum(jnp.where(active, 1.0 - var / jnp.where(active, gammas_flat, 1.0), 0.0))
    dof = dof + extra_dof
    new = (resid + t * noise_var * dof) / (m * t)
    floor = 1e-12 * jnp.sum(jnp.abs(y) ** 2) / (m * t)
    return jnp.maximum(new, floor)


def _posterior(op, gammas, noise_var, y, form, offset_prior):
    """The E-step, with the additive offset ``b ~ N(m0, s0²)`` integrated out exactly.

    Without an offset: :func:`~ppl.transforms.kronecker.kron_posterior` and ``b = 0``. With
    one, ``C = C0 + s0² 11ᵀ`` (``C0 = ΦΓΦᵀ + σ²I``) is a rank-one update, so one Kronecker
    E-step on the two right-hand sides ``r = y − m0`` and ``1`` gives everything (Woodbury;
    ``C0⁻¹v = (v − Φ μ_v)/σ²`` with ``μ_v = ΓΦᵀC0⁻¹v``): with ``c1 = 1ᵀC0⁻¹1``, ``cr =
    1ᵀC0⁻¹r``, ``κ = s0²/(1 + s0² c1)`` and ``g = μ_1``, the joint posterior of (x, b) has
    ``E[b] = m0 + κ cr``, ``Var b = κ``, ``E[x] = μ_r − κ cr g``, ``diag Σ_x = diag Σ0 + κ g²``
    and the cost ``L = log|C| + rᵀC⁻¹r = L0 + log(1 + s0² c1) − κ cr²``.

    :return: ``(mu, var, cost, offset_mean, offset_var)``.
    """
    if offset_prior is None:
        mu, var, cost = kron_posterior(op, gammas, noise_var, y, form=form)
        zero = jnp.zeros((), var.dtype)
        return mu, var, cost, zero, zero
    m0, s0 = offset_prior
    s2 = s0**2
    r = y - m0
    mus, var, cost2 = kron_posterior(op, gammas, noise_var, jnp.stack([r, jnp.ones_like(r)]), form)
    mu_r, g = mus[0], mus[1]
    m = y.shape[-1]
    c1 = (m - jnp.sum(op.matvec(g))) / noise_var
    cr = (jnp.sum(r) - jnp.sum(op.matvec(mu_r))) / noise_var
    qr = (jnp.sum(r * r) - r @ op.matvec(mu_r)) / noise_var
    logdet0 = 0.5 * (cost2 - qr - c1)
    kappa = s2 / (1.0 + s2 * c1)
    cost = logdet0 + jnp.log1p(s2 * c1) + qr - kappa * cr**2
    return mu_r - kappa * cr * g, var + kappa * g**2, cost, m0 + kappa * cr, kappa


def _step(
    state: SBLState,
    op: KronOperator,
    y,
    mstep: str,
    learn_noise: bool,
    prune_ratio: float,
    prune_abs: float,
    sweeps,
    coupling,
    form: str,
    refine: str,
    offset_prior=None,
) -> SBLState:
    gammas, masks = _prune(list(state.gammas), list(state.masks), prune_ratio, prune_abs)
    mu, var, cost, b_mean, b_var = _posterior(op, gammas, state.noise_var, y, form, offset_prior)
    d = var + jnp.mean(jnp.abs(mu.reshape(-1, var.shape[0])) ** 2, axis=0)
    shape = tuple(g.shape[0] for g in gammas)
    if mstep == "classic" or len(gammas) == 1:
        new = [jnp.where(masks[0], d, 0.0)] if len(gammas) == 1 else None
        if new is None:
            raise ValueError("classic M-step needs one flat γ factor")
    elif mstep == "am":
        new = am_mstep(d, gammas, masks, sweeps=sweeps, coupling=coupling)
    else:
        d_t = d.reshape(shape)
        new, ratio = _svd_fit(d_t, masks, refine)
        # defect 7 of the reference: σ₁ ≈ σ₂ makes the rank-one fit ill-defined -> AM sweep
        am = _am_sweep(d_t, gammas, masks, {})
        bad = ratio > 1.0 - 1e-6
        new = [jnp.where(bad, a, s) for a, s in zip(am, new, strict=True)]
    gamma_old = kron_vector(gammas)
    noise_var = state.noise_var
    if learn_noise and offset_prior is None:
        noise_var = _learn_noise(op, y, mu, var, gamma_old, state.noise_var)
    elif learn_noise:  # the offset is one more coefficient (column 1, prior variance s0²)
        s2 = offset_prior[1] ** 2
        noise_var = _learn_noise(
            op, y - b_mean, mu, var, gamma_old, state.noise_var, extra_dof=1.0 - b_var / s2
        )
    gamma_new = kron_vector(new)
    rel = jnp.linalg.norm(gamma_new - gamma_old) / jnp.maximum(jnp.linalg.norm(gamma_new), 1e-300)
    return SBLState(
        gammas=tuple(new),
        masks=tuple(masks),
        noise_var=noise_var,
        mu=mu,
        var=var,
        cost=cost,
        rel_change=rel,
        it=state.it + 1,
        offset_mean=b_mean,
        offset_var=b_var,
    )


@_x64
def step(
    state: SBLState,
    op,
    y,
    *,
    mstep: str = "am",
    learn_noise: bool = False,
    prune_ratio: float = 1e-6,
    prune_abs: float = 0.0,
    sweeps: int | None = 1,
    coupling=None,
    form: str = "measurement",
    refine: str = "none",
    offset_prior=None,
) -> SBLState:
    """One EM iteration: prune → E-step (μ, diag Σ, L at the current γ) → M-step →
    noise update (if ``learn_noise``).

    Pruning: entries with ``γ_i[k] < prune_ratio·max γ_i`` or ``< prune_abs`` are masked
    (γ = 0 from then on, so x = 0 there; masked entries leave the AM counts and norms).

    :param state: the current :class:`SBLState`.
    :param op: the dictionary; for ``mstep="classic"`` the state has one flat factor.
    :param y: observations ``[M]`` or ``[T, M]``.
    :param mstep: ``"am"``, ``"svd"`` or ``"classic"``.
    :param offset_prior: ``(m0, s0)``: an additive offset ``b ~ N(m0, s0²)`` on every entry of
        a real ``y [M]``, integrated out exactly in the E-step (see :func:`run`).
    :return: the new state; its ``mu``, ``var``, ``cost`` are the E-step's (at the old γ).

    Example::

        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> fs, y = [rng.normal(size=(4, 6)), rng.normal(size=(4, 6))], rng.normal(size=16)
        >>> s1 = step(init(fs, y, noise_var=0.1), fs, y, mstep="am")
        >>> s2 = step(s1, fs, y, mstep="am")
        >>> bool(s2.cost <= s1.cost)
        True
    """
    op = op if isinstance(op, KronOperator) else KronOperator(op)
    _check_mstep(mstep)
    coupling = _check_coupling(coupling, len(state.gammas))
    return _step(
        state,
        op,
        y,
        mstep,
        learn_noise,
        prune_ratio,
        prune_abs,
        sweeps,
        coupling,
        form,
        refine,
        offset_prior,
    )


def _check_mstep(mstep):
    if mstep not in M_STEPS:
        raise ValueError(f"m_step must be one of {', '.join(M_STEPS)}, got {mstep!r}")


# ------------------------------------------------------------------------------ run


@dataclass
class SBLResult:
    """The result of :func:`run` / :func:`fit` (NumPy arrays).

    :param mean: x̂ = μ, ``[N]`` (or ``[T, N]``), C order.
    :param var_diag: ``diag Σ`` ``[N]``.
    :param gammas: list of factors ``γ_i [n_i]`` (classic: one ``[N]``); pruned entries 0.
    :param noise_var: σ² (the given one, or the learned one).
    :param support: bool ``[N]``: entries not pruned whose ``|x̂_j|`` exceeds
        ``1e-3·max|x̂|`` (spec §1.9).
    :param history: the SBL cost L at each iteration's E-step, ``[n_iter]``.
    :param rel_change: ``‖Δγ‖/‖γ‖`` per iteration, ``[n_iter]``.
    :param n_active: number of unpruned entries of γ per iteration, ``[n_iter]``.
    :param converged: whether ``rel_change < tol`` before ``max_iter``.
    :param n_iter: iterations done.
    :param cost: L at the final γ (from the final E-step).
    :param m_step: the M-step used.
    :param y: the observations (for ``observed_data``).
    :param shape: ``(n_1, …, n_I)`` of x.
    :param offset_mean, offset_var: posterior mean and variance of the additive offset
        (``None`` without one); ``offset_name``: its site name (``to_inference_data``).
    """

    mean: np.ndarray
    var_diag: np.ndarray
    gammas: list
    noise_var: float
    support: np.ndarray
    history: np.ndarray
    rel_change: np.ndarray
    n_active: np.ndarray
    converged: bool
    n_iter: int
    cost: float
    m_step: str
    y: np.ndarray | None = None
    shape: tuple = ()
    masks: list = field(default_factory=list)
    offset_mean: float | None = None
    offset_var: float | None = None
    offset_name: str = "b"

    @property
    def is_complex(self) -> bool:
        return bool(np.iscomplexobj(self.mean))

    def to_inference_data(self, *, key=None, num_samples: int = 0, **unused):
        """This result as ``arviz.InferenceData`` (see :func:`_to_inference_data`)."""
        return _to_inference_data(self, key=key, num_samples=num_samples)


def _resolve(mstep, preset, prune_ratio, sweeps):
    if preset not in (None, "paper"):
        raise ValueError(f"preset must be None or 'paper', got {preset!r}")
    if prune_ratio is None:
        prune_ratio = PAPER_PRUNE[mstep] if preset == "paper" else 1e-6
    if preset == "paper" and mstep == "am":
        sweeps = None  # sweep to convergence (relative 1e-6, at most 50 sweeps)
    return prune_ratio, sweeps


@functools.partial(
    jax.jit,
    static_argnames=(
        "mstep",
        "learn_noise",
        "max_iter",
        "sweeps",
        "coupling",
        "form",
        "refine",
        "shape",
    ),
)
def _run_loop(
    op,
    y,
    noise_var,
    tol,
    prune_ratio,
    prune_abs,
    gamma0,
    offset_prior,
    *,
    mstep,
    learn_noise,
    max_iter,
    sweeps,
    coupling,
    form,
    refine,
    shape,
):
    state = init(op, y, noise_var=noise_var, gamma0=gamma0, shape=shape)
    coupling = dict(coupling)
    rdtype = state.var.dtype
    hist = jnp.full((3, max_iter), jnp.nan, rdtype)

    def cond(carry):
        s, _ = carry
        return (s.it < max_iter) & ~(s.rel_change < tol)

    def body(carry):
        s, h = carry
        new = _step(
            s,
            op,
            y,
            mstep,
            learn_noise,
            prune_ratio,
            prune_abs,
            sweeps,
            coupling,
            form,
            refine,
            offset_prior,
        )
        active = math.prod(jnp.sum(m) for m in new.masks)
        col = jnp.stack([new.cost, new.rel_change, active.astype(rdtype)])
        h = lax.dynamic_update_slice(h, col[:, None], (0, s.it))
        return new, h

    state, hist = lax.while_loop(cond, body, (state, hist))
    gammas, masks = _prune(list(state.gammas), list(state.masks), prune_ratio, prune_abs)
    mu, var, cost, b_mean, b_var = _posterior(op, gammas, state.noise_var, y, form, offset_prior)
    state = state._replace(
        gammas=tuple(gammas),
        masks=tuple(masks),
        mu=mu,
        var=var,
        cost=cost,
        offset_mean=b_mean,
        offset_var=b_var,
    )
    return state, hist


def _validate_y(op, y, is_complex=None):
    y = np.asarray(y) if not isinstance(y, jax.Array) else y
    m = op.shape[0]
    if y.ndim not in (1, 2) or y.shape[-1] != m:
        raise ValueError(
            f"y must have shape [M] or [T, M] with M = Π m_i = {m} (factor rows "
            f"{op.out_shape}), got {tuple(y.shape)}"
        )
    if jnp.iscomplexobj(y) and not op.is_complex and is_complex is not True:
        raise TypeError(
            "y is complex but the factors are real; pass is_complex=True if x is complex"
        )
    if not np.all(np.isfinite(np.asarray(y))):
        raise ValueError("y contains NaN or inf values; clean the data first")
    return y


def _validate_factors(factors):
    op = factors if isinstance(factors, KronOperator) else KronOperator(factors)
    for i, a in enumerate(op.factors):
        if not np.all(np.isfinite(np.asarray(a))):
            raise ValueError(f"factors[{i}] contains NaN or inf values")
    return op


def _validate_scalar(value, name, allow_none=True):
    if value is None and allow_none:
        return None
    v = float(value)
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return v


def run(
    op,
    y,
    *,
    mstep: str = "am",
    max_iter: int = 150,
    tol: float = 1e-4,
    preset: str | None = None,
    noise_var=None,
    learn_noise: bool | None = None,
    prune_ratio: float | None = None,
    prune_abs: float = 0.0,
    sweeps: int | None = 1,
    coupling=None,
    gamma0: float = 1.0,
    form: str = "measurement",
    refine: str = "none",
    is_complex: bool | None = None,
    dtype=None,
    offset_prior=None,
) -> SBLResult:
    """EM to convergence on a Kronecker dictionary (a jitted ``lax.while_loop``).

    Stops when ``‖Δγ‖/‖γ‖ < tol`` (flat, zero-padded γ) or after ``max_iter`` iterations,
    then runs a final E-step. Computes in float64 (complex128) unless ``dtype`` says
    otherwise, enabling JAX's x64 mode locally.

    :param op: :class:`~ppl.transforms.kronecker.KronOperator` (``mstep="classic"``: the
        hyperparameter is one unstructured γ ``[N]``; the E-step then uses the dense
        ``M×N`` dictionary, as classic SBL must).
    :param y: ``[M]`` or ``[T, M]`` (snapshots sharing γ).
    :param mstep: ``"am"`` (default), ``"svd"`` or ``"classic"``.
    :param preset: ``None`` or ``"paper"`` (the reference code's pruning ratios: 1e-2 AM,
        1e-3 SVD/classic; AM sweeps to convergence).
    :param noise_var: σ² if known; ``None`` learns it (spec §1.5) from ``0.1·var(y)``.
    :param learn_noise: learn σ² even when ``noise_var`` is given (as a starting value).
    :param prune_ratio: relative pruning threshold per mode (default 1e-6; the paper's 1e-2
        deletes true small entries).
    :param prune_abs: absolute pruning threshold.
    :param sweeps: AM sweeps per M-step (``None``: to convergence, at most 50).
    :param coupling: ``{mode: beta}`` pattern coupling of block-sparse modes (AM only).
    :param form: E-step route, ``"measurement"`` or ``"parameter"``.
    :param refine: SVD M-step refinement, ``"none"`` or ``"hopm"``.
    :param offset_prior: ``(m0, s0)`` for ``y = Φx + b·1 + n`` with one unknown offset
        ``b ~ N(m0, s0²)`` shared by every entry of a real ``y [M]``: b is integrated out
        exactly (a rank-one update of the marginal covariance, so the E-step stays
        Kronecker-structured), the result's ``offset_mean``/``offset_var`` are its posterior,
        and the σ² update counts it as one more coefficient. ``None`` (default): no offset.
    :return: :class:`SBLResult`.

    Example::

        >>> import numpy as np
        >>> from ppl.transforms.kronecker import KronOperator
        >>> rng = np.random.default_rng(1)
        >>> op = KronOperator([rng.normal(size=(6, 10)), rng.normal(size=(6, 10))])
        >>> x = np.zeros(100); x[[11, 14]] = [1.0, -2.0]
        >>> res = run(op, op.matvec(x), noise_var=1e-8, mstep="svd")
        >>> np.flatnonzero(res.support).tolist()
        [11, 14]
    """
    _check_mstep(mstep)
    op = _validate_factors(op)
    y = _validate_y(op, y, is_complex)
    noise_var = _validate_scalar(noise_var, "noise_var")
    _validate_scalar(tol, "tol")
    _validate_scalar(gamma0, "gamma0")
    if int(max_iter) < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")
    if prune_ratio is not None and not 0.0 <= float(prune_ratio) < 1.0:
        raise ValueError(f"prune_ratio must be in [0, 1), got {prune_ratio}")
    if float(prune_abs) < 0:
        raise ValueError(f"prune_abs must be >= 0, got {prune_abs}")
    if form not in ("measurement", "parameter"):
        raise ValueError(f"form must be 'measurement' or 'parameter', got {form!r}")
    if refine not in ("none", "hopm"):
        raise ValueError(f"refine must be 'none' or 'hopm', got {refine!r}")
    coupling = _check_coupling(coupling, op.num_modes)
    if coupling and mstep != "am":
        raise ValueError(f"coupling (block sparsity) needs m_step='am', got {mstep!r}")
    if sweeps is not None and int(sweeps) < 1:
        raise ValueError(f"sweeps must be >= 1 or None, got {sweeps}")
    prune_ratio, sweeps = _resolve(mstep, preset, prune_ratio, sweeps)
    learn = noise_var is None if learn_noise is None else bool(learn_noise)
    offset_prior = _check_offset_prior(offset_prior, op, y)
    shape = (op.shape[1],) if mstep == "classic" else op.in_shape
    with jax.enable_x64(True):
        cplx = op.is_complex or jnp.iscomplexobj(y)
        dtype = jnp.dtype(dtype or (jnp.complex128 if cplx else jnp.float64))
        rdtype = jnp.finfo(dtype).dtype
        if mstep == "classic" and op.num_modes > 1:
            m, n = op.shape
            if m * n > CLASSIC_DENSE_LIMIT:
                raise ValueError(
                    f"classic SBL needs the dense {m}×{n} dictionary ({m * n:.3g} entries > "
                    f"{CLASSIC_DENSE_LIMIT:.0e}); use m_step='am' or 'svd'"
                )
        run_op = KronOperator([jnp.asarray(a, dtype) for a in op.factors])
        if mstep == "classic" and op.num_modes > 1:
            run_op = KronOperator([run_op.to_dense(force=True)])
        y_j = jnp.asarray(y, dtype)
        nv = jnp.asarray(0.1 * np.var(np.asarray(y)) if noise_var is None else noise_var, rdtype)
        state, hist = _run_loop(
            run_op,
            y_j,
            nv,
            jnp.asarray(tol, rdtype),
            jnp.asarray(prune_ratio, rdtype),
            jnp.asarray(prune_abs, rdtype),
            jnp.asarray(gamma0, rdtype),
            None if offset_prior is None else tuple(jnp.asarray(v, rdtype) for v in offset_prior),
            mstep=mstep,
            learn_noise=learn,
            max_iter=int(max_iter),
            sweeps=None if sweeps is None else int(sweeps),
            coupling=tuple(sorted(coupling.items())),
            form=form,
            refine=refine,
            shape=shape,
        )
        state, hist = jax.device_get((state, hist))
    n_iter = int(state.it)
    mean = np.asarray(state.mu)
    gammas = [np.asarray(g) for g in state.gammas]
    flat_gamma = np.asarray(functools.reduce(np.kron, gammas))
    amp = np.abs(mean).reshape(-1, flat_gamma.shape[0]).max(axis=0)
    support = (flat_gamma > 0) & (amp > 1e-3 * max(float(amp.max()), 1e-300))
    return SBLResult(
        mean=mean,
        var_diag=np.asarray(state.var),
        gammas=gammas,
        noise_var=float(state.noise_var),
        support=support,
        history=np.asarray(hist[0, :n_iter]),
        rel_change=np.asarray(hist[1, :n_iter]),
        n_active=np.asarray(hist[2, :n_iter]).astype(int),
        converged=bool(state.rel_change < tol),
        n_iter=n_iter,
        cost=float(state.cost),
        m_step=mstep,
        y=np.asarray(y),
        shape=tuple(op.in_shape),
        masks=[np.asarray(m) for m in state.masks],
        offset_mean=None if offset_prior is None else float(state.offset_mean),
        offset_var=None if offset_prior is None else float(state.offset_var),
    )


def _check_offset_prior(offset_prior, op, y):
    """``(m0, s0)`` as floats (finite, ``s0 > 0``) for a real ``y [M]``, or ``None``."""
    if offset_prior is None:
        return None
    try:
        m0, s0 = (float(v) for v in offset_prior)
    except (TypeError, ValueError):
        raise TypeError(
            f"offset_prior must be a pair (loc, scale) of numbers, got {offset_prior!r}"
        ) from None
    if not (math.isfinite(m0) and math.isfinite(s0) and s0 > 0):
        raise ValueError(f"offset_prior must be (finite loc, finite scale > 0), got {offset_prior}")
    if np.ndim(y) != 1 or op.is_complex or np.iscomplexobj(y):
        raise ValueError(
            "offset_prior needs real observations y [M] (one snapshot, real dictionary); "
            "for snapshots or complex data use NUTS or SVI on the model"
        )
    return m0, s0


def _block_coupling(block_sizes, num_modes, beta=0.8):
    if block_sizes is None:
        return None
    sizes = [block_sizes] * num_modes if np.ndim(block_sizes) == 0 else list(block_sizes)
    if len(sizes) != num_modes:
        raise ValueError(f"block_sizes must give one size per mode ({num_modes}), got {len(sizes)}")
    out = {}
    for i, b in enumerate(sizes):
        if int(b) != b or int(b) < 1:
            raise ValueError(f"block_sizes[{i}] must be an integer >= 1, got {b}")
        if int(b) > 1:
            out[i] = (beta, max(1, int(b) // 2))
    return out


def fit(
    factors,
    y,
    *,
    m_step: str = "am",
    noise_var=None,
    max_iter: int = 150,
    tol: float = 1e-4,
    block_sizes=None,
    coupling=None,
    **options,
) -> SBLResult:
    """Fit (Kronecker) SBL to ``y`` by EM: the entry point.

    :param factors: the list of ``A_i [m_i, n_i]`` (real or complex), or a
        :class:`~ppl.transforms.kronecker.KronOperator`.
    :param y: observations ``[M]`` (``M = Π m_i``) or ``[T, M]`` snapshots sharing γ.
    :param m_step: ``"am"`` (AM-KroSBL), ``"svd"`` (SVD-KroSBL) or ``"classic"`` (EM-SBL
        with an unstructured γ, Wipf & Rao).
    :param noise_var: σ² if known, else ``None`` to learn it.
    :param max_iter, tol: stop when ``‖Δγ‖/‖γ‖ < tol`` or after ``max_iter`` iterations.
    :param block_sizes: block sparsity (AM only): one int per mode (or one for all); a mode
        with ``b > 1`` is pattern-coupled (PC-KroSBL, β = 0.8, band half-width ``b // 2``:
        3 gives the paper's tridiagonal coupling).
    :param coupling: ``{mode: beta}`` pattern coupling given directly.
    :param options: passed to :func:`run` (``preset``, ``prune_ratio``, ``prune_abs``,
        ``sweeps``, ``learn_noise``, ``form``, ``refine``, ``gamma0``, ``is_complex``).
    :return: :class:`SBLResult`.

    Example::

        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> fs = [rng.normal(size=(5, 8)), rng.normal(size=(5, 8))]
        >>> x = np.zeros(64); x[9] = 1.0
        >>> res = fit(fs, np.kron(*fs) @ x, noise_var=1e-6)
        >>> res.mean.shape, int(np.argmax(np.abs(res.mean)))
        ((64,), 9)
    """
    _check_mstep(m_step)
    op = _validate_factors(factors)
    if block_sizes is not None and coupling is not None:
        raise ValueError("give either block_sizes or coupling, not both")
    if block_sizes is not None:
        coupling = _block_coupling(block_sizes, op.num_modes)
    if coupling and m_step != "am":
        raise ValueError(f"block sparsity (block_sizes/coupling) needs m_step='am', got {m_step!r}")
    return run(
        op,
        y,
        mstep=m_step,
        noise_var=noise_var,
        max_iter=max_iter,
        tol=tol,
        coupling=coupling,
        **options,
    )


#: What EM cannot do, and what can (the error messages of :func:`fit_model` name it).
_OTHER_ROUTE = (
    "EM for (Kronecker) SBL handles y ~ Normal(Φx + b, σ²) with x ~ Normal(0, √γ), γ and σ² "
    "as param sites and an optional offset b ~ Normal(m0, s0); run ppl.inference.NUTS or "
    "ppl.inference.SVI on the model instead"
)


def _base_fn(fn):
    import numpyro.distributions as dist

    while isinstance(fn, (dist.ExpandedDistribution, dist.Independent)):
        fn = fn.base_dist
    return fn


def _read_sbl_model(tr, kwargs):
    """Classify the sites of an SBL model's trace (``y=None``) or raise ``ValueError``.

    :return: ``(op, lik_names, coef_names, offset)``: the dictionary, the likelihood and
        coefficient sites, and ``None`` or ``(name, m0, s0)`` of the additive offset.
    """
    import numpyro.distributions as dist

    from ppl.transforms.kronecker import KronSBLMarginal

    lik = [n for n, s in tr.items() if s["type"] == "sample" and "kron_operator" in s["infer"]]
    if lik:
        op = tr[lik[-1]]["infer"]["kron_operator"]
    elif "factors" in kwargs:
        op = KronOperator(kwargs["factors"])
        lik = [n for n in ("y", "y_re", "y_im") if n in tr and tr[n]["type"] == "sample"]
    else:
        raise ValueError(
            "fit_model: the model's trace records no KronOperator (infer={'kron_operator': op}) "
            "and no 'factors' keyword was given"
        )
    if not lik:
        raise ValueError(f"fit_model: the model has no observed site 'y'. {_OTHER_ROUTE}")
    for name in lik:
        fn = _base_fn(tr[name]["fn"])
        if type(fn) not in (dist.Normal, KronSBLMarginal):
            raise ValueError(
                f"site {name!r} has a {type(fn).__name__} likelihood; EM needs a Normal one. "
                + _OTHER_ROUTE
            )
    num_modes = op.num_modes
    hyper = {"gamma", "noise_var"} | {f"gamma_{i + 1}" for i in range(num_modes)}
    coef, offset, other = [], [], []
    for name, site in tr.items():
        if name in lik or site["type"] not in ("sample", "param"):
            continue
        if site["type"] == "param":
            if name not in hyper:
                other.append(name)
            continue
        fn = _base_fn(site["fn"])
        if site["is_observed"]:
            other.append(name)
        elif name in hyper:
            raise ValueError(
                f"site {name!r} is a sample site (a hyperprior); EM estimates γ and σ² as "
                f"parameters (type-II maximum likelihood): drop hyperprior. {_OTHER_ROUTE}"
            )
        elif name in ("x", "x_re", "x_im") and type(fn) is dist.Normal:
            coef.append(name)
        elif type(fn) is dist.Normal and jnp.shape(site["value"]) == ():
            offset.append(name)
        else:
            other.append(name)
    if other or len(offset) > 1:
        names = other + (offset if len(offset) > 1 else [])
        raise ValueError(f"model has sites EM cannot update: {names}. {_OTHER_ROUTE}")
    if offset:
        fn = _base_fn(tr[offset[0]]["fn"])
        offset = (offset[0], float(fn.loc), float(fn.scale))
    else:
        offset = None
    return op, lik, coef, offset


def _check_sbl_mean(model, tr, kwargs, op, lik, coef, offset):
    """Replay the model at a random x (and offset) and check that y's mean is ``Φx + b``,
    its variance σ² and x's prior variance the traced γ."""
    from numpyro import handlers

    rng = np.random.default_rng(0)
    n = op.shape[1]
    subs = {c: rng.normal(size=n) for c in coef}
    if offset is not None:
        subs[offset[0]] = np.asarray(0.7317)
    tr2 = handlers.trace(handlers.substitute(handlers.seed(model, 0), subs)).get_trace(
        y=None, **kwargs
    )
    x = subs["x"] if "x" in subs else subs["x_re"] + 1j * subs["x_im"]
    mean = np.asarray(op.matvec(jnp.asarray(x)))
    if offset is not None:
        mean = mean + 0.7317
    want = {"y": mean} if "x" in subs else {"y_re": mean.real, "y_im": mean.imag}
    noise_var = kwargs.get("noise_var")
    if noise_var is None and "noise_var" in tr2:
        noise_var = tr2["noise_var"]["value"]
    half = 1.0 if "x" in subs else 0.5
    gamma = None
    for name in ("gamma_coupled", "gamma"):
        if name in tr2:
            gamma = np.asarray(tr2[name]["value"])
            break
    for name, m in want.items():
        fn = _base_fn(tr2[name]["fn"])
        loc = np.broadcast_to(np.asarray(fn.loc), m.shape)
        if not np.allclose(loc, m, rtol=1e-6, atol=1e-8 * (1 + np.abs(m).max())):
            raise ValueError(
                f"the mean of site {name!r} is not Φx{' + ' + offset[0] if offset else ''} "
                f"(the dictionary times the coefficients{', plus the offset' if offset else ''}). "
                + _OTHER_ROUTE
            )
        if noise_var is not None and not np.allclose(
            np.asarray(fn.scale) ** 2, half * np.asarray(noise_var), rtol=1e-6
        ):
            raise ValueError(f"the variance of site {name!r} is not σ² (noise_var). {_OTHER_ROUTE}")
    for name in coef:
        fn = _base_fn(tr2[name]["fn"])
        ok = np.allclose(np.asarray(fn.loc), 0.0)
        if gamma is not None:
            ok = ok and np.allclose(np.asarray(fn.scale) ** 2, half * gamma, rtol=1e-6)
        if not ok:
            raise ValueError(f"site {name!r} must have the prior Normal(0, √γ). {_OTHER_ROUTE}")


def fit_model(model, y, *, model_kwargs: Mapping | None = None, **options) -> SBLResult:
    """:func:`fit` on a NumPyro SBL model: the dictionary and the structure come from its trace.

    The model must record its dictionary as a ``KronOperator`` in the ``infer`` dict of its
    observed site (``infer={"kron_operator": op}``), or take it as keyword ``factors`` (as
    :func:`ppl.models.krosbl.krosbl_model` does). The trace is checked before any work; EM
    handles

    * ``y ~ Normal(Φx, σ)`` (or ``KronSBLMarginal``; complex: ``y_re``, ``y_im``) with
      ``x ~ Normal(0, √γ)`` and the hyperparameters ``gamma``/``gamma_i`` as ``param`` sites;
    * σ²: the model's ``noise_var`` keyword if given (known), else learned by the EM update;
    * an additive offset: one scalar latent ``b ~ Normal(m0, s0)`` added to every entry of
      the mean, integrated out exactly (``offset_prior`` of :func:`run`); its posterior is
      the result's ``offset_mean``/``offset_var`` (``offset_name``: the site);
    * pattern coupling given as the model's ``coupling`` keyword (passed on to :func:`fit`).

    Any other site (another likelihood, a hyperprior, other latent or param sites, a mean
    that is not ``Φx (+ b)``) is a ``ValueError`` naming it: use ``ppl.inference.NUTS`` or
    ``ppl.inference.SVI`` on the model.

    :param model: a NumPyro model such as :func:`ppl.models.krosbl.krosbl_model`.
    :param y: observations ``[M]``.
    :param model_kwargs: keyword arguments of the model (``factors``, ``noise_var``, ...).
    :param options: passed to :func:`fit` (``m_step``, ``max_iter``, ...).

    Example::

        >>> import numpy as np
        >>> from ppl.models.krosbl import krosbl_model
        >>> rng = np.random.default_rng(0)
        >>> fs = [rng.normal(size=(5, 8)), rng.normal(size=(5, 8))]
        >>> x = np.zeros(64); x[9] = 1.0
        >>> y = np.kron(*fs) @ x
        >>> res = fit_model(krosbl_model, y, model_kwargs={"factors": fs, "noise_var": 1e-6})
        >>> int(np.argmax(np.abs(res.mean)))
        9
    """
    from numpyro import handlers

    kwargs = dict(model_kwargs or {})
    with jax.enable_x64(True):
        tr = handlers.trace(handlers.seed(model, 0)).get_trace(y=None, **kwargs)
        op, lik, coef, offset = _read_sbl_model(tr, kwargs)
        if coef:
            _check_sbl_mean(model, tr, kwargs, op, lik, coef, offset)
        elif offset is not None:
            raise ValueError(
                f"site {offset[0]!r}: an offset needs the coefficient site 'x' "
                f"(marginal=False). {_OTHER_ROUTE}"
            )
    if "noise_var" in kwargs and "noise_var" not in options and kwargs["noise_var"] is not None:
        options["noise_var"] = kwargs["noise_var"]
    if kwargs.get("coupling") and "coupling" not in options and "block_sizes" not in options:
        options["coupling"] = kwargs["coupling"]
    if offset is not None:
        if "offset_prior" in options:
            raise ValueError(
                f"offset_prior is read from the model's site {offset[0]!r}; do not pass it too"
            )
        options["offset_prior"] = offset[1:]
    result = fit(op, y, **options)
    if offset is not None:
        result.offset_name = offset[0]
    return result


# ------------------------------------------------------------------------------ baselines


def _atom_norms(op):
    """Column norms of Φ, ``⊗_i ‖A_i[:, k]‖`` ``[N]`` (atoms are compared normalised)."""
    per_mode = [np.linalg.norm(np.asarray(a), axis=0) for a in op.factors]
    return np.maximum(functools.reduce(np.kron, per_mode), 1e-300)


def _greedy(op, y, noise_var, select, max_total):
    """Shared OMP loop: ``select(corr_abs_tensor, chosen) -> flat index``; least squares on
    the chosen atoms, stop at ‖r‖² ≤ Mσ² or ``max_total`` atoms."""
    m, n = op.shape
    y = np.asarray(y)
    cols = []
    chosen = []
    resid = y
    x = np.zeros(n, np.result_type(y, *op.factors))
    eye = np.eye(n)
    dense_cols = {}
    norms = _atom_norms(op)
    for _ in range(max_total):
        if np.sum(np.abs(resid) ** 2) <= m * noise_var:
            break
        corr = np.abs(np.asarray(op.rmatvec(resid))) / norms
        j = select(corr, chosen)
        if j is None or j in chosen:
            break
        chosen.append(j)
        if j not in dense_cols:
            dense_cols[j] = np.asarray(op.matvec(eye[j].astype(x.dtype)))
        cols.append(dense_cols[j])
        a = np.stack(cols, axis=1)
        coef, *_ = np.linalg.lstsq(a, y, rcond=None)
        resid = y - a @ coef
    if chosen:
        x[np.asarray(chosen)] = coef
    return x


@_x64
def omp(op, y, noise_var, max_atoms: int = 100):
    """Orthogonal matching pursuit on the full dictionary (baseline).

    Picks the atom most correlated with the residual (atoms normalised to unit norm), refits
    all chosen atoms by least squares, and stops when ``‖r‖² ≤ M σ²`` or after ``max_atoms`` atoms.

    :return: x̂ ``[N]``.

    Example::

        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> fs = [rng.normal(size=(10, 8)), rng.normal(size=(10, 8))]
        >>> x = np.zeros(64); x[[3, 40]] = [1.0, 2.0]
        >>> np.flatnonzero(omp(fs, np.kron(*fs) @ x, 1e-8)).tolist()
        [3, 40]
    """
    op = _validate_factors(op)
    y = _validate_y(op, y)
    noise_var = _validate_scalar(noise_var, "noise_var", allow_none=False)

    def select(corr, chosen):
        corr = corr.copy()
        corr[chosen] = -1.0
        return int(np.argmax(corr))

    return _greedy(op, y, noise_var, select, int(max_atoms))


@_x64
def komp(op, y, noise_var, caps=5):
    """Kronecker OMP (baseline): OMP whose support is a product of per-mode supports.

    Each step picks the most correlated atom among those that keep at most ``caps[i]``
    distinct indices in mode i, then adds the whole product set of the chosen per-mode
    indices; stops when ``‖r‖² ≤ M σ²`` or nothing can be added.

    :param caps: at most this many atoms per mode (an int for every mode, or one per mode).
    :return: x̂ ``[N]``.

    Example::

        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> fs = [rng.normal(size=(7, 8)), rng.normal(size=(7, 8))]
        >>> x = np.kron(np.eye(8)[1] + np.eye(8)[5], np.eye(8)[2])
        >>> np.flatnonzero(komp(fs, np.kron(*fs) @ x, 1e-8, caps=2)).tolist()
        [10, 42]
    """
    op = _validate_factors(op)
    y = _validate_y(op, y)
    noise_var = _validate_scalar(noise_var, "noise_var", allow_none=False)
    shape = op.in_shape
    caps = [int(caps)] * len(shape) if np.ndim(caps) == 0 else [int(c) for c in caps]
    if len(caps) != len(shape):
        raise ValueError(f"caps must give one cap per mode ({len(shape)}), got {len(caps)}")
    m, n = op.shape
    y = np.asarray(y)
    per_mode: list[list[int]] = [[] for _ in shape]
    norms = _atom_norms(op)
    x = np.zeros(n, np.result_type(y, *op.factors))
    resid = y
    while np.sum(np.abs(resid) ** 2) > m * noise_var:
        corr = (np.abs(np.asarray(op.rmatvec(resid))) / norms).reshape(shape)
        allowed = np.ones(shape, bool)
        for i, idx in enumerate(per_mode):
            if len(idx) >= caps[i]:
                ok = np.zeros(shape[i], bool)
                ok[idx] = True
                allowed &= ok.reshape([-1 if a == i else 1 for a in range(len(shape))])
        # atoms already in the product support cannot help
        inside = np.ones(shape, bool)
        for i, idx in enumerate(per_mode):
            ok = np.zeros(shape[i], bool)
            ok[idx] = True
            inside &= ok.reshape([-1 if a == i else 1 for a in range(len(shape))])
        allowed &= ~inside
        if not allowed.any():
            break
        j = np.unravel_index(int(np.argmax(np.where(allowed, corr, -1.0))), shape)
        for i, k in enumerate(j):
            if k not in per_mode[i]:
                per_mode[i].append(int(k))
        sub = [np.asarray(f)[:, sorted(idx)] for f, idx in zip(op.factors, per_mode, strict=True)]
        a = functools.reduce(np.kron, sub)
        coef, *_ = np.linalg.lstsq(a, y, rcond=None)
        resid = y - a @ coef
        x = np.zeros(n, x.dtype)
        flat = np.ravel_multi_index(
            np.meshgrid(*[sorted(idx) for idx in per_mode], indexing="ij"), shape
        ).reshape(-1)
        x[flat] = coef
    return x


# ------------------------------------------------------------------------------ ArviZ


def _to_inference_data(result: SBLResult, *, key=None, num_samples: int = 0):
    """``SBLResult`` → ``InferenceData``.

    * ``posterior`` (1 chain × 1 draw): ``x`` (complex: ``x_re``, ``x_im``) with dims
      ``x_dim_0..`` of ``shape``, ``gamma_1..gamma_I``, ``noise_var``;
    * ``sample_stats``: per-iteration ``cost``, ``rel_change``, ``n_active`` (dim ``iteration``);
    * ``observed_data``: ``y`` (complex: ``y_re``, ``y_im``);
    * ``posterior_predictive`` (when ``num_samples > 0``): draws of x from ``N(μ, diag Σ)``
      (dims ``chain``, ``draw``).
    """
    import arviz as az
    import xarray as xr

    import ppl

    post = {}
    x = np.asarray(result.mean)
    if np.iscomplexobj(x):
        post["x_re"], post["x_im"] = x.real, x.imag
    else:
        post["x"] = x
    for i, g in enumerate(result.gammas):
        post[f"gamma_{i + 1}"] = np.asarray(g)
    post["noise_var"] = np.asarray(result.noise_var)
    if result.offset_mean is not None:
        post[result.offset_name] = np.asarray(result.offset_mean)
    post_ds = xr.Dataset(
        {
            k: (("chain", "draw") + tuple(f"{k}_dim_{d}" for d in range(v.ndim)), v[None, None])
            for k, v in post.items()
        },
        coords={"chain": [0], "draw": [0]},
        attrs=az.data.base.make_attrs(
            {
                "inference": "em",
                "m_step": result.m_step,
                "converged": int(result.converged),
                "n_iter": result.n_iter,
                "final_cost": result.cost,
            },
            library=ppl,
        ),
    )
    it = np.arange(result.n_iter)
    stats = xr.Dataset(
        {
            "cost": ("iteration", np.asarray(result.history, np.float64)),
            "rel_change": ("iteration", np.asarray(result.rel_change, np.float64)),
            "n_active": ("iteration", np.asarray(result.n_active, np.int64)),
        },
        coords={"iteration": it},
    )
    groups = {"posterior": post_ds, "sample_stats": stats}
    if result.y is not None:
        y = np.asarray(result.y)
        obs = {"y_re": y.real, "y_im": y.imag} if np.iscomplexobj(y) else {"y": y}
        groups["observed_data"] = xr.Dataset(
            {k: (tuple(f"y_dim_{d}" for d in range(v.ndim)), v) for k, v in obs.items()}
        )
    if num_samples and num_samples > 0:
        rng = np.random.default_rng(
            0 if key is None else int(np.asarray(jax.random.key_data(key)).ravel()[-1])
        )
        sd = np.sqrt(np.asarray(result.var_diag))
        shape = (1, int(num_samples)) + x.shape
        if np.iscomplexobj(x):
            z = (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)) / np.sqrt(2)
            draws = x + sd * z
            pp = {"x_re": draws.real, "x_im": draws.imag}
        else:
            pp = {"x": x + sd * rng.standard_normal(shape)}
        groups["posterior_predictive"] = xr.Dataset(
            {
                k: (("chain", "draw") + tuple(f"{k}_dim_{d}" for d in range(v.ndim - 2)), v)
                for k, v in pp.items()
            }
        )
    return az.InferenceData(**groups)
