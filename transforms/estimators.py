"""Per-site gradient estimators and the handler that assigns them.

An *estimator* decides how the derivative of an objective flows through one
``numpyro.sample`` site ``z ~ q_η`` (η the distribution's parameters):

* :class:`REPARAM` — pathwise, ``z = T(ε, η)``; needs ``fn.has_rsample``.
* :class:`REINFORCE` — score function, ``(F(z) − b) ∂ log q_η(z)`` with an optional
  baseline ``b`` (none, a learned running mean, leave-one-out over particles, or
  a user function).
* :class:`ENUM` — exact sum ``Σ_v q_η(v) F(v)`` over a finite support.
* :class:`MVD` — measure-valued derivative ``c_η (F(z⁺) − F(z⁻))`` with
  ``∂_η q_η = c_η (q⁺ − q⁻)``, ``c_η ≥ 0`` and ``q^±`` probability laws (a *weak
  derivative*; Mohamed, Rosca, Figurnov & Mnih, "Monte Carlo Gradient Estimation in
  Machine Learning", JMLR 21(132), 2020, the section on measure-valued gradients). Then
  ``∂_η E_q[F] = c_η (E_{q⁺}[F] − E_{q⁻}[F])``, estimated with one draw from each side.

Measure-valued rules, per element (``η`` one parameter; ``F`` the objective as a function
of the site's value):

* Normal(μ, σ): ``∂_μ q = (1/(σ√(2π))) (law(μ + σW) − law(μ − σW))`` with
  ``W ~ Weibull(2, √2)`` (a Rayleigh(1)); ``∂_σ q = (1/σ) (DSMaxwell(μ, σ) − Normal(μ, σ))``
  with the double-sided Maxwell ``μ + σM``, ``M = ±√χ²₃``. Coupled: the ``−`` side of
  ``∂_μ`` reuses ``W``, that of ``∂_σ`` is ``μ + σUM`` (``U ~ U(0, 1)``; ``UM ~ N(0, 1)``).
* LogNormal(μ, σ), the law of ``eˣ`` with ``x ~ Normal(μ, σ)``: the Normal decompositions
  pushed through ``exp`` (``z^± = exp(x^±)``, same weights).
* Gamma(α, β) (β the rate). Since ``x q(x; α, β) = (α/β) q(x; α + 1, β)``,
  ``∂_β q = (α/β) (Gamma(α, β) − Gamma(α + 1, β))``: ``z⁺`` is the draw itself and, coupled,
  ``z⁻ = z + E/β`` with ``E ~ Exp(1)`` (``Gamma(α + 1) = Gamma(α) + Gamma(1)``).
  The concentration has no such two-Gamma form; the rule splits the score: with
  ``y = βz ~ Gamma(α, 1)``, ``s(y) = ∂_α log q = log y − ψ(α)`` has mean 0, so
  ``∂_α q = c_α (q⁺ − q⁻)`` with ``q^± ∝ q · (±s)⁺`` and
  ``c_α = E[s⁺] = E[s⁻] = −∂_a P(a, e^{ψ(α)})|_{a=α}`` (``P`` the regularised lower
  incomplete gamma function; for ``α ≥ 10`` a Gauss–Legendre quadrature of the same
  integral). In ``v = log(y/α)`` both ``q^±`` are log-concave; they are drawn *exactly* by
  rejection from the envelope ``min(1, e^{1−|x|})`` around their modes (Devroye, "A simple
  algorithm for generating random variates with a log-concave density", Computing 33,
  1984), acceptance ≥ 1/4 per proposal. The estimate is unbiased up to float rounding of
  ``c_α`` (relative ~1e-6 in float32); ``c_α`` is NaN, not wrong, where ``e^{ψ(α)}``
  underflows (``α ≲ 0.012`` in float32). Coupled: both sides use the same random numbers.
* Poisson(λ): ``∂_λ q = law(z + 1) − q`` (``z⁺ = z + 1``, ``z⁻ = z``).
* Bernoulli(p): ``∂_p q = δ₁ − δ₀`` (w.r.t. the probability, also for logits).
* Categorical(π = softmax θ): ``∂_{θ_i} q = π_i (δ_i − q)`` (``z⁺ = i``, ``z⁻ = z``).

The rules apply element-wise through ``Independent``, ``ExpandedDistribution`` (plates)
and ``MaskedDistribution`` (see :func:`elementwise`) and to batched parameters;
masked-out elements get weight 0. Any other law is an error at the site, naming the
estimators that do apply.

How a site gets its estimator, in order: its ``infer={"estimator": ...}`` entry
(``infer={"enumerate": "parallel"}`` means ENUM), then the :class:`estimators`
handler's map, then the default (REPARAM where ``has_rsample``, REINFORCE
otherwise). ``ppl.value_and_grad`` turns these choices into one unbiased
surrogate; see ``ppl/grad.py``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
from numpyro.primitives import Messenger

__all__ = ["Estimator", "REPARAM", "REINFORCE", "ENUM", "MVD", "estimators", "resolve"]


class Estimator:
    """Base class of per-site gradient estimators (a small, immutable description)."""

    name = "estimator"

    def check(self, site_name: str, fn: dist.Distribution) -> None:
        """Raise ``ValueError`` naming ``site_name`` when the pair is impossible."""

    def __repr__(self):
        return f"{type(self).__name__}()"

    def __eq__(self, other):
        return type(self) is type(other) and vars(self) == vars(other)

    def __hash__(self):
        return hash((type(self), tuple(sorted(map(str, vars(self).items())))))


class REPARAM(Estimator):
    """Pathwise (reparameterisation) gradient: the sample is a differentiable function of η.

    Example::

        g = estimators(guide, {"z": REPARAM()})
    """

    name = "reparam"

    def check(self, site_name, fn):
        if not fn.has_rsample:
            raise ValueError(
                f"REPARAM was chosen for site {site_name!r}, but {type(fn).__name__} has no "
                "reparameterised sampler (has_rsample=False); use REINFORCE(), ENUM() or MVD()."
            )


class REINFORCE(Estimator):
    """Score-function gradient ``(F − b) ∂ log q(z)`` with an optional baseline ``b``.

    :param baseline: ``None`` (b = 0); ``"mean"`` — a scalar ``b`` per site stored as the
        param ``"<site>_baseline"`` and trained online towards E[F] (with SGD at learning
        rate ``1 - decay`` it is exactly the decaying running mean); ``"loo"`` — leave one
        out over ``ppl.particles(K)``, ``b_k = mean_{j≠k} F_j`` (needs an objective whose
        value keeps the particle axis, like ``elbo`` inside ``particles``); or a callable
        ``baseline(*args, **kwargs) -> array`` broadcastable to the site's batch shape,
        which may use ``numpyro.param`` (a learned control variate, trained by regression
        on the learning signal).
    :param float decay: the nominal decay of the ``"mean"`` baseline (documentation of the
        SGD equivalence; the learned mean itself follows the optimiser).

    Example::

        g = estimators(guide, {"c": REINFORCE(baseline="mean")})
    """

    name = "reinforce"

    def __init__(self, baseline: None | str | Callable = None, decay: float = 0.9):
        if not (baseline is None or baseline in ("mean", "loo") or callable(baseline)):
            raise ValueError(
                f"REINFORCE(baseline=...) expected None, 'mean', 'loo' or a callable, "
                f"got {baseline!r}"
            )
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"REINFORCE(decay=...) expected a value in [0, 1), got {decay}")
        self.baseline = baseline
        self.decay = decay

    def __repr__(self):
        return f"REINFORCE(baseline={self.baseline!r})"


class ENUM(Estimator):
    """Exact enumeration of a finite support: ``E[F] = Σ_v q_η(v) F(v)``.

    Elements along plates that the objective's value keeps (``keep_plates``) are
    enumerated at once; other elements (event dimensions, particles reduced by a
    log-mean-exp) get one replay per element and value.

    Example::

        g = estimators(guide, {"c": ENUM()})
    """

    name = "enum"

    def check(self, site_name, fn):
        base = elementwise(fn)
        if not getattr(base, "has_enumerate_support", False):
            raise ValueError(
                f"ENUM was chosen for site {site_name!r}, but {type(base).__name__} has no "
                "finite enumerable support."
            )


class MVD(Estimator):
    """Measure-valued derivative ``c_η (F(z⁺) − F(z⁻))`` (primal-only replays).

    Rules (formulas in the module docstring): Normal and LogNormal (loc: Weibull(2, √2)
    coupling ``μ ± σW``; scale: double-sided Maxwell ``q⁺`` and, when ``coupled``,
    ``q⁻ = μ + σ U M``; LogNormal exponentiates both), Gamma (rate: ``Gamma(α, β)`` vs
    ``Gamma(α + 1, β)``; concentration: the positive and negative parts of the score,
    drawn by exact rejection), Poisson (``F(z + 1) − F(z)`` w.r.t. the rate), Bernoulli
    (``F(1) − F(0)`` w.r.t. the probability) and Categorical (``π_i (F(i) − F(z))`` w.r.t.
    logit i). They apply through ``Independent``, ``ExpandedDistribution`` (plates) and
    ``MaskedDistribution`` wrappers, nested in any order, and to batched parameters;
    masked-out elements contribute nothing to the gradient (as with REINFORCE, whose score
    is masked).

    :param bool coupled: share randomness between the ``±`` sides (lower variance).

    Example::

        g = estimators(guide, {"z": MVD()})
    """

    name = "mvd"

    def __init__(self, coupled: bool = True):
        self.coupled = bool(coupled)

    def check(self, site_name, fn):
        law, _ = _view(fn)
        if not isinstance(law, _MVD_TYPES):
            raise ValueError(
                f"MVD was chosen for site {site_name!r}, but there is no measure-valued rule "
                f"for {_describe(fn)} (rules exist for {_MVD_FAMILIES}); estimators that "
                f"apply to it: {', '.join(_applicable(fn))}."
            )

    def __repr__(self):
        return f"MVD(coupled={self.coupled})"


_BY_NAME = {"reparam": REPARAM, "reinforce": REINFORCE, "enum": ENUM, "mvd": MVD}


def _as_estimator(value, site_name) -> Estimator:
    if isinstance(value, Estimator):
        return value
    if isinstance(value, str) and value in _BY_NAME:
        return _BY_NAME[value]()
    raise ValueError(
        f"site {site_name!r}: unknown estimator {value!r}; expected one of "
        f"{sorted(_BY_NAME)} or an instance of REPARAM/REINFORCE/ENUM/MVD"
    )


def resolve(msg) -> Estimator:
    """The estimator of a sample-site message (``infer`` entry, else the default).

    Default: REPARAM where ``msg["fn"].has_rsample``, REINFORCE otherwise.
    """
    infer = msg.get("infer") or {}
    if "estimator" in infer:
        est = _as_estimator(infer["estimator"], msg["name"])
    elif infer.get("enumerate") == "parallel":
        est = ENUM()
    elif msg["fn"].has_rsample:
        est = REPARAM()
    else:
        est = REINFORCE()
    est.check(msg["name"], msg["fn"])
    return est


class estimators(Messenger):
    """Choose the gradient estimator of sample sites by name or predicate.

    ``mapping`` is a dict ``{site name or predicate(msg) -> estimator}`` or a callable
    ``msg -> estimator | None``. An estimator is an instance (``MVD()``) or its name
    (``"mvd"``). A site's own ``infer={"estimator": ...}`` wins over the mapping. A name
    in the mapping that the program never samples is an error naming it.

    :param fn: a NumPyro program (model or guide).
    :param mapping: the choice of estimators.

    Example::

        >>> import jax, numpyro, numpyro.distributions as dist
        >>> from numpyro.handlers import seed, trace
        >>> from ppl.transforms import estimators, REINFORCE
        >>> def guide():
        ...     numpyro.sample("c", dist.Bernoulli(0.3))
        >>> tr = trace(seed(estimators(guide, {"c": REINFORCE()}), 0)).get_trace()
        >>> tr["c"]["infer"]["estimator"]
        REINFORCE(baseline=None)
    """

    def __init__(self, fn=None, mapping: Mapping | Callable | None = None):
        if mapping is None:
            mapping = {}
        if not (isinstance(mapping, Mapping) or callable(mapping)):
            raise TypeError(
                f"estimators(mapping=...) expected a dict or a callable, got {type(mapping)}"
            )
        if isinstance(mapping, Mapping):
            for key, value in mapping.items():
                if not (isinstance(key, str) or callable(key)):
                    raise TypeError(
                        f"estimators mapping keys must be site names or predicates, got {key!r}"
                    )
                _as_estimator(value, key)
        self.mapping = mapping
        self._seen: set[str] = set()
        super().__init__(fn)

    def __call__(self, *args, **kwargs):
        self._seen = set()
        out = super().__call__(*args, **kwargs)
        if isinstance(self.mapping, Mapping):
            names = {k for k in self.mapping if isinstance(k, str)}
            missing = sorted(names - self._seen)
            if missing:
                raise ValueError(
                    f"estimators: site(s) {missing} in the estimator map are not sample "
                    f"sites of {getattr(self.fn, '__name__', self.fn)!r}; it samples "
                    f"{sorted(self._seen)}"
                )
        return out

    def process_message(self, msg):
        if msg["type"] != "sample" or msg["is_observed"]:
            return
        name = msg["name"]
        self._seen.add(name)
        infer = msg.get("infer") or {}
        if "estimator" in infer:
            return
        choice = None
        if isinstance(self.mapping, Mapping):
            if name in self.mapping:
                choice = self.mapping[name]
            else:
                for key, value in self.mapping.items():
                    if callable(key) and key(msg):
                        choice = value
                        break
        else:
            choice = self.mapping(msg)
        if choice is not None:
            msg["infer"] = {**infer, "estimator": _as_estimator(choice, name)}


# ---------------------------------------------------------------------------
# element-wise view of a distribution and measure-valued rules
# ---------------------------------------------------------------------------

_WRAPPERS = (dist.Independent, dist.MaskedDistribution, dist.ExpandedDistribution)


def _bcast(x, shape):
    return jnp.broadcast_to(jnp.asarray(x), tuple(shape))


def _broadcast_law(law: dist.Distribution, shape) -> dist.Distribution:
    """``law`` with batch shape ``shape``.

    For the families MVD has rules for, a fresh distribution of the same law with every
    parameter broadcast to ``shape`` (``Chi2`` becomes the equal ``Gamma(df/2, 1/2)``,
    ``OrderedLogistic`` the equal ``CategoricalProbs``); for any other law ``law.expand``.
    """
    shape = tuple(shape)
    if isinstance(law, dist.Normal):
        return dist.Normal(_bcast(law.loc, shape), _bcast(law.scale, shape))
    if isinstance(law, dist.LogNormal):
        return dist.LogNormal(_bcast(law.loc, shape), _bcast(law.scale, shape))
    if isinstance(law, dist.Gamma):
        return dist.Gamma(_bcast(law.concentration, shape), _bcast(law.rate, shape))
    if isinstance(law, dist.Poisson):
        return dist.Poisson(_bcast(law.rate, shape), is_sparse=law.is_sparse)
    if isinstance(law, dist.BernoulliLogits):
        return dist.BernoulliLogits(_bcast(law.logits, shape))
    if isinstance(law, dist.BernoulliProbs):
        return dist.BernoulliProbs(_bcast(law.probs, shape))
    if isinstance(law, dist.CategoricalLogits):
        return dist.CategoricalLogits(_bcast(law.logits, shape + jnp.shape(law.logits)[-1:]))
    if isinstance(law, dist.CategoricalProbs):
        return dist.CategoricalProbs(_bcast(law.probs, shape + jnp.shape(law.probs)[-1:]))
    if shape == tuple(law.batch_shape):
        return law
    return law.expand(shape)


def _view(fn: dist.Distribution):
    """``(law, mask)``: the element-wise law of ``fn`` and its mask (``None``: no mask).

    ``law`` has batch shape ``E = fn.batch_shape + <reinterpreted event dims>``; ``mask`` is
    a boolean array of shape ``E`` (``False`` where a ``MaskedDistribution`` masks out).
    """
    if isinstance(fn, dist.Independent):
        return _view(fn.base_dist)
    if isinstance(fn, (dist.MaskedDistribution, dist.ExpandedDistribution)):
        law, mask = _view(fn.base_dist)
        extra = tuple(law.batch_shape)[len(fn.base_dist.batch_shape) :]
        shape = tuple(fn.batch_shape) + extra
        if shape != tuple(law.batch_shape):
            law = _broadcast_law(law, shape)
        if isinstance(fn, dist.MaskedDistribution) and fn._mask is not True:
            m = _bcast(fn._mask, fn.batch_shape)
            m = m.reshape(m.shape + (1,) * len(extra))
            mask = m if mask is None else mask & m
        if mask is not None:
            mask = _bcast(mask, shape)
        return law, mask
    return fn, getattr(fn, "_ppl_mask", None)


def _describe(fn: dist.Distribution) -> str:
    """``"Beta inside ExpandedDistribution inside Independent"`` for nested wrappers."""
    outer = []
    while isinstance(fn, _WRAPPERS):
        outer.append(type(fn).__name__)
        fn = fn.base_dist
    return " inside ".join([type(fn).__name__] + outer[::-1])


def _applicable(fn: dist.Distribution) -> list[str]:
    """The estimators that apply to ``fn`` other than MVD (REINFORCE always does)."""
    names = ["REPARAM"] if fn.has_rsample else []
    if getattr(elementwise(fn), "has_enumerate_support", False):
        names.append("ENUM")
    return names + ["REINFORCE"]


def elementwise(fn: dist.Distribution) -> dist.Distribution:
    """The same law with reinterpreted event dimensions turned back into batch dimensions.

    ``Independent`` and ``MaskedDistribution`` wrappers are removed and
    ``ExpandedDistribution`` is resolved, so that ``log_prob`` is element-wise: the result
    has batch shape ``fn.batch_shape + <reinterpreted event dims>``. For the families with
    a measure-valued rule (Normal, LogNormal, Gamma, Poisson, Bernoulli, Categorical) the
    result is a distribution of that family with its parameters broadcast to that shape
    (never an ``ExpandedDistribution``); other laws are ``expand``-ed. The log density
    ignores masks (as the law of the draw does); for a masked site of a family with a rule,
    the mask broadcast to the batch shape rides along as the attribute ``_ppl_mask``, which
    :func:`mvd_rule` reads.

    Example::

        >>> import numpyro.distributions as dist
        >>> fn = dist.Normal(0.0, 1.0).expand([3]).mask(False).to_event(1)
        >>> el = elementwise(fn)
        >>> type(el).__name__, el.batch_shape, el.loc.shape, el._ppl_mask.tolist()
        ('Normal', (3,), (3,), [False, False, False])
    """
    law, mask = _view(fn)
    if mask is not None and isinstance(law, _MVD_TYPES):
        law = _broadcast_law(law, law.batch_shape)  # a fresh object: never tag the caller's
        law._ppl_mask = mask
    return law


_MVD_TYPES = (
    dist.Normal,
    dist.LogNormal,
    dist.Gamma,
    dist.BernoulliProbs,
    dist.BernoulliLogits,
    dist.CategoricalProbs,
    dist.CategoricalLogits,
    dist.Poisson,
)
_MVD_FAMILIES = "Normal, LogNormal, Gamma, Poisson, Bernoulli and Categorical"

sg = jax.lax.stop_gradient


def _normal_terms(loc, scale, shape, key, coupled):
    k1, k2, k3, k4, k5 = jax.random.split(key, 5)
    # loc: ∂_μ N = (1/(σ√2π)) (Rayleigh⁺ − Rayleigh⁻), W ~ Weibull(2, √2) = Rayleigh(1)
    w = jnp.sqrt(-2.0 * jnp.log(jax.random.uniform(k1, shape, minval=1e-12)))
    w_minus = (
        w if coupled else jnp.sqrt(-2.0 * jnp.log(jax.random.uniform(k4, shape, minval=1e-12)))
    )
    c_loc = 1.0 / (scale * math.sqrt(2.0 * math.pi))
    # scale: ∂_σ N = (1/σ)(Maxwell − N); M = ±√χ²₃, and U·M ~ N(0, 1)
    m = jnp.sqrt(jax.random.gamma(k2, 1.5, shape) * 2.0)
    m = m * jnp.where(jax.random.bernoulli(k3, 0.5, shape), 1.0, -1.0)
    if coupled:
        n = jax.random.uniform(k5, shape) * m
    else:
        n = jax.random.normal(k5, shape)
    return [
        (loc, sg(c_loc), sg(loc + scale * w), sg(loc - scale * w_minus)),
        (scale, sg(1.0 / scale), sg(loc + scale * m), sg(loc + scale * n)),
    ]


# --- Gamma shape: the Hahn–Jordan split of the score, drawn by exact rejection -----------

_GL_X, _GL_W = np.polynomial.legendre.leggauss(32)
_DELTA = 0.01  # slack of the rejection envelope, in log units (covers float rounding)


def _expm1_minus_x(v):
    """``exp(v) − 1 − v`` without cancellation near 0."""
    series = v * v * (1 / 2 + v * (1 / 6 + v * (1 / 24 + v * (1 / 120 + v * (1 / 720 + v / 5040)))))
    return jnp.where(jnp.abs(v) < 0.1, series, jnp.expm1(v) - v)


def _gamma_shape_constants(alpha):
    """``(m, L, c)`` for ``v = log(y/α)``, ``y ~ Gamma(α, 1)``.

    ``v`` has density ``exp(α(1 + v − eᵛ) − L)`` with ``L = log Γ(α) − α log α + α``, mean
    ``m = ψ(α) − log α``, and ``c = E[(v − m)⁺] = E[(m − v)⁺]``. For ``α < 10``: ``c`` is
    ``−∂_a P(a, x)`` at ``a = α, x = e^{ψ(α)}`` (``P`` the regularised lower incomplete gamma
    function; NaN where ``e^{ψ(α)}`` underflows, ``α ≲ 0.012`` in float32); for ``α ≥ 10``
    Stirling/asymptotic series for ``m`` and ``L`` and a 32-point Gauss–Legendre rule for
    ``c`` over ``v − m ∈ [0, 10/√α]`` (relative error ~1e-6 in float32).
    """
    big = alpha >= 10.0
    ab = jnp.where(big, alpha, 10.0)
    inv = 1.0 / ab
    inv2 = inv * inv
    m_big = -inv / 2 - inv2 / 12 + inv2 * inv2 / 120 - inv2 * inv2 * inv2 / 252
    l_big = -0.5 * jnp.log(ab) + 0.5 * math.log(2 * math.pi) + inv / 12 - inv * inv2 / 360
    l_big = l_big + inv * inv2 * inv2 / 1260
    t = 5.0 * (jnp.asarray(_GL_X, alpha.dtype) + 1.0)
    w = 5.0 * jnp.asarray(_GL_W, alpha.dtype)
    t = t.reshape(t.shape + (1,) * alpha.ndim)
    w = w.reshape(w.shape + (1,) * alpha.ndim)
    dens = jnp.exp(-ab * _expm1_minus_x(m_big + t / jnp.sqrt(ab)) - l_big)
    c_big = jnp.sum(w * dens * t, axis=0) / ab
    a_s = jnp.where(big, 1.0, alpha)
    psi = jax.scipy.special.digamma(a_s)
    m_small = psi - jnp.log(a_s)
    l_small = jax.scipy.special.gammaln(a_s) - a_s * jnp.log(a_s) + a_s
    x = jnp.exp(psi)
    c_small = jnp.where(x > 0, -jax.lax.igamma_grad_a(a_s, x), jnp.nan)
    pick = lambda b, s: jnp.where(big, b, s)
    return pick(m_big, m_small), pick(l_big, l_small), pick(c_big, c_small)


def _bisect(dh, lo, hi, iters=64):
    """The root of a decreasing ``dh`` in ``[lo, hi]`` (``dh(lo) > 0 > dh(hi)``)."""

    def body(_, b):
        lo, hi = b
        mid = 0.5 * (lo + hi)
        up = dh(mid) > 0
        return jnp.where(up, mid, lo), jnp.where(up, hi, mid)

    lo, hi = jax.lax.fori_loop(0, iters, body, (lo, hi))
    return 0.5 * (lo + hi)


def _log_concave_rejection(key, log_rel, mode, scale, shape, max_iter=1000):
    """Exact draws from a log-concave density ``f`` with mode ``mode`` (Devroye, 1984).

    ``log_rel(v) = log f(v) − log f(mode)``; ``scale ≤ f(mode)``. With ``x = (v − mode) ·
    scale``, ``f(v)/f(mode) ≤ min(1, e^{1−|x|})`` (log-concavity and unit mass), so ``x`` is
    proposed from that envelope (uniform on [−1, 1] or ``±(1 + Exp(1))``, each half the
    time) and accepted when ``V e^{δ} min(1, e^{1−|x|}) ≤ f(v)/f(mode)``; the slack
    ``δ = 0.01`` keeps the envelope above ``f`` under float rounding of ``mode`` and
    ``scale``. Acceptance ≥ ``e^{−δ}/4`` per proposal; an element still rejected after
    ``max_iter`` rounds (probability < 1e-100 for finite inputs) is NaN.
    """
    tiny = jnp.finfo(mode.dtype).tiny

    def cond(state):
        i, _, done, _ = state
        return (i < max_iter) & ~jnp.all(done)

    def body(state):
        i, key, done, out = state
        key, k1, k2, k3, k4, k5 = jax.random.split(key, 6)
        u = jax.random.uniform(k1, shape, mode.dtype, minval=-1.0, maxval=1.0)
        sign = jnp.where(jax.random.bernoulli(k2, 0.5, shape), 1.0, -1.0)
        tail = sign * (1.0 + jax.random.exponential(k3, shape, mode.dtype))
        x = jnp.where(jax.random.bernoulli(k4, 0.5, shape), tail, u)
        v = mode + x / scale
        log_u = jnp.log(jax.random.uniform(k5, shape, mode.dtype, minval=tiny))
        ok = ~done & (log_u + jnp.minimum(0.0, 1.0 - jnp.abs(x)) + _DELTA <= log_rel(v))
        return i + 1, key, done | ok, jnp.where(ok, v, out)

    init = (0, key, jnp.zeros(shape, bool), jnp.zeros(shape, mode.dtype))
    _, _, done, out = jax.lax.while_loop(cond, body, init)
    return jnp.where(done, out, jnp.nan)


def _gamma_shape_sides(alpha, key, coupled):
    """``(c, v⁺, v⁻)``: ``∂_α Gamma(α, 1) = c (q⁺ − q⁻)`` in ``v = log(y/α)``.

    ``q^±(v) ∝ p(v) (±(v − m))⁺`` with ``p`` the density of ``v`` (see
    :func:`_gamma_shape_constants`); both are log-concave and are drawn exactly by
    :func:`_log_concave_rejection` around their modes (found by bisection on
    ``α(1 − eᵛ) + 1/(v − m) = 0``, one root on each side of ``m``). ``coupled`` shares
    the random numbers of the two samplers.
    """
    shape = alpha.shape
    m, big_l, c = _gamma_shape_constants(alpha)
    dh = lambda v: alpha * (1.0 - jnp.exp(v)) + 1.0 / (v - m)
    mode_plus = _bisect(dh, m, jnp.maximum(m, 0.0) + 2.0 / jnp.sqrt(alpha))
    mode_minus = _bisect(dh, m - 2.0 / (alpha * -jnp.expm1(m)), m)
    k_plus, k_minus = jax.random.split(key)
    if coupled:
        k_minus = k_plus

    def side(mode, k):
        def log_rel(v):
            ratio = (v - m) / (mode - m)
            log_ratio = jnp.where(ratio > 0, jnp.log(jnp.where(ratio > 0, ratio, 1.0)), -jnp.inf)
            return -alpha * (_expm1_minus_x(v) - _expm1_minus_x(mode)) + log_ratio

        log_f_mode = -alpha * _expm1_minus_x(mode) - big_l + jnp.log(jnp.abs(mode - m)) - jnp.log(c)
        scale = jnp.exp(log_f_mode - _DELTA)
        return _log_concave_rejection(k, log_rel, mode, scale, shape)

    return c, side(mode_plus, k_plus), side(mode_minus, k_minus)


def _positive(z):
    return jnp.maximum(z, jnp.finfo(z.dtype).tiny)


def mvd_rule(base: dist.Distribution, z, key, coupled: bool = True):
    """Measure-valued decomposition of ``∂_η q_η`` for an element-wise distribution.

    :param base: an element-wise distribution (see :func:`elementwise`), batch shape ``E``,
        or a site's distribution itself (wrappers are resolved the same way).
    :param z: the sampled value, shape ``E + event_shape``.
    :param key: PRNG key for the ``±`` samples.
    :param bool coupled: share randomness between the ``±`` sides.
    :returns: a list of ``(eta, c, z_plus, z_minus)``: ``eta`` a differentiable parameter
        array broadcast to ``E``; ``c`` the weight ``c_η`` (broadcastable to ``E``, zero
        where the site is masked out); ``z_plus`` and ``z_minus`` values of the shape of
        ``z`` (``None`` means "the sample itself"). The unbiased estimate of ``∂_eta E[F]``
        is ``c (F(z⁺) − F(z⁻))``.
    :raises ValueError: for a law without a rule.
    """
    law, mask = _view(base)
    terms = _rule(law, z, key, coupled)
    if mask is None:
        return terms
    return [(eta, jnp.where(mask, c, 0.0), zp, zm) for eta, c, zp, zm in terms]


def _rule(law, z, key, coupled):
    shape = tuple(law.batch_shape)
    if isinstance(law, dist.Normal):
        return _normal_terms(_bcast(law.loc, shape), _bcast(law.scale, shape), shape, key, coupled)
    if isinstance(law, dist.LogNormal):
        terms = _normal_terms(_bcast(law.loc, shape), _bcast(law.scale, shape), shape, key, coupled)
        return [(eta, c, jnp.exp(zp), jnp.exp(zm)) for eta, c, zp, zm in terms]
    if isinstance(law, dist.Gamma):
        alpha = _bcast(law.concentration, shape)
        rate = _bcast(law.rate, shape)
        a, b = sg(alpha), sg(rate)
        k_rate, k_shape = jax.random.split(key)
        # rate: ∂_β Gamma(α, β) = (α/β)(Gamma(α, β) − Gamma(α + 1, β)); coupled: z⁻ = z + E/β
        if coupled:
            z_minus = sg(z) + jax.random.exponential(k_rate, shape, z.dtype) / b
        else:
            z_minus = _positive(jax.random.gamma(k_rate, a + 1.0, shape, z.dtype) / b)
        # shape: ∂_α Gamma(α, β) = c_α (q⁺ − q⁻), z = (α/β) e^v with v ~ q^±
        c_a, v_plus, v_minus = _gamma_shape_sides(a, k_shape, coupled)
        to_z = lambda v: _positive((a / b) * jnp.exp(v)).astype(z.dtype)
        return [(rate, a / b, None, z_minus), (alpha, c_a, to_z(v_plus), to_z(v_minus))]
    if isinstance(law, (dist.BernoulliProbs, dist.BernoulliLogits)):
        probs = _bcast(law.probs, shape)
        ones = jnp.ones(shape, dtype=z.dtype)
        return [(probs, jnp.ones(shape), ones, jnp.zeros_like(ones))]
    if isinstance(law, (dist.CategoricalProbs, dist.CategoricalLogits)):
        logits = _bcast(law.logits, shape + jnp.shape(law.logits)[-1:])
        probs = sg(jax.nn.softmax(logits, axis=-1))
        num = logits.shape[-1]
        return [
            (logits[..., i], probs[..., i], jnp.full(shape, i, dtype=z.dtype), None)
            for i in range(num)
        ]
    if isinstance(law, dist.Poisson):
        rate = _bcast(law.rate, shape)
        return [(rate, jnp.ones(shape), z + 1, None)]
    raise ValueError(
        f"no measure-valued rule for {type(law).__name__}; rules exist for {_MVD_FAMILIES}"
    )
