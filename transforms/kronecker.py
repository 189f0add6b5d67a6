"""Kronecker-structured dictionaries and priors (He & Joseph, KroSBL).

The measurement model of Kronecker sparse Bayesian learning is

    y = Φ x + n,    Φ = A_1 ⊗ … ⊗ A_I,   A_i ∈ 𝔽^{m_i×n_i},   n ~ N(0, σ² I_M),
    x ~ N(0, diag γ),   γ = γ_1 ⊗ … ⊗ γ_I,   γ_i ∈ ℝ₊^{n_i},

with ``M = Π m_i`` measurements and ``N = Π n_i`` unknowns (𝔽 = ℝ, or ℂ with circular
Gaussians). Vectors are flattened in **C order** (the last mode varies fastest, as
``numpy.kron``), so ``Φ x = vec(X ×_1 A_1 ⋯ ×_I A_I)`` for the tensor ``X`` of shape
``(n_1, …, n_I)``: nothing here forms the ``M×N`` matrix Φ, the ``N×N`` posterior covariance
or the ``M×M`` marginal covariance ``C = σ² I + Φ Γ Φᴴ``.

This module holds the structure; :mod:`ppl.inference.sbl` holds the EM algorithm.

* :class:`KronOperator`: Φ as a pytree of its factors, applied by mode products;
* :func:`kron_vector`: ``γ_1 ⊗ … ⊗ γ_I``;
* :func:`kron_posterior`: the exact Kronecker E-step ``(μ, diag Σ, L)`` (two routes);
* :func:`kronecker_prior`: the program transformation that turns a flat γ site of a model
  into Kronecker factors ``gamma_1 … gamma_I``;
* :class:`KronSBLMarginal`: the marginal of y as a NumPyro distribution.

The *SBL cost* is ``L(γ, σ²) = log|C| + yᴴ C⁻¹ y``; the negative log evidence is ``L/2 +
(M/2) log 2π`` for real data and ``L + M log π`` for complex data.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.distributions import constraints
from numpyro.primitives import Messenger

__all__ = [
    "KronOperator",
    "KronSBLMarginal",
    "kron_posterior",
    "kron_vector",
    "kronecker_prior",
    "mode_product",
]

#: Largest number of entries :meth:`KronOperator.to_dense` builds without ``force=True``.
DENSE_LIMIT = 20_000_000


def mode_product(t, a, mode: int):
    """The mode-``mode`` product ``t ×_mode a``.

    :param t: tensor ``[..., n_1, …, n_I]`` (``mode`` counts from the left of the modes, or
        is negative from the right; batch axes in front are kept).
    :param a: matrix ``[m, n_mode]``.
    :param mode: the axis of ``t`` contracted with ``a``'s columns.
    :return: ``[..., n_1, …, m, …, n_I]``.

    Example::

        >>> import jax.numpy as jnp
        >>> mode_product(jnp.ones((2, 3)), jnp.ones((4, 3)), 1).shape
        (2, 4)
    """
    out = jnp.tensordot(a, t, axes=((1,), (mode,)))
    return jnp.moveaxis(out, 0, mode)


def _mode_products(t, mats: Sequence, num_modes: int):
    """``t ×_1 mats[0] ⋯ ×_I mats[I-1]`` over the last ``num_modes`` axes of ``t``."""
    for i, a in enumerate(mats):
        t = mode_product(t, a, t.ndim - num_modes + i)
    return t


def _as_factor(a, i):
    if not hasattr(a, "shape") or not hasattr(a, "dtype"):
        a = np.asarray(a)
    if a.ndim != 2:
        raise ValueError(
            f"factors[{i}] must be a 2-D matrix [m_{i + 1}, n_{i + 1}], got shape {a.shape}"
        )
    if 0 in a.shape:
        raise ValueError(f"factors[{i}] must have non-zero sizes, got shape {a.shape}")
    return a


@jax.tree_util.register_pytree_node_class
class KronOperator:
    """The Kronecker product ``Φ = A_1 ⊗ … ⊗ A_I`` applied by mode products.

    A pytree whose leaves are the factors, so it passes through ``jit``/``vmap``. The
    factors are kept as given (NumPy or JAX, real or complex); nothing converts them to
    the default JAX dtype until they are used.

    :param factors: the matrices ``A_i``, each ``[m_i, n_i]``.

    Attributes: ``shape = (M, N)``, ``in_shape = (n_1, …, n_I)``, ``out_shape = (m_1, …,
    m_I)``, ``num_modes = I``, ``is_complex``.

    Cost of :meth:`matvec`: ``O(N Σ_i m_i)`` at most, memory ``O(N + M)``.

    Example::

        >>> import numpy as np
        >>> a1, a2 = np.arange(6.0).reshape(2, 3), np.eye(2)
        >>> op = KronOperator([a1, a2])
        >>> op.shape
        (4, 6)
        >>> x = np.arange(6.0)
        >>> bool(np.allclose(op.matvec(x), np.kron(a1, a2) @ x))
        True
    """

    def __init__(self, factors):
        if isinstance(factors, KronOperator):
            factors = factors.factors
        if hasattr(factors, "ndim") and getattr(factors, "ndim", 0) == 2:
            factors = [factors]
        factors = tuple(factors)
        if not factors:
            raise ValueError("factors must hold at least one matrix A_i [m_i, n_i]")
        self.factors = tuple(_as_factor(a, i) for i, a in enumerate(factors))

    def tree_flatten(self):
        return self.factors, None

    @classmethod
    def tree_unflatten(cls, aux, children):
        obj = object.__new__(cls)
        obj.factors = tuple(children)
        return obj

    @property
    def num_modes(self) -> int:
        return len(self.factors)

    @property
    def out_shape(self) -> tuple[int, ...]:
        return tuple(int(a.shape[0]) for a in self.factors)

    @property
    def in_shape(self) -> tuple[int, ...]:
        return tuple(int(a.shape[1]) for a in self.factors)

    @property
    def shape(self) -> tuple[int, int]:
        return math.prod(self.out_shape), math.prod(self.in_shape)

    @property
    def is_complex(self) -> bool:
        return any(jnp.iscomplexobj(a) for a in self.factors)

    def __repr__(self) -> str:
        dims = " ⊗ ".join(f"{m}×{n}" for m, n in zip(self.out_shape, self.in_shape, strict=True))
        return f"KronOperator({dims}{', complex' if self.is_complex else ''})"

    def _apply(self, v, mats, in_shape, out_len, what):
        v = jnp.asarray(v)
        size = math.prod(in_shape)
        if v.ndim == 0 or v.shape[-1] != size:
            raise ValueError(f"{what} expects an array [..., {size}], got shape {v.shape}")
        t = v.reshape(v.shape[:-1] + in_shape)
        t = _mode_products(t, mats, len(in_shape))
        return t.reshape(v.shape[:-1] + (out_len,))

    def matvec(self, x):
        """``Φ x`` for ``x [..., N]`` → ``[..., M]``."""
        return self._apply(x, self.factors, self.in_shape, self.shape[0], "matvec")

    def rmatvec(self, y):
        """``Φᴴ y`` for ``y [..., M]`` → ``[..., N]`` (conjugate transpose)."""
        mats = [jnp.conj(jnp.asarray(a)).T for a in self.factors]
        return self._apply(y, mats, self.out_shape, self.shape[1], "rmatvec")

    def to_dense(self, force: bool = False):
        """The matrix Φ ``[M, N]`` (tests and plots only).

        Raises ``ValueError`` above :data:`DENSE_LIMIT` entries unless ``force=True``.
        """
        m, n = self.shape
        if m * n > DENSE_LIMIT and not force:
            raise ValueError(
                f"to_dense() would build a {m}×{n} matrix ({m * n:.3g} entries > "
                f"{DENSE_LIMIT:.0e}); pass force=True if you really want it"
            )
        return functools.reduce(jnp.kron, [jnp.asarray(a) for a in self.factors])


def kron_vector(gammas):
    """``γ_1 ⊗ … ⊗ γ_I`` flattened in C order.

    :param gammas: sequence of vectors ``γ_i [n_i]``.
    :return: ``[N]``, ``N = Π n_i``.

    Example::

        >>> import jax.numpy as jnp
        >>> kron_vector([jnp.array([1.0, 2.0]), jnp.array([1.0, 10.0])])
        Array([ 1., 10.,  2., 20.], dtype=float32)
    """
    gammas = [jnp.asarray(g) for g in gammas]
    if not gammas:
        raise ValueError("gammas must hold at least one vector")
    for i, g in enumerate(gammas):
        if g.ndim != 1:
            raise ValueError(f"gammas[{i}] must be a vector [n_{i + 1}], got shape {g.shape}")
    return functools.reduce(lambda a, b: (a[:, None] * b[None, :]).reshape(-1), gammas)


def _real_dtype(x):
    return jnp.finfo(x.dtype).dtype


def kron_posterior(op: KronOperator, gammas, noise_var, y, form: str = "measurement"):
    """The exact E-step of SBL with a Kronecker dictionary and Kronecker γ.

    With ``Σ = (ΦᴴΦ/σ² + Γ⁻¹)⁻¹`` and ``μ = Σ Φᴴ y / σ²``, returns ``μ``, ``diag Σ`` and the
    SBL cost ``L = log|C| + yᴴ C⁻¹ y``, never forming Φ, Σ or C:

    * ``form="measurement"`` (default): eigendecompose ``K_i = A_i diag(γ_i) A_iᴴ = U_i Λ_i
      U_iᴴ`` (negative eigenvalues clipped to 0), so ``C = (⊗U_i) diag(D) (⊗U_i)ᴴ`` with
      ``D = σ² + λ_1 ⊗ … ⊗ λ_I``. Cost ``O(Σ m_i³ + N max m_i)``.
    * ``form="parameter"``: eigendecompose ``G_i = Γ_i^½ A_iᴴ A_i Γ_i^½ = Q_i L_i Q_iᴴ``, so
      ``Σ = (⊗P_i) diag(F) (⊗P_i)ᴴ`` with ``P_i = Γ_i^½ Q_i`` and ``F = 1/(1 + L_⊗/σ²)``.
      Cost ``O(Σ n_i³ + N Σ n_i)``; no cancellation (better in float32).

    Entries with ``γ_j = 0`` (pruned) get ``μ_j = Σ_jj = 0``.

    :param op: the dictionary Φ.
    :param gammas: per-mode hyperparameters ``γ_i [n_i]`` (≥ 0).
    :param noise_var: σ² > 0 (scalar).
    :param y: observations ``[..., M]``; batch axes in front are independent snapshots that
        share γ (their costs add).
    :return: ``(mu [..., N], var_diag [N], cost)`` with ``cost`` a scalar.

    Example::

        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> op = KronOperator([rng.normal(size=(3, 4)), rng.normal(size=(2, 5))])
        >>> mu, var, cost = kron_posterior(op, [np.ones(4), np.ones(5)], 0.1, np.ones(6))
        >>> mu.shape, var.shape
        ((20,), (20,))
    """
    if form not in ("measurement", "parameter"):
        raise ValueError(f"form must be 'measurement' or 'parameter', got {form!r}")
    y = jnp.asarray(y)
    factors = [jnp.asarray(a) for a in op.factors]
    gammas = [jnp.asarray(g) for g in gammas]
    dtype = jnp.result_type(*factors, *gammas, y)
    factors = [a.astype(dtype) for a in factors]
    rdtype = jnp.finfo(dtype).dtype
    gammas = [g.astype(rdtype) for g in gammas]
    noise_var = jnp.asarray(noise_var, rdtype)
    num_modes = op.num_modes
    batch = y.shape[:-1]
    gamma = kron_vector(gammas)
    if form == "measurement":
        eig = [
            jnp.linalg.eigh((a * g) @ jnp.conj(a).T) for a, g in zip(factors, gammas, strict=True)
        ]
        lams = [jnp.clip(lam, 0.0, None) for lam, _ in eig]
        us = [u for _, u in eig]
        bs = [
            jnp.conj(u).T @ a for u, a in zip(us, factors, strict=True)
        ]  # B_i = U_iᴴ A_i [m_i, n_i]
        d = noise_var + kron_vector(lams).reshape(op.out_shape)
        z = _mode_products(y.reshape(batch + op.out_shape), [jnp.conj(u).T for u in us], num_modes)
        w = _mode_products(z / d, [jnp.conj(b).T for b in bs], num_modes)
        mu = gamma * w.reshape(batch + (-1,))
        quad = _mode_products(1.0 / d, [(jnp.abs(b) ** 2).T for b in bs], num_modes)
        var = gamma - gamma**2 * quad.reshape(-1)
        n_snap = math.prod(batch)
        cost = n_snap * jnp.sum(jnp.log(d)) + jnp.sum(jnp.abs(z) ** 2 / d)
    else:
        roots = [jnp.sqrt(g) for g in gammas]
        eig = [
            jnp.linalg.eigh(r[:, None] * (jnp.conj(a).T @ a) * r[None, :])
            for a, r in zip(factors, roots, strict=True)
        ]
        # G_i has rank ≤ m_i: its n_i − m_i smallest eigenvalues are exactly 0 (round-off
        # there, multiplied by the other modes' eigenvalues, would otherwise reach log|C|).
        ls = [
            jnp.where(jnp.arange(a.shape[1]) < a.shape[1] - a.shape[0], 0.0, jnp.clip(lam, 0.0))
            for a, (lam, _) in zip(factors, eig, strict=True)
        ]
        ps = [
            r[:, None] * q for r, (_, q) in zip(roots, eig, strict=True)
        ]  # P_i = Γ_i^½ Q_i [n_i, n_i]
        f = (1.0 / (1.0 + kron_vector(ls) / noise_var)).reshape(op.in_shape)
        phy = op.rmatvec(y).reshape(batch + op.in_shape)
        inner = f * _mode_products(phy, [jnp.conj(p).T for p in ps], num_modes)
        mu = _mode_products(inner, ps, num_modes).reshape(batch + (-1,)) / noise_var
        var = _mode_products(f, [jnp.abs(p) ** 2 for p in ps], num_modes).reshape(-1)
        n_snap = math.prod(batch)
        m = op.shape[0]
        # yᴴC⁻¹y = ‖y − Φμ‖²/σ² + μᴴΓ⁻¹μ: two non-negative terms, no cancellation, and
        # Γ^{-½}μ = (⊗Q_i) inner / σ², so nothing is divided by a (possibly pruned) γ.
        resid = jnp.sum(jnp.abs(y - op.matvec(mu)) ** 2) / noise_var
        prior = jnp.sum(jnp.abs(inner) ** 2) / noise_var**2
        logdet = m * jnp.log(noise_var) + jnp.sum(jnp.log1p(kron_vector(ls) / noise_var))
        cost = n_snap * logdet + resid + prior
    var = jnp.clip(jnp.real(var), 0.0, None)
    return mu, var, jnp.real(cost)


# --------------------------------------------------------------------------- transform


def _iid_base(fn, name):
    """The scalar distribution of an i.i.d. vector site (``base.expand([N]).to_event(1)``)."""
    base = fn
    while isinstance(base, (dist.Independent, dist.ExpandedDistribution)):
        base = base.base_dist
    if base.batch_shape != () or base.event_shape != ():
        raise ValueError(
            f"kronecker_prior: site {name!r} must draw i.i.d. entries from one scalar "
            "distribution, e.g. dist.Gamma(a, b).expand([N]).to_event(1); got "
            f"{type(fn).__name__} with batch shape {fn.batch_shape}"
        )
    return base


def _rank_one_init(init, shape):
    """Per-mode initial values whose Kronecker product fits ``init`` (exact if constant);
    traceable, so a model may build its initial value with ``jnp`` under ``jit``."""
    init = jnp.asarray(init)
    if init.size == 1:
        init = jnp.full(math.prod(shape), init.reshape(()))
    out = [jnp.ones(n, init.dtype) for n in shape[:-1]]
    out.append(init.reshape(-1, shape[-1]).mean(axis=0))
    return out


class kronecker_prior(Messenger):
    """Program transformation: a flat hyperparameter site of length ``N = Π n_i`` becomes
    Kronecker factors ``γ = γ_1 ⊗ … ⊗ γ_I``.

    The site named ``site`` -- a ``numpyro.param`` (type-II maximum likelihood) or a
    ``numpyro.sample`` of i.i.d. entries (a hyperprior) -- is replaced by sites
    ``{site}_1 … {site}_I`` of the same kind with shapes ``[n_i]``, and the flat value is
    recorded as ``numpyro.deterministic(site, γ_1 ⊗ … ⊗ γ_I)``. The same model therefore
    runs as classic SBL untransformed and as KroSBL transformed.

    * A ``param`` site's factors keep its constraint; their initial values are the rank-one
      fit of its initial value (all ones but the last mode, which carries the slice means).
    * A ``sample`` site must draw i.i.d. entries from a scalar distribution (for example
      ``dist.Gamma(a, b).expand([N]).to_event(1)``), outside any plate; each factor draws
      ``[n_i]`` i.i.d. entries from the same distribution.

    :param fn: the model.
    :param site: the name of the flat site.
    :param shape: ``(n_1, …, n_I)`` with ``Π n_i = N``.

    Example::

        >>> import jax, jax.numpy as jnp, numpyro, numpyro.distributions as dist
        >>> from numpyro.distributions import constraints
        >>> def model():
        ...     g = numpyro.param("gamma", jnp.ones(6), constraint=constraints.positive)
        ...     numpyro.sample("x", dist.Normal(0.0, jnp.sqrt(g)).to_event(1))
        >>> kmodel = kronecker_prior(model, site="gamma", shape=(2, 3))
        >>> tr = numpyro.handlers.trace(numpyro.handlers.seed(kmodel, 0)).get_trace()
        >>> [(k, tr[k]["type"], tr[k]["value"].shape) for k in ("gamma_1", "gamma_2", "gamma")]
        [('gamma_1', 'param', (2,)), ('gamma_2', 'param', (3,)), ('gamma', 'deterministic', (6,))]
    """

    def __init__(self, fn=None, site: str = "gamma", shape: Sequence[int] = ()):
        shape = tuple(int(n) for n in shape)
        if len(shape) < 1 or any(n < 1 for n in shape):
            raise ValueError(f"shape must be (n_1, ..., n_I) with every n_i >= 1, got {shape}")
        if not isinstance(site, str) or not site:
            raise ValueError(f"site must be a site name, got {site!r}")
        self.site = site
        self.shape = shape
        super().__init__(fn)

    def factor_names(self) -> list[str]:
        """``["{site}_1", …, "{site}_I"]``."""
        return [f"{self.site}_{i + 1}" for i in range(len(self.shape))]

    def process_message(self, msg):
        if msg.get("name") != self.site or msg["type"] not in ("param", "sample"):
            return
        n = math.prod(self.shape)
        names = self.factor_names()
        if msg["type"] == "param":
            init = msg["args"][0] if msg["args"] else msg["kwargs"].get("init_value")
            if callable(init):
                raise TypeError(
                    f"kronecker_prior: param {self.site!r} needs an array initial value, "
                    "not an init function"
                )
            if np.size(init) not in (1, n):
                raise ValueError(
                    f"kronecker_prior: param {self.site!r} has {np.size(init)} entries but "
                    f"shape {self.shape} needs {n}"
                )
            kwargs = {k: v for k, v in msg["kwargs"].items() if k == "constraint"}
            inits = _rank_one_init(init, self.shape)
            factors = [
                numpyro.param(nm, jnp.asarray(v), **kwargs)
                for nm, v in zip(names, inits, strict=True)
            ]
        else:
            if msg.get("is_observed"):
                raise ValueError(f"kronecker_prior: site {self.site!r} is observed")
            if msg["cond_indep_stack"]:
                raise ValueError(
                    f"kronecker_prior: sample site {self.site!r} must not be inside a plate; "
                    "write it as dist.X(...).expand([N]).to_event(1)"
                )
            fn = msg["fn"]
            size = math.prod(fn.batch_shape + fn.event_shape)
            if size != n:
                raise ValueError(
                    f"kronecker_prior: site {self.site!r} has {size} entries but shape "
                    f"{self.shape} needs {n}"
                )
            base = _iid_base(fn, self.site)
            factors = [
                numpyro.sample(nm, base.expand([k]).to_event(1))
                for nm, k in zip(names, self.shape, strict=True)
            ]
        value = kron_vector(factors)
        msg["type"] = "deterministic"
        msg["value"] = value
        for key in list(msg):
            if key not in ("type", "name", "value", "cond_indep_stack"):
                del msg[key]


# --------------------------------------------------------------------------- marginal


class KronSBLMarginal(dist.Distribution):
    """The marginal of y in Kronecker SBL as a NumPyro distribution.

    ``y ~ N(0, C)`` with ``C = σ² I_M + Φ diag(γ_1 ⊗ … ⊗ γ_I) Φᴴ`` (circular complex
    Gaussian when ``is_complex``). ``log_prob`` takes the eigen route of
    :func:`kron_posterior`: ``−L/2 − (M/2) log 2π`` (real) or ``−L − M log π`` (complex),
    differentiable in ``gammas`` and ``noise_var``; nothing ``M×M`` is formed.

    :param op: the dictionary (a :class:`KronOperator` or its list of factors).
    :param gammas: per-mode ``γ_i [n_i]`` (≥ 0).
    :param noise_var: σ² > 0.
    :param is_complex: complex circular data (``y`` complex).

    Event shape ``(M,)``; no batch shape.

    Example::

        >>> import jax, numpy as np
        >>> op = KronOperator([np.eye(2), np.ones((3, 2))])
        >>> d = KronSBLMarginal(op, [np.ones(2), np.ones(2)], 0.5)
        >>> d.sample(jax.random.PRNGKey(0)).shape
        (6,)
    """

    arg_constraints = {"noise_var": constraints.positive}
    support = constraints.real_vector
    reparametrized_params = ["noise_var"]

    def __init__(self, op, gammas, noise_var, is_complex: bool = False, *, validate_args=None):
        self.op = op if isinstance(op, KronOperator) else KronOperator(op)
        gammas = list(gammas)
        if len(gammas) != self.op.num_modes:
            raise ValueError(
                f"gammas must hold {self.op.num_modes} vectors (one per factor), got {len(gammas)}"
            )
        for i, (g, n) in enumerate(zip(gammas, self.op.in_shape, strict=True)):
            if jnp.shape(g) != (n,):
                raise ValueError(f"gammas[{i}] must have shape ({n},), got {jnp.shape(g)}")
        self.gammas = gammas
        self.noise_var = noise_var
        self.is_complex = bool(is_complex)
        super().__init__(
            batch_shape=(), event_shape=(self.op.shape[0],), validate_args=validate_args
        )

    def tree_flatten(self):
        return (self.op, self.gammas, self.noise_var), self.is_complex

    @classmethod
    def tree_unflatten(cls, aux, params):
        op, gammas, noise_var = params
        return cls(op, gammas, noise_var, aux)

    def sample(self, key, sample_shape=()):
        m, n = self.op.shape
        kx, kn = jax.random.split(key)
        std = jnp.sqrt(kron_vector(self.gammas))
        noise_sd = jnp.sqrt(self.noise_var)
        if self.is_complex:
            kx1, kx2 = jax.random.split(kx)
            kn1, kn2 = jax.random.split(kn)
            shape_x, shape_n = sample_shape + (n,), sample_shape + (m,)
            x = jax.random.normal(kx1, shape_x) + 1j * jax.random.normal(kx2, shape_x)
            e = jax.random.normal(kn1, shape_n) + 1j * jax.random.normal(kn2, shape_n)
            return self.op.matvec(std * x / np.sqrt(2)) + noise_sd * e / np.sqrt(2)
        x = std * jax.random.normal(kx, sample_shape + (n,))
        e = jax.random.normal(kn, sample_shape + (m,))
        return self.op.matvec(x) + noise_sd * e

    def cost(self, y):
        """The SBL cost ``L = log|C| + yᴴ C⁻¹ y`` of ``y [..., M]`` (one value per row)."""
        y = jnp.asarray(y)
        flat = y.reshape((-1, y.shape[-1]))
        costs = jax.vmap(lambda row: kron_posterior(self.op, self.gammas, self.noise_var, row)[2])(
            flat
        )
        return costs.reshape(y.shape[:-1])

    def log_prob(self, value):
        m = self.op.shape[0]
        if self.is_complex:
            return -self.cost(value) - m * math.log(math.pi)
        return -0.5 * self.cost(value) - 0.5 * m * math.log(2 * math.pi)

    def posterior(self, y):
        """``(mu [..., N], var_diag [N])``: the Gaussian posterior of x given ``y [..., M]``."""
        mu, var, _ = kron_posterior(self.op, self.gammas, self.noise_var, y)
        return mu, var

    @property
    def mean(self):
        dtype = jnp.complex64 if self.is_complex else jnp.result_type(float)
        return jnp.zeros(self.event_shape, dtype)
