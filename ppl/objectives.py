"""Library objectives, each a few lines of the DSL (all **maximised**).

``elbo`` and ``sleep_phi`` are objectives used as they are; the others are factories
that return an objective. Every objective has the signature
``objective(model, guide, *args, **kwargs) -> array`` (see ``ppl/dsl.py`` for what the
returned array means).
"""

from __future__ import annotations

import inspect

import jax.numpy as jnp

from ppl.dsl import check_count, log_density, logmeanexp, particles, sample_trace
from ppl.marginal import marginal, normalize

__all__ = [
    "elbo",
    "iwelbo",
    "renyi",
    "hvi",
    "iwhvi",
    "diwhvi",
    "sivi",
    "wake_theta",
    "wake_phi",
    "sleep_phi",
]


def _log_weights(model, guide, args, kwargs, keep_plates=True):
    tr = sample_trace(guide, *args, **kwargs)
    log_p = log_density(model, tr, *args, keep_plates=keep_plates, **kwargs)
    return log_p - log_density(guide, tr, *args, keep_plates=keep_plates, **kwargs)


def elbo(model, guide, *args, **kwargs):
    """ELBO ``E_q[log p(x, z) − log q(z)]`` (one particle; wrap in ``ppl.particles(K)``).

    Returns the log weight per element of every plate some site is in, terms outside a
    plate spread evenly over its elements (``log_density(..., keep_plates="spread")``), so
    that a score-function site only sees the costs of its own data point and of the sites
    that depend on it, as in NumPyro's ``TraceGraph_ELBO``; ``[K, ...]`` in particles.

    Example::

        f = ppl.value_and_grad(ppl.objectives.elbo, model, guide)
    """
    plain = not any(hasattr(fn, "_ppl_log_density") for fn in (model, guide))
    return _log_weights(model, guide, args, kwargs, "spread" if plain else True)


def iwelbo(num_particles: int):
    """Importance-weighted ELBO ``E[log (1/K) Σ_k w_k]`` (IWAE), per local data point.

    :param int num_particles: K ≥ 1 (K = 1 is the ELBO).

    Example::

        f = ppl.value_and_grad(ppl.objectives.iwelbo(5), model, guide)
    """
    num = check_count("iwelbo(num_particles)", num_particles)

    def iwelbo_objective(model, guide, *args, **kwargs):
        with particles(num):
            log_w = _log_weights(model, guide, args, kwargs)
        return logmeanexp(log_w, axis=0)

    return iwelbo_objective


def renyi(alpha: float, num_particles: int):
    """Rényi-α bound ``E[(1/(1−α)) log (1/K) Σ_k w_k^{1−α}]``; α = 1 is the ELBO, α = 0 IWELBO.

    :param float alpha: the order α (α < 1 gives a bound above the ELBO).
    :param int num_particles: K ≥ 1 (with K = 1 it equals the ELBO for every α).

    Example::

        f = ppl.value_and_grad(ppl.objectives.renyi(0.5, 5), model, guide)
    """
    num = check_count("renyi(num_particles)", num_particles)
    alpha = float(alpha)
    if not jnp.isfinite(alpha):
        raise ValueError(f"renyi(alpha) must be finite, got {alpha}")

    def renyi_objective(model, guide, *args, **kwargs):
        with particles(num):
            log_w = _log_weights(model, guide, args, kwargs)
        if alpha == 1.0:
            return log_w
        return logmeanexp((1.0 - alpha) * log_w, axis=0) / (1.0 - alpha)

    return renyi_objective


def _reverse_and_count(first, second, default_count, what):
    """Accept ``(num_inner, reverse)`` or ``(reverse, num_inner)`` (issue vs spec order)."""
    if callable(first) or (first is None and second is not None and not callable(second)):
        reverse, count = first, second if second is not None else default_count
    else:
        count, reverse = (first if first is not None else default_count), second
    return reverse, check_count(f"{what}(num_inner)", count)


def hvi(*args, reverse=None, **kwargs):
    """Hierarchical VI: the ELBO of ``marginal(guide, reverse=r, num_inner=1)``.

    ``hvi(reverse)`` (or ``hvi()``, reverse = the guide's own prior on its auxiliaries)
    returns an objective; ``hvi(model, guide, *args)`` evaluates it with reverse=None.

    Example::

        f = ppl.value_and_grad(ppl.objectives.hvi(reverse), model, guide)
    """
    if len(args) >= 2:  # used directly as an objective
        return iwhvi(1)(*args, **kwargs)
    if kwargs:
        raise TypeError(f"hvi() got unexpected keyword arguments {sorted(kwargs)}")
    return iwhvi(1, reverse if not args else args[0])


def iwhvi(num_inner=None, reverse=None):
    """IWHVI: the ELBO with ``log q(z)`` replaced by an m-sample importance estimate.

    ``log q̂ = log (1/m)[q(z,u₀)/r(u₀|z) + Σ_{j<m} q(z,u_j)/r(u_j|z)]`` with u₀ the
    auxiliary drawn with z and u_j ~ r(·|z); a lower bound for every m, tighter as m grows.

    :param int num_inner: m ≥ 1 (m = 1 is HVI). ``iwhvi(reverse, m)`` also works.
    :param reverse: ``reverse(z_values: dict, *args, **kwargs)`` sampling the auxiliary
        sites, or ``None`` for the guide's own prior on them (SIVI-style).

    Example::

        f = ppl.value_and_grad(ppl.objectives.iwhvi(5, reverse), model, guide)
    """
    reverse, m = _reverse_and_count(num_inner, reverse, 1, "iwhvi")

    def iwhvi_objective(model, guide, *args, **kwargs):
        return elbo(model, marginal(guide, reverse=reverse, num_inner=m), *args, **kwargs)

    return iwhvi_objective


def diwhvi(reverse=None, num_outer: int = 5, num_inner: int = 5):
    """Doubly importance-weighted HVI: IWELBO(n) over a marginal guide with m inner samples.

    Example::

        f = ppl.value_and_grad(ppl.objectives.diwhvi(reverse, 5, 5), model, guide)
    """
    n = check_count("diwhvi(num_outer)", num_outer)
    m = check_count("diwhvi(num_inner)", num_inner)
    outer = iwelbo(n)

    def diwhvi_objective(model, guide, *args, **kwargs):
        return outer(model, marginal(guide, reverse=reverse, num_inner=m), *args, **kwargs)

    return diwhvi_objective


def sivi(num_inner: int):
    """Semi-implicit VI: ``E[log p(x,z) − log (1/(m+1)) Σ_{j=0}^{m} q(z|ψ_j)]``.

    ψ₀ generated z and ψ_1..ψ_m are fresh draws of the mixing distribution (the guide's
    own prior on its auxiliaries), i.e. IWHVI with the mixing prior as reverse model and
    m + 1 inner terms.

    :param int num_inner: m ≥ 1 fresh mixing draws.

    Example::

        f = ppl.value_and_grad(ppl.objectives.sivi(10), model, guide)
    """
    m = check_count("sivi(num_inner)", num_inner)
    return iwhvi(m + 1, None)


def wake_theta(num_particles: int):
    """Reweighted wake-sleep, wake phase for the model: maximise ``log p_θ(x, z*)``,
    z* resampled from K guide draws by self-normalised importance weights.

    Its expected θ-gradient is ``Σ_k w̄_k ∇θ log p(x, z_k)`` (the IWELBO θ-gradient). Use as
    ``{"model": wake_theta(K), "guide": wake_phi(K)}``.
    """
    num = check_count("wake_theta(num_particles)", num_particles)

    def wake_theta_objective(model, guide, *args, **kwargs):
        post = normalize(model, proposal=guide, num_particles=num)
        tr = sample_trace(post, *args, **kwargs)
        return log_density(model, tr, *args, **kwargs)

    return wake_theta_objective


def wake_phi(num_particles: int):
    """Reweighted wake-sleep, wake phase for the guide: maximise ``log q_φ(z*)`` with z*
    resampled as in :func:`wake_theta` (estimates −∇φ KL(p(·|x) ‖ q), biased for small K).
    """
    num = check_count("wake_phi(num_particles)", num_particles)

    def wake_phi_objective(model, guide, *args, **kwargs):
        post = normalize(model, proposal=guide, num_particles=num)
        tr = sample_trace(post, *args, **kwargs)
        return log_density(guide, tr, *args, **kwargs)

    return wake_phi_objective


def sleep_phi(model, guide, *args, **kwargs):
    """Sleep phase for the guide: draw ``(z, x) ~ p_θ`` and maximise ``log q_φ(z | x)``.

    The guide is called with the simulated value of each observed site passed in place of
    the guide's argument of the same name (e.g. ``guide(x)`` receives the simulated ``x``).
    """
    from ppl.marginal import sample_joint

    tr = sample_joint(model, *args, **kwargs)
    bound = inspect.signature(guide).bind_partial(*args, **kwargs)
    for name, value in tr.values.items():
        if name in bound.arguments and tr[name]["infer"].get("ppl_observed"):
            bound.arguments[name] = value
    return log_density(guide, tr, *bound.args, **bound.kwargs)
