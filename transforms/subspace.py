"""Sparse subspace variational inference (SSVI; Li, Miao, Qiu, Zhang, ICLR 2024).

The variational family keeps, per weight site, a mean-field Normal on an **active set** of
fixed size ``s = round(density · size)`` and a point mass at 0 elsewhere::

    q(θ) = Π_{k active} N(θ_k; μ_k, σ_k²) · Π_{k inactive} δ₀(θ_k),   σ = softplus(ρ).

Only ``(idx, μ, ρ)`` of length ``s`` (and their optimiser moments) are stored; samples are
:class:`ppl.sparse.SparseTensor` and layers written with :func:`ppl.sparse.matmul` /
:func:`ppl.sparse.conv2d` touch only the active entries.

* :func:`sparse_subspace` — the program transformation ``model -> (guide, init_state)``.
* :class:`restrict_prior` — a handler restricting each sparse site's Normal prior to the
  active set (:class:`ppl.sparse.SparseNormal`), so that ``log p − log q`` and the
  registered closed-form KL are over the active set only (spec §1.2).
* :func:`update_support` — one pure, jit-compatible removal-and-addition step with fixed
  shapes (spec §1.4, §6.5).
* :func:`criterion_scores` — the removal scores, computed stably (spec D3 fixed).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from jax.scipy.special import erfc, log_ndtr
from numpyro.distributions.transforms import biject_to
from numpyro.handlers import seed, trace
from numpyro.primitives import Messenger

from ppl.sparse import SparseNormal, num_active

__all__ = [
    "SubspaceState",
    "SparseGuide",
    "sparse_subspace",
    "restrict_prior",
    "update_support",
    "criterion_scores",
    "erk_densities",
    "CRITERIA",
    "softplus_inv",
]

#: The removal criteria by name (lower score = removed first).
CRITERIA = ("magnitude", "snr", "snr_abs", "mean_abs", "exp_mean_abs", "snr_exp_abs")

_SQRT_2_PI = math.sqrt(2.0 / math.pi)


class SubspaceState(NamedTuple):
    """The support: ``idx = {site: int32[s_site]}`` (sorted, unique flat C-order indices)
    and ``count int32[]``, the number of :func:`update_support` calls so far."""

    idx: dict
    count: jax.Array


def softplus_inv(sigma):
    """``ρ`` with ``softplus(ρ) = σ`` (stable for small and large σ).

    >>> round(float(softplus_inv(6e-4)), 3)
    -7.418
    """
    sigma = jnp.asarray(sigma, jnp.result_type(float))
    return sigma + jnp.log(-jnp.expm1(-sigma))


def _log_softplus(rho):
    """``log softplus(ρ)``, accurate for very negative ρ (no underflow to −inf)."""
    return jnp.where(rho < -20.0, rho, jnp.log(jax.nn.softplus(jnp.maximum(rho, -20.0))))


# ---------------------------------------------------------------------------------------
# the program transformation
# ---------------------------------------------------------------------------------------


def _support_idx(support) -> dict:
    if isinstance(support, SubspaceState):
        return dict(support.idx)
    if isinstance(support, Mapping):
        return {k: (v["idx"] if isinstance(v, Mapping) else v) for k, v in support.items()}
    raise TypeError(
        f"support must be a SubspaceState or a dict {{site: idx}}, got {type(support).__name__}"
    )


def _base_normal(fn, name):
    """The Normal under Independent/Expanded wrappers, or a TypeError naming the site."""
    base = fn
    while isinstance(base, dist.Independent | dist.ExpandedDistribution):
        base = base.base_dist
    if not isinstance(base, dist.Normal):
        raise TypeError(
            f"site {name!r}: the sparse subspace needs a Normal prior, got {type(base).__name__}"
        )
    return base


class restrict_prior(Messenger):
    """Restrict the Normal prior of each site named in ``support`` to its active set.

    The prior ``N(m₀, s₀²)`` of shape ``dense_shape`` becomes
    ``SparseNormal(m₀[idx], s₀[idx], idx, dense_shape)``: N on the ``s`` active coordinates,
    δ₀ on the others (spec §1.2), so its log density and KL are sums over the active set.

    :param fn: a NumPyro model.
    :param support: :class:`SubspaceState` or ``{site: int32[s]}``.

    >>> import jax, jax.numpy as jnp, numpyro, numpyro.distributions as dist
    >>> from numpyro.handlers import seed, trace
    >>> def model():
    ...     numpyro.sample("w", dist.Normal(0.0, 1.0).expand([3, 4]).to_event(2))
    >>> tr = trace(seed(restrict_prior(model, {"w": jnp.array([0, 5, 7])}), 0)).get_trace()
    >>> type(tr["w"]["fn"]).__name__, tr["w"]["value"].values.shape
    ('SparseNormal', (3,))
    """

    def __init__(self, fn=None, support=None):
        if support is None:
            raise ValueError("restrict_prior needs a support (SubspaceState or {site: idx})")
        self.idx = _support_idx(support)
        super().__init__(fn)

    def process_message(self, msg):
        if msg["type"] != "sample" or msg["name"] not in self.idx:
            return
        name, fn = msg["name"], msg["fn"]
        if isinstance(fn, SparseNormal):
            return
        base = _base_normal(fn, name)
        shape = tuple(fn.batch_shape) + tuple(fn.event_shape)
        idx = self.idx[name]

        def gather(p):
            p = jnp.asarray(p)
            if p.size == 1:
                return p.reshape(())
            return jnp.broadcast_to(p, shape).reshape(-1)[idx]

        msg["fn"] = SparseNormal(gather(base.loc), gather(base.scale), idx, shape)


class _SiteInfo(NamedTuple):
    shape: tuple
    size: int
    nse: int | None  # None: dense mean-field site
    # dense site with a constrained support: biject_to(support), from the unconstrained
    # space of the site's Normal to the support (None: a real-valued site)
    transform: object = None

    @property
    def param_shape(self) -> tuple:
        """The shape of the site's ``loc``/``rho`` params."""
        if self.nse is not None:
            return (self.nse,)
        if self.transform is not None:
            return tuple(self.transform.inverse_shape(self.shape))
        return self.shape

    def constrain(self, value):
        """A value of the site's Normal (unconstrained) mapped to the site's support."""
        return value if self.transform is None else self.transform(value)


def _check_density(density):
    def one(value, what):
        if isinstance(value, bool) or not isinstance(value, int | float | np.floating):
            raise TypeError(f"{what} must be a float in (0, 1], got {value!r}")
        if not (0.0 < float(value) <= 1.0) or not math.isfinite(float(value)):
            raise ValueError(f"{what} must be in (0, 1], got {value!r}")
        return float(value)

    if isinstance(density, Mapping):
        return {k: one(v, f"density[{k!r}]") for k, v in density.items()}
    return one(density, "density")


def _init_pair(pair, what):
    if isinstance(pair, int | float):
        return float(pair), 0.0
    try:
        a, b = pair
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a float or a pair (mean, sd), got {pair!r}") from None
    return a, b


class SparseGuide:
    """The guide made by :func:`sparse_subspace` (call it as ``guide(*args, support=state)``).

    Params: ``"{site}_loc"``, ``"{site}_rho"`` of shape ``(s,)`` for sparse sites and of the
    site's (unconstrained) shape for dense mean-field sites (σ = softplus(ρ)). Sparse sites
    sample a :class:`ppl.sparse.SparseTensor`; a dense site with a constrained support (a
    Gamma noise precision, a HalfNormal prior scale) samples
    ``TransformedDistribution(Normal(loc, σ), biject_to(support))``, the mean-field Normal on
    the unconstrained space of ``numpyro.infer.autoguide.AutoNormal``.
    """

    def __init__(
        self, model, density, sites, dense_sites, init_loc, init_scale, allocation="uniform"
    ):
        self.model = model
        self.density = density
        self.allocation = allocation
        self.requested_sites = None if sites is None else tuple(sites)
        self.dense_sites = tuple(dense_sites)
        self.init_loc = _init_pair(init_loc, "init_loc")
        self.init_scale = _init_pair(init_scale, "init_scale")
        self.sites: dict[str, _SiteInfo] | None = None
        self.__name__ = "sparse_subspace_guide"

    # discovery ------------------------------------------------------------------------
    def discover(self, *args, **kwargs) -> dict:
        """Trace the model once (abstractly) and fix which sites are sparse, with their ``s``.

        :raises ValueError: for unknown names in ``sites``/``dense_sites``.
        :raises TypeError: naming a requested site that is not Normal or has ndim < 1.
        """
        if self.sites is not None:
            return self.sites
        found = {}

        def run():
            tr = trace(seed(self.model, jax.random.PRNGKey(0))).get_trace(*args, **kwargs)
            for name, site in tr.items():
                if site["type"] == "sample" and not site["is_observed"]:
                    fn = site["fn"]
                    found[name] = (fn, tuple(jnp.shape(site["value"])), _support_fixed(fn))
            return 0

        jax.eval_shape(run)
        latent = list(found)
        for what, names in (("sites", self.requested_sites), ("dense_sites", self.dense_sites)):
            unknown = [n for n in (names or ()) if n not in found and n != "first"]
            if unknown:
                raise ValueError(
                    f"{what} names unknown site(s) {unknown}; the model's latent sites are {latent}"
                )
        if isinstance(self.density, Mapping):
            unknown = [n for n in self.density if n not in found]
            if unknown:
                raise ValueError(
                    f"density names unknown site(s) {unknown}; the model's latent sites are "
                    f"{latent}"
                )
        if self.requested_sites is None:
            chosen = [
                n
                for n, (fn, shape, _) in found.items()
                if len(shape) >= 2
                and _is_normal(fn)
                and (not isinstance(self.density, Mapping) or n in self.density)
            ]
        else:
            chosen = list(self.requested_sites)
            for n in chosen:
                _base_normal(found[n][0], n)
                if len(found[n][1]) < 1:
                    raise TypeError(f"site {n!r} is a scalar; only tensors can be sparse")
        dense = set(self.dense_sites)
        if "first" in dense and chosen:
            dense.discard("first")
            dense.add(chosen[0])
        sparse_shapes = {n: found[n][1] for n in chosen if n not in dense}
        if isinstance(self.density, Mapping):
            per_site = dict(self.density)
        elif self.allocation == "erk":
            per_site = erk_densities(sparse_shapes, self.density)
        else:
            per_site = {n: self.density for n in sparse_shapes}
        info = {}
        for name, (fn, shape, fixed) in found.items():
            size = math.prod(shape)
            if name in sparse_shapes:
                info[name] = _SiteInfo(shape, size, num_active(per_site[name], size))
            else:
                info[name] = _SiteInfo(shape, size, None, _dense_transform(fn, name, fixed))
        self.sites = info
        return info

    @property
    def sparse_sites(self) -> tuple:
        if self.sites is None:
            raise RuntimeError("call init_state(key, *args) (or guide.discover(*args)) first")
        return tuple(n for n, i in self.sites.items() if i.nse is not None)

    def init_state(self, rng_key, *args, **kwargs) -> SubspaceState:
        """A uniformly random support per sparse site (without replacement, sorted)."""
        info = self.discover(*args, **kwargs)
        idx = {}
        for k, name in enumerate(n for n, i in info.items() if i.nse is not None):
            site = info[name]
            key = jax.random.fold_in(rng_key, k)
            if site.nse == site.size:
                idx[name] = jnp.arange(site.size, dtype=jnp.int32)
            else:
                pick = jax.random.choice(key, site.size, (site.nse,), replace=False)
                idx[name] = jnp.sort(pick).astype(jnp.int32)
        return SubspaceState(idx, jnp.zeros((), jnp.int32))

    # the guide program ----------------------------------------------------------------
    def __call__(self, *args, support=None, **kwargs):
        info = self.discover(*args, **kwargs)
        if support is None:
            raise ValueError(
                "the sparse-subspace guide needs support=state (from init_state(key, *args))"
            )
        idx = _support_idx(support)
        m0, m_sd = self.init_loc
        s0, s_sd = self.init_scale
        for name, site in info.items():
            n = site.nse
            shape = site.param_shape
            fan_in = math.prod(site.shape[:-1]) if len(site.shape) > 1 else 1
            if n is not None:
                fan_in = max(1.0, fan_in * n / site.size)
            sd = m_sd
            if sd == "fan_in":
                sd = 1.0 / math.sqrt(fan_in)

            def loc_init(key, shape=shape, sd=sd):
                return m0 + sd * jax.random.normal(key, shape)

            def rho_init(key, shape=shape):
                return softplus_inv(jnp.abs(s0 + s_sd * jax.random.normal(key, shape)) + 1e-12)

            loc = numpyro.param(f"{name}_loc", loc_init)
            rho = numpyro.param(f"{name}_rho", rho_init)
            scale = jax.nn.softplus(rho)
            if n is not None:
                numpyro.sample(name, SparseNormal(loc, scale, idx[name], site.shape))
            elif site.transform is None:
                numpyro.sample(name, dist.Normal(loc, scale).to_event(len(site.shape)))
            else:
                base = dist.Normal(loc, scale).to_event(len(shape))
                numpyro.sample(name, dist.TransformedDistribution(base, site.transform))

    # conveniences ---------------------------------------------------------------------
    def bind(self, state) -> tuple[Callable, Callable]:
        """``(restrict_prior(model, state), guide(·, support=state))``: the pair an objective
        sees for a fixed support."""
        sparse = {k: v for k, v in _support_idx(state).items()}
        return restrict_prior(self.model, sparse), partial(self, support=state)

    def init_params(self, rng_key, state, *args, **kwargs) -> dict:
        """Initial unconstrained params (``ppl.init_params`` of the bound pair)."""
        from ppl.grad import init_params

        model_r, guide_r = self.bind(state)
        return init_params(rng_key, model_r, guide_r, *args, **kwargs)


def _is_normal(fn) -> bool:
    try:
        _base_normal(fn, "")
        return True
    except TypeError:
        return False


def _real_support(fn) -> bool:
    support = fn.support
    while isinstance(support, dist.constraints.independent):
        support = support.base_constraint
    return support is dist.constraints.real


def _support_fixed(fn) -> bool:
    """False when the support's parameters (e.g. the bounds of a Uniform) are traced: they
    depend on the model's arguments (or on other latent sites)."""
    support = fn.support
    while isinstance(support, dist.constraints.independent):
        support = support.base_constraint
    leaves = jax.tree.leaves(getattr(support, "__dict__", {}))
    return not any(isinstance(leaf, jax.core.Tracer) for leaf in leaves)


def _dense_transform(fn, name, fixed):
    """``None`` for a real-valued site, else ``biject_to(support)`` (a TypeError naming
    the site for discrete, argument-dependent or unsupported supports)."""
    if _real_support(fn):
        return None
    support = fn.support
    what = f"site {name!r} ({type(fn).__name__}, support {support})"
    if support.is_discrete:
        raise TypeError(
            f"{what} is discrete; the sparse-subspace guide is a Normal family over "
            "continuous sites: marginalise the site out of the model (or observe it), or "
            "fit the model with ppl.inference.SVI and a guide with a discrete site"
        )
    if not fixed:
        raise TypeError(
            f"{what}: the support depends on the model's arguments or on another latent "
            "site, so no fixed bijection maps the guide's Normal onto it; sample the site "
            "on a fixed support (e.g. Uniform(0, 1)) and shift/scale it in the model"
        )
    try:
        return biject_to(support)
    except NotImplementedError:
        raise TypeError(
            f"{what}: numpyro's biject_to has no transform to this support; reparametrise "
            "the site with a real-valued latent"
        ) from None


def erk_densities(shapes: Mapping, density: float) -> dict:
    """Per-site densities of the Erdős–Rényi-kernel allocation (Evci et al., RigL, 2020).

    Site ``l`` of shape ``(…, n_in, n_out)`` gets density ``ε·Σ dims / Π dims`` (for a conv
    kernel ``[kh, kw, c_in, c_out]``: ``ε (kh + kw + c_in + c_out)/(kh·kw·c_in·c_out)``), with
    one ``ε`` chosen so that the active count summed over the sites is ``density · Σ size``
    (the same budget as the uniform allocation). A site whose density would exceed 1 is made
    fully active and ``ε`` is solved again for the others. Small layers (the classifier head)
    thereby keep more of their weights than wide ones.

    :param shapes: ``{site: shape}`` of the sparse sites.
    :param density: the overall density in (0, 1].
    :returns: ``{site: density in (0, 1]}``.

    >>> d = erk_densities({"conv": (3, 3, 32, 64), "head": (64, 10)}, 0.1)
    >>> d["head"], round(d["conv"], 3)
    (1.0, 0.069)
    """
    density = _check_density(density)
    sizes = {n: math.prod(s) for n, s in shapes.items()}
    raw = {n: sum(s) / sizes[n] for n, s in shapes.items()}
    budget = density * sum(sizes.values())
    full: set = set()
    while True:
        free = [n for n in shapes if n not in full]
        rest = budget - sum(sizes[n] for n in full)
        denom = sum(raw[n] * sizes[n] for n in free)
        if not free or denom <= 0:
            return {n: 1.0 for n in shapes}
        eps = rest / denom
        over = [n for n in free if eps * raw[n] > 1.0]
        if not over:
            out = {n: 1.0 for n in full}
            out.update({n: max(eps * raw[n], 1e-12) for n in free})
            return {n: min(1.0, out[n]) for n in shapes}
        full.update(over)


def sparse_subspace(
    model,
    density,
    *,
    sites=None,
    dense_sites=(),
    allocation="uniform",
    init_loc=(0.0, 0.01),
    init_scale=(6e-4, 5e-4),
):
    """The sparse-subspace program transformation: ``model -> (guide, init_state)``.

    :param model: a NumPyro model whose weight sites have Normal priors (dense, e.g.
        ``Normal(0, 1).expand([n_in, n_out]).to_event(2)``) and whose layers use
        :func:`ppl.sparse.matmul` / :func:`ppl.sparse.conv2d` (which accept dense and
        sparse weights alike).
    :param density: ``float`` in (0, 1] (every sparse site) or ``{site: float}``.
    :param sites: names of the sites to sparsify (default: every Normal site with ndim ≥ 2,
        or the keys of a ``density`` dict). Other latent sites get a dense mean-field Normal
        (``sites=()``: plain dense mean-field VI, the baseline); for a site with a
        constrained support (a Gamma noise precision, a HalfNormal prior scale) that Normal
        is on the unconstrained space, pushed through ``biject_to(support)`` as in
        ``numpyro.infer.autoguide.AutoNormal`` (Kucukelbir et al., ADVI, JMLR 2017).
    :param dense_sites: sites kept dense (``"first"``: the first sparse site, as the
        reference keeps the first conv dense).
    :param allocation: how a float ``density`` is spread over the sparse sites:
        ``"uniform"`` (every site at ``density``, the reference) or ``"erk"``
        (:func:`erk_densities`: the same total active count, small layers denser).
    :param init_loc: ``(mean, sd)`` of the initial μ (sd may be ``"fan_in"`` for
        ``1/√(density·fan_in)``); reference ``(0, 0.01)``.
    :param init_scale: ``(a, b)``: initial σ = ``|a + b·N(0,1)|``; reference ``(6e-4, 5e-4)``.
    :returns: ``(guide, init_state)``: ``guide(*args, support=state, **kwargs)`` (a
        :class:`SparseGuide`) and ``init_state(rng_key, *args, **kwargs) -> SubspaceState``
        (a uniformly random support per site, ``s = round(density·size)``).

    >>> import jax, jax.numpy as jnp, numpyro, numpyro.distributions as dist, ppl
    >>> def model(x, y=None):
    ...     w = numpyro.sample("w", dist.Normal(0.0, 1.0).expand([5, 3]).to_event(2))
    ...     with numpyro.plate("data", x.shape[0]):
    ...         numpyro.sample("y", dist.Normal(ppl.sparse.matmul(x, w), 1.0).to_event(1), obs=y)
    >>> guide, init_state = sparse_subspace(model, 0.4)
    >>> x, y = jnp.ones((8, 5)), jnp.zeros((8, 3))
    >>> state = init_state(jax.random.PRNGKey(0), x, y)
    >>> state.idx["w"].shape
    (6,)
    >>> params = guide.init_params(jax.random.PRNGKey(1), state, x, y)
    >>> {k: v.shape for k, v in params.items()}
    {'w_loc': (6,), 'w_rho': (6,)}
    """
    if not callable(model):
        raise TypeError(f"model must be a callable NumPyro model, got {type(model).__name__}")
    density = _check_density(density)
    if sites is not None:
        if isinstance(sites, str):
            sites = (sites,)
        sites = tuple(sites)
    if isinstance(dense_sites, str):
        dense_sites = (dense_sites,)
    if allocation not in ("uniform", "erk"):
        raise ValueError(f"allocation must be 'uniform' or 'erk', got {allocation!r}")
    if allocation == "erk" and isinstance(density, Mapping):
        raise ValueError("allocation='erk' needs one float density (got a per-site dict)")
    guide = SparseGuide(model, density, sites, dense_sites, init_loc, init_scale, allocation)
    return guide, guide.init_state


# ---------------------------------------------------------------------------------------
# removal criteria (stable in float32; spec §1.4 and D3)
# ---------------------------------------------------------------------------------------


def _log_r(mu, rho):
    """``log(|μ|/σ)`` with σ = softplus(ρ), finite for every input (μ = 0 gives −80)."""
    log_mu = jnp.log(jnp.maximum(jnp.abs(mu), 1e-35))
    return jnp.clip(log_mu - _log_softplus(rho), -80.0, 80.0)


def _folded_excess(r):
    """``d(r) = M(r) − r = √(2/π)e^{−r²/2} − r·erfc(r/√2) ≥ 0`` (0 beyond r = 40)."""
    rc = jnp.minimum(r, 40.0)
    d = _SQRT_2_PI * jnp.exp(-0.5 * rc**2) - rc * erfc(rc / math.sqrt(2.0))
    return jnp.where(r < 40.0, jnp.maximum(d, 0.0), 0.0)


def _snr_abs_of_r(r):
    """``g(r) = M/√(1 + r² − M²)`` as ``(r + d)/√(1 − 2rd − d²)``: no cancellation of r²."""
    d = _folded_excess(r)
    var = jnp.maximum(1.0 - 2.0 * r * d - d**2, 1e-30)
    return (r + d) / jnp.sqrt(var)


def _log_exp_moment(mu, sigma, lam):
    """``log E e^{λ|θ|}`` for θ ~ N(μ, σ²), in log space."""
    a = lam * mu + 0.5 * (lam * sigma) ** 2 + log_ndtr(mu / sigma + lam * sigma)
    b = -lam * mu + 0.5 * (lam * sigma) ** 2 + log_ndtr(-mu / sigma + lam * sigma)
    return jnp.logaddexp(a, b)


def criterion_scores(mu, rho, criterion="snr_abs", *, lambda_exp=1.0):
    """The removal score of each active weight (lower = removed first).

    :param mu: ``float[s]`` means. :param rho: ``float[s]``, σ = softplus(ρ).
    :param criterion: one of :data:`CRITERIA` or ``callable(mu, sigma) -> float[s]``:

        ``"magnitude"`` |μ|; ``"snr"`` |μ|/σ; ``"snr_abs"`` (default) E|θ|/sd|θ| = g(|μ|/σ);
        ``"mean_abs"`` E|θ|; ``"exp_mean_abs"`` E e^{λ|θ|}; ``"snr_exp_abs"`` its SNR.

        ``snr`` and ``snr_abs`` are returned as ``log`` scores (same order, never inf/NaN;
        g is strictly increasing, so both rank like r = |μ|/σ, spec §1.4), the exponential
        ones in log space too. The reference code's float32 ``snr_abs`` overflowed to NaN,
        set to 0, for large r, removing the most certain weights first (D3).
    :returns: ``float[s]``.

    >>> import jax.numpy as jnp
    >>> mu, rho = jnp.array([0.3, 1e4]), softplus_inv(jnp.array([0.2, 1e-3]))
    >>> sc = criterion_scores(mu, rho, "snr_abs")  # log g(r); r = 1.5 and 1e7
    >>> round(float(jnp.exp(sc[0])), 4), round(float(sc[1] / jnp.log(1e7)), 5)
    (1.7204, 1.0)
    """
    mu = jnp.asarray(mu)
    rho = jnp.asarray(rho)
    if callable(criterion):
        return jnp.asarray(criterion(mu, jax.nn.softplus(rho)))
    if criterion == "magnitude":
        return jnp.abs(mu)
    log_r = _log_r(mu, rho)
    if criterion == "snr":
        return log_r
    if criterion == "snr_abs":
        r = jnp.exp(log_r)
        # log g(r) = log r + log((1 + d/r)/√var); for r ≥ 40 exactly log r
        small = jnp.minimum(r, 40.0)
        log_g = jnp.log(_snr_abs_of_r(small))
        return jnp.where(r < 40.0, log_g, log_r)
    sigma = jnp.exp(_log_softplus(rho))
    if criterion == "mean_abs":
        return jnp.abs(mu) + sigma * _folded_excess(jnp.exp(log_r))
    lam = float(lambda_exp)
    if criterion == "exp_mean_abs":
        return _log_exp_moment(mu, sigma, lam)
    if criterion == "snr_exp_abs":
        l1 = _log_exp_moment(mu, sigma, lam)
        l2 = _log_exp_moment(mu, sigma, 2.0 * lam)
        # SNR = m1/√(m2 − m1²) = 1/√expm1(log m2 − 2 log m1); returned as its log
        return -0.5 * jnp.log(jnp.maximum(jnp.expm1(l2 - 2.0 * l1), 1e-37))
    raise ValueError(f"criterion must be one of {CRITERIA} or a callable, got {criterion!r}")


# ---------------------------------------------------------------------------------------
# the support update (pure)
# ---------------------------------------------------------------------------------------


def _check_fraction(fraction, name="fraction"):
    if isinstance(fraction, jax.core.Tracer):
        return fraction
    f = np.asarray(fraction)
    if f.shape != () or not np.issubdtype(f.dtype, np.number):
        raise TypeError(f"{name} (the remove fraction) must be a scalar, got {fraction!r}")
    if not (0.0 <= float(f) < 1.0):
        raise ValueError(f"{name} (the remove fraction) must be in [0, 1), got {float(f)}")
    return fraction


def _site_leaf(path, names):
    """The param name a leaf of an optax state belongs to (last DictKey in ``names``)."""
    for entry in reversed(path):
        if isinstance(entry, jax.tree_util.DictKey) and entry.key in names:
            return entry.key
    return None


def update_support(
    params,
    opt_state,
    state: SubspaceState,
    key,
    *,
    fraction,
    criterion="snr_abs",
    grow="grad",
    grow_grad=None,
    grow_scale="mean",
    allow_regrow=True,
    lambda_exp=1.0,
    max_fraction=None,
    shapes=None,
):
    """One removal-and-addition step of the active sets (pure; fixed shapes; jit-able).

    Per sparse site with ``s`` slots: ``n = floor(fraction·s)`` (``fraction`` may be
    traced) slots with the lowest :func:`criterion_scores` are freed (ties: lower flat
    index first); among the positions not kept (the inactive ones and, with
    ``allow_regrow``, those just freed) the ``n`` best by the growth score fill them.
    A new weight gets μ = 0, ρ from ``grow_scale`` and zero optimiser moments (every leaf of
    ``opt_state`` under the key ``"{site}_loc"``/``"{site}_rho"``); a weight removed and
    re-added in the same call keeps its μ, ρ and moments. Indices are re-sorted and the
    slot contents permuted with them.

    :param params: ``{"{site}_loc": f32[s], "{site}_rho": f32[s], ...}`` (other keys kept).
    :param opt_state: an optax state over ``params`` (e.g. ``optax.adam``).
    :param state: :class:`SubspaceState`.
    :param key: PRNG key (for ``grow="random"``).
    :param fraction: the removed fraction in [0, 1) (``cosine_fraction(t, ...)``).
    :param criterion: see :func:`criterion_scores`.
    :param grow: ``"grad"`` (largest ``|∂L/∂μ|`` of the dense probe ``grow_grad``) or
        ``"random"`` (uniform among candidates).
    :param grow_grad: ``{site: f32[*shape]}`` dense gradients; required for ``grow="grad"``.
    :param grow_scale: ``"mean"`` (ρ = mean ρ of the kept slots), ``"eps"`` (σ = 1e-6) or a
        float σ.
    :param max_fraction: static upper bound on ``fraction`` (sizes the ``top_k``; default
        ``fraction`` when concrete, else 1).
    :param shapes: ``{site: dense shape}``; required for ``grow="random"`` (for ``"grad"``
        the shapes come from ``grow_grad``).
    :returns: ``(params, opt_state, state, info)``; ``info[site]`` holds ``n_removed``,
        ``n_added``, ``n_regrown`` and ``jaccard_magnitude`` (overlap of the removed set
        with the |μ| removal set).

    >>> import jax, jax.numpy as jnp, optax
    >>> params = {"w_loc": jnp.array([0.5, -0.02, 0.1, 0.4]), "w_rho": jnp.zeros(4)}
    >>> state = SubspaceState({"w": jnp.array([0, 2, 5, 7])}, jnp.array(0))
    >>> opt_state = optax.adam(1e-3).init(params)
    >>> g = {"w": jnp.arange(12.0).reshape(3, 4)}
    >>> p, o, s, info = update_support(params, opt_state, state, jax.random.PRNGKey(0),
    ...                                fraction=0.5, grow_grad=g)
    >>> s.idx["w"], p["w_loc"]
    (Array([ 0,  7, 10, 11], dtype=int32), Array([0.5, 0.4, 0. , 0. ], dtype=float32))
    """
    if not isinstance(state, SubspaceState):
        raise TypeError(f"state must be a SubspaceState, got {type(state).__name__}")
    fraction = _check_fraction(fraction)
    if grow not in ("grad", "random"):
        raise ValueError(f"grow must be 'grad' or 'random', got {grow!r}")
    if grow == "grad" and grow_grad is None:
        raise ValueError("grow='grad' needs grow_grad={site: dense gradient} (a dense probe)")
    if not callable(criterion) and criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA} or a callable, got {criterion!r}")
    if isinstance(grow_scale, str) and grow_scale not in ("mean", "eps"):
        raise ValueError(f"grow_scale must be 'mean', 'eps' or a float, got {grow_scale!r}")
    for site in state.idx:
        for suffix in ("_loc", "_rho"):
            if site + suffix not in params:
                raise ValueError(f"params lacks {site + suffix!r} of sparse site {site!r}")
        if grow == "grad" and site not in grow_grad:
            raise ValueError(f"grow_grad lacks sparse site {site!r}")
        if grow == "random" and (shapes is None or site not in shapes):
            raise ValueError(f"grow='random' needs shapes={{site: dense shape}} (missing {site!r})")
    if max_fraction is None:
        max_fraction = 1.0 if isinstance(fraction, jax.core.Tracer) else float(fraction)

    params = dict(params)
    new_idx, info, sources = {}, {}, {}
    for k, (site, idx) in enumerate(state.idx.items()):
        mu, rho = params[site + "_loc"], params[site + "_rho"]
        s = idx.shape[0]
        g = jnp.abs(jnp.asarray(grow_grad[site])).reshape(-1) if grow == "grad" else None
        size = g.shape[0] if g is not None else math.prod(shapes[site])
        n_max = min(max(1, math.ceil(max_fraction * s)), s)
        if not allow_regrow or s == size:
            n_max = min(n_max, size - s)
        out = _update_site(
            mu,
            rho,
            idx,
            g,
            jax.random.fold_in(key, k),
            fraction,
            criterion,
            lambda_exp,
            grow_scale,
            allow_regrow,
            n_max,
            size=size,
        )
        new_idx[site], src, perm, new_mu, new_rho, info[site] = out
        params[site + "_loc"], params[site + "_rho"] = new_mu, new_rho
        sources[site + "_loc"] = (src, perm)
        sources[site + "_rho"] = (src, perm)

    def fix(path, leaf):
        name = _site_leaf(path, sources)
        if name is None or jnp.ndim(leaf) != 1:
            return leaf
        src, perm = sources[name]
        if leaf.shape[0] != src.shape[0]:
            return leaf
        moved = jnp.where(src >= 0, leaf[jnp.maximum(src, 0)], jnp.zeros((), leaf.dtype))
        return moved[perm]

    opt_state = jax.tree_util.tree_map_with_path(fix, opt_state)
    return params, opt_state, SubspaceState(new_idx, state.count + 1), info


def _update_site(
    mu, rho, idx, g, key, fraction, criterion, lambda_exp, grow_scale, allow_regrow, n_max, *, size
):
    s = idx.shape[0]
    n_r = jnp.floor(jnp.asarray(fraction, jnp.float32) * s).astype(jnp.int32)
    n_r = jnp.minimum(n_r, max(n_max, 0))  # n_max = 0 at density 1: the identity
    n_max = max(n_max, 1)
    # g(r) is strictly increasing, so snr_abs ranks exactly like r (spec §1.4); rank by
    # log r so that f32 near-ties of g at small r (g'(0) = 0) cannot reorder weights
    crit = "snr" if criterion == "snr_abs" else criterion
    score = criterion_scores(mu, rho, crit, lambda_exp=lambda_exp)
    order = jnp.argsort(score, stable=True)  # ties: lower slot (= lower flat idx) first
    rank = jnp.zeros(s, jnp.int32).at[order].set(jnp.arange(s, dtype=jnp.int32))
    freed = rank < n_r
    # growth candidates: every position not kept
    blocked = jnp.zeros(size, bool).at[jnp.where(freed, size, idx)].set(True, mode="drop")
    if not allow_regrow:
        blocked = blocked.at[idx].set(True)
    if g is None:
        g = jax.random.uniform(key, (size,))
    cand = jnp.where(blocked, -jnp.inf, g.astype(jnp.float32))
    _, top = jax.lax.top_k(cand, n_max)  # ties: lower flat index first
    take = jnp.minimum(rank, n_max - 1)
    pos = jnp.where(freed, top[take].astype(jnp.int32), idx)
    # where does each slot's content come from? kept: itself; re-grown: the old slot
    old_slot = jnp.clip(jnp.searchsorted(idx, pos), 0, s - 1)
    was_active = idx[old_slot] == pos
    src = jnp.where(freed, jnp.where(was_active, old_slot, -1), jnp.arange(s))
    kept = ~freed
    n_kept = jnp.maximum(kept.sum(), 1)
    if grow_scale == "mean":
        rho_new = jnp.sum(jnp.where(kept, rho, 0.0)) / n_kept
    elif grow_scale == "eps":
        rho_new = softplus_inv(1e-6)
    else:
        rho_new = softplus_inv(float(grow_scale))
    rho_new = jnp.asarray(rho_new, rho.dtype)
    safe = jnp.maximum(src, 0)
    new_mu = jnp.where(src >= 0, mu[safe], jnp.zeros((), mu.dtype))
    new_rho = jnp.where(src >= 0, rho[safe], rho_new)
    perm = jnp.argsort(pos)
    # Jaccard overlap of the removed set with the |μ| removal set
    order_m = jnp.argsort(jnp.abs(mu), stable=True)
    rank_m = jnp.zeros(s, jnp.int32).at[order_m].set(jnp.arange(s, dtype=jnp.int32))
    freed_m = rank_m < n_r
    inter = jnp.sum(freed & freed_m)
    union = jnp.maximum(jnp.sum(freed | freed_m), 1)
    regrown = jnp.sum(freed & (src >= 0))
    info = {
        "n_removed": n_r,
        "n_added": n_r - regrown,
        "n_regrown": regrown,
        "jaccard_magnitude": inter / union,
    }
    return pos[perm], src, perm, new_mu[perm], new_rho[perm], info
