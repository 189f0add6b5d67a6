"""Programs whose density is estimated: ``marginal`` (auxiliary variables integrated out
by an inner importance sampler) and ``normalize`` (self-normalised importance sampling).

Both are usable wherever a program is: :func:`ppl.sample_trace` draws from them and
:func:`ppl.log_density` scores them, with the estimator that keeps lower bounds lower
bounds (spec §1.3):

* a trace *sampled from* ``marginal(q, ...)`` carries ``log q̂`` built with the auxiliary
  ``u₀`` drawn together with ``z`` — unbiased for the reciprocal density, so ``−log q̂``
  never overstates ``−log q``;
* scoring ``marginal(q, ...)`` at an outside trace draws all ``m`` auxiliaries from the
  reverse model — unbiased for the density itself.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import jax
import jax.numpy as jnp
from jax.scipy.special import logsumexp

from ppl.dsl import (
    Trace,
    _run_program,
    check_count,
    current_run,
    natural_shape,
    replay_program,
    sample_trace,
    score,
    sum_log_prob,
)
from ppl.sparse import SparseTensor

__all__ = ["marginal", "normalize", "log_normalizer", "sample_joint"]


def _as_sites(latents: dict, template: OrderedDict | None = None) -> OrderedDict:
    """A minimal raw trace holding the sample sites ``latents`` (``{name: site dict}``) and
    the plate subsamples of ``template``."""
    sites = OrderedDict()
    for name, site in (template or {}).items():
        if site["type"] == "plate":
            sites[name] = site
    for name, site in latents.items():
        sites[name] = {**site, "type": "sample", "is_observed": False, "infer": {}}
    return sites


class _InnerPlate:
    """Temporarily activate the inner plate of ``size`` on a run."""

    def __init__(self, run, size):
        self.run, self.size = run, size

    def __enter__(self):
        if self.run.inner is not None:
            raise ValueError("marginal programs cannot be nested inside each other")
        self.run.inner = self.size

    def __exit__(self, *exc):
        self.run.inner = None


def _keep_plates(run):
    return True if run.setup.auto_plates else False


def _finish(run, log_q, keep_plates, register):
    """Turn a per-auto-plate-element estimate into what ``log_density`` was asked for."""
    if keep_plates == "spread" and set(run.setup.spread_plates) != set(run.setup.auto_plates):
        raise ValueError(
            "log_density(keep_plates='spread') of a marginal or normalised program: its "
            "estimate is per element of the plates enclosing every site "
            f"({sorted(run.setup.auto_plates)}), so it cannot be kept per element of "
            f"{sorted(set(run.setup.spread_plates) - set(run.setup.auto_plates))}; "
            "use keep_plates=True"
        )
    if keep_plates is False or keep_plates is None:
        if run.setup.auto_plates:
            rank = run.setup.batch_rank
            scale = math.prod(run.setup.plate_scales.get(p, 1.0) for p in run.setup.auto_plates)
            log_q = log_q.sum(axis=tuple(range(log_q.ndim - rank, log_q.ndim))) * scale
        return log_q
    if register:
        run.kept_plates = set(run.kept_plates or ()) | set(run.setup.auto_plates)
    if not run.setup.auto_plates:
        log_q = log_q.reshape(log_q.shape + (1,) * run.setup.batch_rank)
    return log_q


class marginal:
    """The marginal ``q(z) = ∫ q(z, u) du`` of a program over its auxiliary sites ``u``.

    The density is estimated by importance sampling with ``num_inner`` (= m) terms and a
    reverse model ``r(u | z)``:
    ``log q̂(z) = log (1/m) Σ_j q(z, u_j) / r(u_j | z)``. Sampled, the first term uses the
    ``u₀`` drawn with ``z`` (then ``E[1/q̂] = 1/q``); scored at an outside trace, all m
    come from ``r`` (then ``E[q̂] = q``). Estimates are per element of the plates that
    enclose every site (independent inner samplers per data point).

    :param fn: a NumPyro program sampling auxiliaries ``u`` and then the kept sites ``z``.
    :param keep: names of the sites to keep (default: the model's latent sites).
    :param reverse: ``reverse(z_values: dict, *args, **kwargs)``, a NumPyro program sampling
        the auxiliary sites given ``z``; ``None`` uses ``fn``'s own prior on the auxiliaries
        (semi-implicit VI).
    :param int num_inner: m ≥ 1.

    Example::

        def guide():
            u = numpyro.sample("u", dist.Normal(0, 1))
            numpyro.sample("z", dist.Normal(u, 0.5))

        def reverse(v):
            numpyro.sample("u", dist.Normal(v["z"] / 2, 0.6))

        q = ppl.marginal(guide, keep=["z"], reverse=reverse, num_inner=5)
        f = ppl.value_and_grad(ppl.objectives.elbo, model, q)
    """

    def __init__(self, fn, *, keep=None, reverse=None, num_inner: int = 1):
        if not callable(fn):
            raise TypeError(f"marginal(fn) expected a NumPyro program, got {type(fn).__name__}")
        if reverse is not None and not callable(reverse):
            raise TypeError(f"marginal(reverse=...) expected a program, got {type(reverse)}")
        self.fn = fn
        self.keep = None if keep is None else ((keep,) if isinstance(keep, str) else tuple(keep))
        self.reverse = reverse
        self.num_inner = check_count("marginal(num_inner)", num_inner)

    @property
    def _ppl_program(self):
        return self.fn

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)

    def _ppl_init_traces(self, rng_key, guide_trace, args, kwargs):
        """Traces whose params :func:`ppl.init_params` must create (the reverse model's)."""
        if self.reverse is None:
            return []
        from numpyro.handlers import seed, trace

        keep = set(self.keep or ())
        z = {
            k: s["value"]
            for k, s in guide_trace.items()
            if s["type"] == "sample" and not s["is_observed"] and (not keep or k in keep)
        }
        return [trace(seed(self.reverse, rng_key)).get_trace(z, *args, **kwargs)]

    def _split(self, run, tr: Trace):
        keep = self.keep if self.keep is not None else run.setup.model_latents
        latents = list(tr.latents)
        unknown = [k for k in (self.keep or ()) if k not in latents]
        if unknown:
            raise ValueError(
                f"marginal(keep=...): site(s) {unknown} are not latent sites of the program; "
                f"it samples {latents}"
            )
        kept = [n for n in latents if n in keep]
        return kept, [n for n in latents if n not in keep]

    def _log_reverse(self, run, z, aux_values, template, args, kwargs, fn_sites):
        """``log r(u | z)`` at given auxiliaries (the guide's own prior when reverse=None)."""
        if self.reverse is None:
            return sum_log_prob(run, fn_sites, _keep_plates(run), names=aux_values, register=False)
        sites = replay_program(
            run,
            self.reverse,
            _as_sites(aux_values, template),
            args,
            kwargs,
            what="the reverse model's trace",
            given=z,
        )
        return sum_log_prob(run, sites, _keep_plates(run), names=aux_values, register=False)

    def _inner_weights(self, run, z, template, count, args, kwargs):
        """``log q(z, u_j) − log r(u_j | z)`` for ``count`` fresh auxiliaries ``[count, ...]``."""
        kp = _keep_plates(run)
        with _InnerPlate(run, count):
            if self.reverse is None:
                drawn = _run_program(run, self.fn, args, kwargs)
                aux = {k: drawn[k] for k in drawn.latents if k not in z}
            else:
                drawn = _run_program(run, self.reverse, args, kwargs, given=z)
                aux = {k: drawn[k] for k in drawn.latents}
            joint = replay_program(run, self.fn, _as_sites({**z, **aux}, template), args, kwargs)
            if self.reverse is None:  # q(z, u) / q(u) = q(z | u)
                return sum_log_prob(run, joint, kp, names=z, register=False)
            log_q = sum_log_prob(run, joint, kp, register=False)
            return log_q - sum_log_prob(run, drawn.sites, kp, names=aux, register=False)

    @staticmethod
    def _combine(first, inner):
        """``log (1/m) Σ_j exp(w_j)`` over ``[first] + inner`` (first may be None)."""
        terms = [] if first is None else [jnp.broadcast_to(first, inner.shape[1:])[None]]
        stacked = jnp.concatenate(terms + [inner], axis=0) if inner is not None else terms[0]
        return logsumexp(stacked, axis=0) - math.log(stacked.shape[0])

    def _squeeze_lead(self, run, w):
        if run.particles is None:
            rank = run.setup.batch_rank if run.setup.auto_plates else 0
            return w.reshape(w.shape[w.ndim - rank :] if rank else ())
        return w

    def _ppl_sample_trace(self, run, args, kwargs):
        full = _run_program(run, self.fn, args, kwargs)
        kept, aux = self._split(run, full)
        z = {k: full[k] for k in kept}
        kp = _keep_plates(run)
        if not aux:
            w = sum_log_prob(run, full.sites, kp, register=False)
        else:
            u0 = {k: full[k] for k in aux}
            log_joint = sum_log_prob(run, full.sites, kp, register=False)
            w0 = log_joint - self._log_reverse(run, z, u0, full.sites, args, kwargs, full.sites)
            if self.num_inner == 1:
                w = w0
            else:
                inner = self._inner_weights(run, z, full.sites, self.num_inner - 1, args, kwargs)
                w = self._squeeze_lead(run, self._combine(w0, inner))
        sites = OrderedDict((k, s) for k, s in full.sites.items() if k not in aux)
        return Trace(sites, weights={id(self): w})

    def _ppl_log_density(self, run, trace, args, kwargs, keep_plates, register):
        if id(self) in getattr(trace, "weights", {}):
            w = trace.weights[id(self)]
        else:
            sites = trace.sites if isinstance(trace, Trace) else trace
            keep = self.keep if self.keep is not None else run.setup.model_latents
            z = {
                k: s
                for k, s in sites.items()
                if s["type"] == "sample" and not s["is_observed"] and k in keep
            }
            inner = self._inner_weights(run, z, sites, self.num_inner, args, kwargs)
            w = self._squeeze_lead(run, self._combine(None, inner))
        return _finish(run, w, keep_plates, register)


class normalize:
    """The normalised posterior of ``model`` by self-normalised importance sampling.

    Sampling draws K particles from ``proposal``, weights them by
    ``log p(x, z) − log q(z)`` and resamples one (per element of the plates enclosing every
    site) with probabilities ∝ weights; the resampled values carry no gradient (the RWS
    convention: weights act as constants). ``log Ẑ = log (1/K) Σ w`` is
    :func:`log_normalizer`.

    :param model: the unnormalised target (a NumPyro model with observations).
    :param proposal: a NumPyro program (or :class:`marginal`) over the model's latents.
    :param int num_particles: K ≥ 1.

    Example::

        def wake_phi(model, guide, *args):
            post = ppl.normalize(model, proposal=guide, num_particles=10)
            tr = ppl.sample_trace(post, *args)
            return ppl.log_density(guide, tr, *args)
    """

    def __init__(self, model, *, proposal, num_particles: int):
        if not callable(model) or not callable(proposal):
            raise TypeError("normalize(model, proposal=...) expects NumPyro programs")
        self.model, self.proposal = model, proposal
        self.num_particles = check_count("normalize(num_particles)", num_particles)

    @property
    def _ppl_program(self):
        return getattr(self.proposal, "_ppl_program", self.proposal)

    def _weights(self, run, args, kwargs):
        if run.particles is not None:
            raise ValueError("ppl.normalize cannot be used inside ppl.particles")
        run.particles = self.num_particles
        try:
            tr = sample_trace(self.proposal, *args, **kwargs)
            kp = _keep_plates(run)
            log_w = score(run, self.model, tr, args, kwargs, kp, register=False)
            log_w = log_w - score(run, self.proposal, tr, args, kwargs, kp, register=False)
        finally:
            run.particles = None
        return tr, log_w

    def _ppl_sample_trace(self, run, args, kwargs):
        tr, log_w = self._weights(run, args, kwargs)
        rank = run.setup.batch_rank
        logits = jax.lax.stop_gradient(log_w)
        if logits.ndim == 1:
            logits = logits.reshape(logits.shape + (1,) * rank)
        key = run.call_key(run.next_call())
        index = jax.random.categorical(key, logits, axis=0)  # [*plate dims]
        sites = OrderedDict()
        for name, site in tr.sites.items():
            if site["type"] != "sample" or site["is_observed"]:
                if site["type"] == "plate":
                    sites[name] = site
                continue
            value = site["value"]
            sparse = isinstance(value, SparseTensor)  # resample its active values only
            if sparse:
                sparse, value = value, value.values
            event = value.ndim - len(site["fn"].batch_shape)
            axis = len(site["fn"].batch_shape) - rank - 1
            idx = jnp.broadcast_to(index, site["fn"].batch_shape[axis + 1 :])
            idx = idx.reshape((1,) * (axis + 1) + idx.shape + (1,) * event)
            idx = jnp.broadcast_to(idx, value.shape[:axis] + (1,) + value.shape[axis + 1 :])
            picked = jnp.take_along_axis(value, idx, axis=axis).squeeze(axis)
            natural = natural_shape(run, name, site["value"])
            if natural is not None and math.prod(natural) == picked.size:
                picked = picked.reshape(natural)  # drop the padding the particle plate added
            if sparse is not False:
                picked = SparseTensor(sparse.idx, picked, sparse.dense_shape)
            sites[name] = {
                "type": "sample",
                "name": name,
                "value": jax.lax.stop_gradient(picked),
                "is_observed": False,
                "infer": dict(site.get("infer") or {}),
            }
        log_z = jax.scipy.special.logsumexp(log_w, axis=0) - math.log(self.num_particles)
        return Trace(sites, weights={("log_normalizer", id(self)): log_z})

    def _ppl_log_density(self, run, trace, args, kwargs, keep_plates, register):
        raise ValueError(
            "the density of ppl.normalize(...) is intractable; use log_normalizer for log Ẑ"
        )

    def log_normalizer(self, *args, keep_plates=True, **kwargs):
        """``log Ẑ = log (1/K) Σ_k w_k`` (per element of the common plates), E[Ẑ] = Z."""
        run = current_run("log_normalizer")
        _, log_w = self._weights(run, args, kwargs)
        log_z = jax.scipy.special.logsumexp(log_w, axis=0) - math.log(self.num_particles)
        return _finish(run, log_z if run.setup.auto_plates else log_z, keep_plates, True)


def log_normalizer(model, *args, proposal, num_particles: int, keep_plates=True, **kwargs):
    """``log Ẑ`` of ``normalize(model, proposal=..., num_particles=K)`` at ``args``.

    With ``num_particles=K`` this is exactly the IWELBO(K) integrand (K = 1: the ELBO).

    Example::

        def my_iwelbo(model, guide, *args):
            return ppl.log_normalizer(model, *args, proposal=guide, num_particles=5)
    """
    prog = normalize(model, proposal=proposal, num_particles=num_particles)
    return prog.log_normalizer(*args, keep_plates=keep_plates, **kwargs)


def sample_joint(model, *args, **kwargs) -> Trace:
    """Draw every site of ``model``, observed ones included (their data are ignored).

    Sites that were observed are marked ``site["infer"]["ppl_observed"] = True``.
    """
    run = current_run("sample_joint")
    return _run_program(run, model, args, kwargs, unobserve=True)
