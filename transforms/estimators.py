"""Per-site gradient estimators and the handler that assigns them.

An *estimator* decides how the derivative of an objective flows through one
``numpyro.sample`` site ``z ~ q_η`` (η the distribution's parameters):

* :class:`REPARAM` — pathwise, ``z = T(ε, η)``; needs ``fn.has_rsample``.
* :class:`REINFORCE` — score function, ``(F(z) − b) ∂ log q_η(z)`` with an optional
  baseline ``b`` (none, a learned running mean, leave-one-out over particles, or
  a user function).
* :class:`ENUM` — exact sum ``Σ_v q_η(v) F(v)`` over a finite support.
* :class:`MVD` — measure-valued derivative ``c_η (F(z⁺) − F(z⁻))`` with
  ``∂_η q_η = c_η (q⁺ − q⁻)``; rules for Normal, Bernoulli, Categorical, Poisson.

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

    Rules: Bernoulli (``F(1) − F(0)`` w.r.t. the probability), Categorical
    (``π_i (F(i) − F(z))`` w.r.t. logit i), Normal (loc: Weibull(2, √2) coupling
    ``μ ± σW``; scale: double-sided Maxwell ``q⁺`` and, when ``coupled``, ``q⁻ = μ + σ U M``)
    and Poisson (``F(z + 1) − F(z)`` w.r.t. the rate).

    :param bool coupled: share randomness between the ``±`` sides (lower variance).

    Example::

        g = estimators(guide, {"z": MVD()})
    """

    name = "mvd"

    def __init__(self, coupled: bool = True):
        self.coupled = bool(coupled)

    def check(self, site_name, fn):
        base = elementwise(fn)
        if not isinstance(base, _MVD_TYPES):
            raise ValueError(
                f"MVD was chosen for site {site_name!r}, but there is no measure-valued rule "
                f"for {type(base).__name__}; rules exist for Normal, Bernoulli, Categorical "
                "and Poisson."
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


def elementwise(fn: dist.Distribution) -> dist.Distribution:
    """The same law with reinterpreted event dimensions turned back into batch dimensions.

    ``Independent`` and ``MaskedDistribution`` wrappers are removed, ``ExpandedDistribution``
    is pushed down, so that ``log_prob`` is element-wise: ``batch_shape`` of the result is
    ``fn.batch_shape + <reinterpreted event dims>``.
    """
    if isinstance(fn, dist.Independent):
        return elementwise(fn.base_dist)
    if isinstance(fn, dist.MaskedDistribution):
        return elementwise(fn.base_dist)
    if isinstance(fn, dist.ExpandedDistribution):
        base = elementwise(fn.base_dist)
        extra = base.batch_shape[len(fn.base_dist.batch_shape) :]
        return base.expand(tuple(fn.batch_shape) + tuple(extra))
    return fn


_MVD_TYPES = (
    dist.Normal,
    dist.BernoulliProbs,
    dist.BernoulliLogits,
    dist.CategoricalProbs,
    dist.CategoricalLogits,
    dist.Poisson,
)


def mvd_rule(base: dist.Distribution, z, key, coupled: bool = True):
    """Measure-valued decomposition of ``∂_η q_η`` for an element-wise distribution.

    :param base: an element-wise distribution (see :func:`elementwise`), batch shape ``E``.
    :param z: the sampled value, shape ``E + event_shape``.
    :param key: PRNG key for the ``±`` samples.
    :returns: a list of ``(eta, c, z_plus, z_minus)``: ``eta`` a differentiable parameter
        array broadcast to ``E``; ``c`` the weight ``c_η`` (shape ``E``); ``z_plus`` and
        ``z_minus`` values of the shape of ``z`` (``z_minus=None`` means "the sample itself").
        The unbiased estimate of ``∂_eta E[F]`` is ``c (F(z⁺) − F(z⁻))``.
    """
    shape = base.batch_shape
    if isinstance(base, dist.Normal):
        loc = jnp.broadcast_to(base.loc, shape)
        scale = jnp.broadcast_to(base.scale, shape)
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
        zs = jax.lax.stop_gradient
        return [
            (loc, zs(c_loc), zs(loc + scale * w), zs(loc - scale * w_minus)),
            (scale, zs(1.0 / scale), zs(loc + scale * m), zs(loc + scale * n)),
        ]
    if isinstance(base, (dist.BernoulliProbs, dist.BernoulliLogits)):
        probs = jnp.broadcast_to(base.probs, shape)
        ones = jnp.ones(shape, dtype=z.dtype)
        return [(probs, jnp.ones(shape), ones, jnp.zeros_like(ones))]
    if isinstance(base, (dist.CategoricalProbs, dist.CategoricalLogits)):
        logits = jnp.broadcast_to(base.logits, shape + base.logits.shape[-1:])
        probs = jax.lax.stop_gradient(jax.nn.softmax(logits, axis=-1))
        num = logits.shape[-1]
        return [
            (logits[..., i], probs[..., i], jnp.full(shape, i, dtype=z.dtype), None)
            for i in range(num)
        ]
    if isinstance(base, dist.Poisson):
        rate = jnp.broadcast_to(base.rate, shape)
        return [(rate, jnp.ones(shape), z + 1, None)]
    raise ValueError(f"no measure-valued rule for {type(base).__name__}")
