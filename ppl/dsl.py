"""The objective DSL: sample a program's trace, score a program at a trace, particles.

An *objective* is a plain Python function ``objective(model, guide, *args, **kwargs)``
that calls the constructs below and returns an array: a scalar, or an array over the
plates it asked :func:`log_density` to keep (``keep_plates=True``), optionally with a
leading particle axis. Its value is the sum over the kept plates (times their
subsample scale) of the mean over the particle axis. ``ppl.value_and_grad`` runs the
objective and turns it into an unbiased gradient estimator (``ppl/grad.py``).

Constructs (all usable only while ``ppl.value_and_grad`` evaluates an objective):

* :func:`sample_trace` — run a program, sampling its latent sites with their chosen
  gradient estimators; returns a :class:`Trace`.
* :func:`log_density` — the log density of a program at a trace (observed sites scored,
  plates, ``mask``, ``scale`` and subsampling honoured).
* :func:`particles` — draw ``K`` independent copies of every site: each program inside
  the block is executed ``K`` times with ``jax.vmap`` (keys split per particle, as NumPyro's
  ``RenyiELBO`` does), so any model that runs once runs ``K`` times, and
  :func:`log_density` returns an array ``[K, ...]``.
* :func:`add_cost` — add a term to the objective's value.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections import OrderedDict
from collections.abc import Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpyro.distributions as dist
from jax.scipy.special import logsumexp
from numpyro.distributions import biject_to, constraints
from numpyro.distributions.batch_util import promote_batch_shape
from numpyro.handlers import replay, seed, trace
from numpyro.primitives import Messenger

from ppl.sparse import SparseTensor
from ppl.transforms.estimators import REPARAM, resolve

__all__ = [
    "Trace",
    "sample_trace",
    "log_density",
    "particles",
    "logmeanexp",
    "add_cost",
]

_RUNS: list[_Run] = []


class Setup(NamedTuple):
    """Static facts about a (model, guide) pair, found by tracing both once.

    ``batch_rank``: the number of batch dimensions any site has (plates and unplated batch
    dims), so particles go at ``-(batch_rank + 1)``. ``auto_plates``: plates enclosing every
    sample site of model and guide (``{name: dim}``). ``plate_scales``: ``{name: size /
    subsample_size}``. ``model_latents``, ``model_params``, ``guide_params``: site names.
    ``site_shapes``: ``{name: value shape}`` of every sample site outside particles.
    ``summed_sites``: model sites marked for enumeration that the guide does not sample
    (summed out exactly whenever ``model_program`` is scored, see :mod:`ppl.enum`).
    ``spread_plates``: ``{name: (dim, subsample size)}``, the plates that
    ``log_density(..., keep_plates="spread")`` keeps (every plate some sample site is in,
    each at its own dim). ``nonlocal_plates``: ``{site name: plate names}``, the plates of a
    non-reparameterised guide site along which some log-density term outside the plate
    depends on the site's value (found by provenance tracking), so that the site's elements
    along them cannot each be given their own learning signal.
    """

    batch_rank: int
    auto_plates: dict
    plate_scales: dict
    model_latents: tuple
    model_params: tuple
    guide_params: tuple
    site_shapes: dict = {}
    summed_sites: tuple = ()
    model_program: object = None
    spread_plates: dict = {}
    nonlocal_plates: dict = {}


class _Run:
    """The state of one execution of an objective body (a fresh one per replay)."""

    def __init__(self, params, rng_key, setup: Setup, forced: Mapping):
        self.params = params
        self.rng_key = rng_key
        self.setup = setup
        self.forced = forced
        self.tape: list[SiteRecord] = []
        self.num_calls = 0
        self.particles: int | None = None
        self.inner: int | None = None
        self.kept_plates: set[str] | None = None  # None: no log_density kept plates
        self.costs: list = []
        self.extra = 0.0  # scalar surrogate terms with zero value (baseline regression)

    def next_call(self) -> int:
        self.num_calls += 1
        return self.num_calls - 1

    def call_base(self, index: int):
        """The key of the ``index``-th program call (the run's own key for the first)."""
        return self.rng_key if index == 0 else jax.random.fold_in(self.rng_key, index)

    def call_key(self, index: int):
        """Seed of the ``index``-th sampling call; index 0 matches NumPyro's Trace_ELBO."""
        return jax.random.split(self.call_base(index))[1]

    def score_key(self, index: int):
        """Seed of the ``index``-th replay (NumPyro's ``model_seed``)."""
        return jax.random.split(self.call_base(index))[0]


class SiteRecord(NamedTuple):
    """A non-reparameterised site on the tape: replayed or scored by the surrogate."""

    key: tuple  # (call index, site name)
    position: int
    msg: dict
    estimator: object


def current_run(construct: str) -> _Run:
    if not _RUNS:
        raise RuntimeError(
            f"ppl.{construct} can only be used inside an objective evaluated by "
            "ppl.value_and_grad (or ppl.inference.SVI)"
        )
    return _RUNS[-1]


@contextlib.contextmanager
def running(run: _Run):
    _RUNS.append(run)
    try:
        yield run
    finally:
        _RUNS.pop()


class Trace(Mapping):
    """An ordered map ``site name -> NumPyro site dict`` from :func:`sample_trace`.

    ``values``: ``{name: value}`` of the sample sites; ``latents``: the same for
    non-observed sites; ``log_prob(name)``: the (unscaled, masked) log density of one site.
    """

    def __init__(self, sites: OrderedDict, weights: dict | None = None, origin=None):
        self.sites = sites
        self.weights = dict(weights or {})
        self.origin = origin  # (program, args, kwargs) that produced the trace

    def __getitem__(self, name):
        return self.sites[name]

    def __iter__(self):
        return iter(self.sites)

    def __len__(self):
        return len(self.sites)

    @property
    def values(self) -> dict:
        return {k: s["value"] for k, s in self.sites.items() if s["type"] == "sample"}

    @property
    def latents(self) -> dict:
        return {
            k: s["value"]
            for k, s in self.sites.items()
            if s["type"] == "sample" and not s["is_observed"]
        }

    def log_prob(self, name: str):
        return site_log_prob(self.sites[name])

    def __repr__(self):
        return f"Trace({list(self.sites)})"


def log_prob(fn, value):
    """``fn.log_prob(value)`` with a correct derivative for Bernoulli logits at 0.

    NumPyro 0.22's ``BernoulliLogits.log_prob`` uses ``clip(x, 0) + log1p(exp(-|x|))``,
    whose JAX derivative at ``x = 0`` is off by ±½ (1 and 0 instead of ½ and −½), and
    logits initialised at 0 are common. ``Independent``, ``Masked`` and ``Expanded``
    wrappers are unwrapped so the fix reaches wrapped Bernoullis too.
    """
    if isinstance(fn, dist.BernoulliLogits):
        x = fn.logits
        return value * x - jax.nn.softplus(x)
    if isinstance(fn, dist.Independent) and _has_bernoulli_logits(fn):
        lp = log_prob(fn.base_dist, value)
        n = fn.reinterpreted_batch_ndims
        return lp.sum(axis=tuple(range(-n, 0))) if n else lp
    if isinstance(fn, dist.MaskedDistribution) and _has_bernoulli_logits(fn):
        lp = log_prob(fn.base_dist, value)
        return lp if fn._mask is True else jnp.where(fn._mask, lp, 0.0)
    if isinstance(fn, dist.ExpandedDistribution) and _has_bernoulli_logits(fn):
        lp = log_prob(fn.base_dist, value)
        return jnp.broadcast_to(lp, jnp.broadcast_shapes(jnp.shape(lp), fn.batch_shape))
    return fn.log_prob(value)


def site_log_prob(site):
    """The unscaled log density of a sample site's value, zero where the site is masked.

    A site drawn with intermediates (a normalizing flow such as BNAF) is scored with them,
    as NumPyro does: its inverse transform need not be tractable.
    """
    lp = _raw_log_prob(site)
    if site.get("mask") is not None:
        lp = jnp.where(site["mask"], lp, 0.0)
    return lp


def _has_bernoulli_logits(fn):
    while hasattr(fn, "base_dist"):
        fn = fn.base_dist
    return isinstance(fn, dist.BernoulliLogits)


# ---------------------------------------------------------------------------
# small handlers, one job each
# ---------------------------------------------------------------------------


def constrain(value, constraint):
    """Map an unconstrained param value to its support (identity for real-valued pytrees)."""
    if constraint is constraints.real:
        return value
    return biject_to(constraint)(value)


def unconstrain(value, constraint):
    """Inverse of :func:`constrain` (``None`` means real-valued)."""
    if constraint is None or constraint is constraints.real:
        return value
    return biject_to(constraint).inv(value)


class substitute_params(Messenger):
    """Give ``param`` sites the constrained value of an unconstrained ``params`` dict.

    A param site missing from ``params`` is an error (with ``strict=True``, the default):
    it would otherwise silently keep its initial value and never be trained.
    """

    def __init__(self, fn=None, params=None, strict=True):
        self.params = params or {}
        self.strict = strict
        super().__init__(fn)

    def process_message(self, msg):
        if msg["type"] != "param":
            return
        if msg["name"] in self.params:
            c = msg["kwargs"].get("constraint", constraints.real)
            msg["value"] = constrain(self.params[msg["name"]], c)
        elif self.strict:
            raise ValueError(
                f"param {msg['name']!r} is not in params (which has {sorted(self.params)}); "
                "create params with ppl.init_params(rng_key, model, guide, *args) — for a "
                "learned reverse model pass guide=ppl.marginal(guide, reverse=...)"
            )


class _sample_sites(Messenger):
    """Sample latent sites with their estimator and put non-reparameterised ones on the tape.

    REPARAM sites are drawn with ``rsample`` (gradients flow); other sites are drawn, then
    ``stop_gradient``-ed, and appended to ``tape`` so that the surrogate can score or replay
    them. Values in ``forced`` (``{name: value}``, set by a replay) replace the draw.
    """

    def __init__(self, fn=None, run=None, call=0, forced=None, tape=None):
        self.run, self.call = run, call
        self.forced = forced or {}
        self.tape = run.tape if tape is None else tape
        super().__init__(fn)

    def process_message(self, msg):
        if msg["type"] != "sample" or msg["is_observed"] or msg["value"] is not None:
            return
        name, fn = msg["name"], msg["fn"]
        est = resolve(msg)
        shape = msg["kwargs"].get("sample_shape", ())
        if name in self.forced:  # already in the site's own shape (see _per_execution)
            value = self.forced[name]
        else:
            rng_key = msg["kwargs"]["rng_key"]
            if isinstance(est, REPARAM):  # the flow's intermediates score it (BNAF)
                value, msg["intermediates"] = fn.sample_with_intermediates(rng_key, shape)
            else:
                value = jax.lax.stop_gradient(fn.sample(rng_key, shape))
        msg["value"] = value
        if not isinstance(est, REPARAM):
            self.tape.append(SiteRecord((self.call, name), len(self.tape), msg, est))


class _unobserve(Messenger):
    """Turn observed sites into latent ones (so that the model generates its data)."""

    def process_message(self, msg):
        if msg["type"] == "sample" and msg["is_observed"]:
            msg["is_observed"] = False
            msg["value"] = None
            msg["infer"] = {**(msg.get("infer") or {}), "ppl_observed": True}


class _require_values(Messenger):
    """Raise a ``ValueError`` naming any latent site that the replayed trace lacks."""

    def __init__(self, fn=None, what="the trace"):
        self.what = what
        super().__init__(fn)

    def process_message(self, msg):
        if msg["type"] == "sample" and not msg["is_observed"] and msg["value"] is None:
            raise ValueError(
                f"latent site {msg['name']!r} has no value in {self.what}: the guide must "
                f"sample every latent site of the model (missing: {msg['name']!r})"
            )


def lead_shape(run: _Run) -> tuple:
    """The leading axes of values drawn in ``run``'s current context.

    ``(m, K)`` inside an inner sampler of ``m`` draws (``K = 1`` outside particles),
    ``(K,)`` inside ``particles(K)``, ``()`` otherwise. Values drawn there are laid out
    ``[*lead, 1, …, 1, *shape]``: size-1 dims pad each site's batch dims up to the batch
    rank of the model and guide, so that particle and inner axes line up across sites.
    """
    if run.inner is not None:
        return (run.inner, run.particles or 1)
    if run.particles is not None:
        return (run.particles,)
    return ()


@contextlib.contextmanager
def _one_execution(run: _Run):
    """Inside one vectorised execution the program sees no particle or inner axis."""
    saved = run.particles, run.inner
    run.particles = run.inner = None
    try:
        yield
    finally:
        run.particles, run.inner = saved


def _array(value):
    """The array behind a site value (the active values of a :class:`SparseTensor`)."""
    return value.values if _is_sparse(value) else value


def _with_array(value, arr):
    """``value`` with its array replaced by ``arr`` (a :class:`SparseTensor` keeps its idx)."""
    return SparseTensor(value.idx, arr, value.dense_shape) if _is_sparse(value) else arr


def _is_sparse(value) -> bool:
    return isinstance(value, SparseTensor)


_STATIC_KEYS = ("type", "name", "is_observed", "infer", "cond_indep_stack")


def _export(sites, rank: int):
    """Split one execution's trace into static metadata and its arrays.

    Sample values and distributions are padded with leading size-1 batch dims up to
    ``rank`` (see :func:`lead_shape`); plate subsamples and the active-set indices of
    sparse values are returned apart, as they must not vary between executions.

    :returns: ``(meta, arrays, shared)``.
    """
    meta, arrays, shared = OrderedDict(), {}, {}
    for name, site in sites.items():
        info = {k: site.get(k) for k in _STATIC_KEYS}
        if site["type"] == "plate":
            info["args"] = site["args"]
            shared[name] = site["value"]
        elif site["type"] == "sample":
            fn, value = site["fn"], site["value"]
            batch_ndim = len(jnp.shape(value)) - len(fn.event_shape)
            pad = rank - batch_ndim
            if pad < 0:
                raise ValueError(
                    f"site {name!r} has batch shape {tuple(jnp.shape(value))[:batch_ndim]} "
                    f"with more dimensions than the {rank} batch dimensions found when the "
                    "model and guide were traced"
                )
            if len(fn.batch_shape) < rank:
                fn = fn.expand((1,) * (rank - len(fn.batch_shape)) + tuple(fn.batch_shape))
            arr = _array(value)
            info["natural"] = tuple(jnp.shape(arr))
            info["batch_shape"] = tuple(fn.batch_shape)
            if _is_sparse(value):
                info["dense_shape"] = value.dense_shape
                shared[(name, "idx")] = value.idx
            info["sample_shape"] = site["kwargs"].get("sample_shape", ())
            entry = {"value": jnp.reshape(arr, (1,) * pad + jnp.shape(arr)), "fn": fn}
            if not _exportable(fn):  # keep its log density at the draw, not the law
                lp = _raw_log_prob(site)
                entry["fn"] = jnp.reshape(lp, (1,) * (rank - jnp.ndim(lp)) + jnp.shape(lp))
                info["scored"] = (type(site["fn"]).__name__, tuple(fn.event_shape))
            for k in ("scale", "mask"):
                if isinstance(site.get(k), jax.Array):
                    entry[k] = site[k]
                else:
                    info[k] = site.get(k)
            if site.get("intermediates") and pad == 0:
                # intermediates are laid out like the unpadded value; a padded site is
                # scored by the flow's inverse instead
                entry["intermediates"] = site["intermediates"]
            arrays[name] = entry
        elif site["type"] == "deterministic":
            arrays[name] = {"value": site["value"]}
        else:
            continue
        meta[name] = info
    return meta, arrays, shared


def _import(meta, arrays, shared, lead: tuple) -> OrderedDict:
    """Rebuild site dicts from :func:`_export`'s parts with leading axes ``lead``."""
    arrays = jax.tree.map(lambda x: jnp.reshape(x, lead + jnp.shape(x)[1:]), arrays)
    sites = OrderedDict()
    for name, info in meta.items():
        site = {k: v for k, v in info.items() if k not in ("natural", "batch_shape")}
        if info["type"] == "plate":
            site["value"] = shared[name]
        elif info["type"] == "sample":
            entry = arrays[name]
            expected = lead + info["batch_shape"]
            if "scored" in info:
                fn = _Scored(entry["fn"], info["scored"][1], info["scored"][0])
            else:
                fn = promote_batch_shape(entry["fn"])
            if tuple(fn.batch_shape) != expected:
                raise ValueError(
                    f"site {name!r}: cannot vectorise {type(fn).__name__} over particles "
                    f"(batch shape {tuple(fn.batch_shape)} after jax.vmap, expected "
                    f"{expected}); register numpyro.distributions.batch_util."
                    f"promote_batch_shape for it"
                )
            value = entry["value"]
            if "dense_shape" in info:
                value = SparseTensor(shared[(name, "idx")], value, info["dense_shape"])
            site.update(entry, fn=fn, value=value, ppl_lead=lead, ppl_shape=info["natural"])
            site["kwargs"] = {"sample_shape": info["sample_shape"]}
            site.pop("sample_shape", None)
            site.pop("scored", None)
            site.pop("dense_shape", None)
        else:
            site["value"] = arrays[name]["value"]
        sites[name] = site
    return sites


def _exportable(fn) -> bool:
    """Whether ``fn`` can leave ``jax.vmap``: no array among its static (aux) fields."""
    while fn is not None:
        for field in getattr(type(fn), "pytree_aux_fields", ()):
            if any(isinstance(x, jax.Array) for x in jax.tree.leaves(getattr(fn, field, None))):
                return False
        fn = getattr(fn, "base_dist", None)
    return True


def _raw_log_prob(site):
    """The unmasked, unscaled log density of a site at its value."""
    if site.get("intermediates"):
        return site["fn"].log_prob(site["value"], site["intermediates"])
    return log_prob(site["fn"], site["value"])


class _Scored(dist.Distribution):
    """Stand-in, after ``jax.vmap``, for a law whose static fields hold arrays (so it cannot
    be batched, e.g. a controlled SDE's increments): it holds the log density of each
    execution's draw, ``[*lead, *batch]``, and scores only that draw."""

    pytree_data_fields = ("lp",)
    pytree_aux_fields = ("law",)

    def __init__(self, lp, event_shape, law):
        self.lp, self.law = lp, law
        super().__init__(batch_shape=jnp.shape(lp), event_shape=tuple(event_shape))

    def log_prob(self, value):
        return self.lp

    def sample(self, key, sample_shape=()):
        raise ValueError(f"a {self.law} drawn inside ppl.particles can only be scored")


@promote_batch_shape.register
def _promote_independent(d: dist.Independent):
    # NumPyro 0.22 drops ``d.event_dim`` batch dims (the base's event dims counted again),
    # e.g. MultivariateNormal(...).expand((4, 1)).to_event(1) after vmap over 3 gets batch
    # shape (3,) instead of (3, 4); only the reinterpreted dims leave the batch shape.
    new = copy.copy(d)
    new.base_dist = promote_batch_shape(d.base_dist)
    shape = tuple(new.base_dist.batch_shape)
    new._batch_shape = shape[: len(shape) - d.reinterpreted_batch_ndims]
    return new


@promote_batch_shape.register
def _promote_transformed(d: dist.TransformedDistribution):
    # NumPyro has no rule for flows (an autoguide's constrained site): the default keeps
    # the batch shape, so an ExpandedDistribution around it lost the vmapped axes. A flow's
    # batch shape is its base's, less the dims its transforms' event dims take.
    new = copy.copy(d)
    new.base_dist = promote_batch_shape(d.base_dist)
    added = len(new.base_dist.batch_shape) - len(d.base_dist.batch_shape)
    new._batch_shape = tuple(new.base_dist.batch_shape)[:added] + tuple(d.batch_shape)
    return new


def natural_shape(run: _Run, name, value):
    """The shape of site ``name``'s array outside particles (``None`` if unknown): the
    traced value shape, with a :class:`SparseTensor`'s dense shape replaced by its ``nse``."""
    natural = run.setup.site_shapes.get(name)
    if natural is not None and _is_sparse(value):
        natural = natural[: len(natural) - len(value.dense_shape)] + (value.nse,)
    return natural


def _per_execution(run: _Run, name, site, lead: tuple):
    """A site's value as ``[prod(lead), *natural shape]``, one row per execution.

    The value may carry fewer leading axes than ``lead`` (a value drawn outside an inner
    sampler, used inside it): they are broadcast (right-aligned, as the plates they were).
    """
    value = site["value"] if isinstance(site, Mapping) else site
    arr = _array(value)
    shape = tuple(jnp.shape(arr))
    natural = site.get("ppl_shape") if isinstance(site, Mapping) else None
    own = site.get("ppl_lead") if isinstance(site, Mapping) else None
    if natural is None:
        natural = natural_shape(run, name, value)
        if natural is None or shape == tuple(natural):
            natural, own = shape, ()
        elif math.prod(shape) == math.prod(lead) * math.prod(natural):
            own = lead
        else:
            raise ValueError(
                f"site {name!r}: a value of shape {shape} does not match the site's shape "
                f"{tuple(natural)} with leading particle axes {lead}"
            )
    elif own is None:
        own = ()
    arr = jnp.reshape(arr, tuple(own) + tuple(natural))
    arr = jnp.broadcast_to(arr, tuple(lead) + tuple(natural))
    return _with_array(value, arr.reshape((math.prod(lead),) + tuple(natural)))


def _vectorised(run: _Run, call: int, lead: tuple, body, inputs):
    """Run ``body(key, inputs_one)`` once per execution of ``lead`` with ``jax.vmap``.

    Seeds as NumPyro's ``RenyiELBO`` does: ``plate_key, key = split(base)``; execution ``i``
    gets ``split(key, n)[i]`` (its guide seed is ``split(·)[1]``, its replay seed
    ``split(·)[0]``), and every subsampled plate draws from ``plate_key``, shared by all
    executions, so that the particles of one objective see the same data elements (a
    per-element IWELBO averages one element's weights over particles). ``body(key,
    plate_seed, inputs_one)`` returns ``(batched, shared)``: ``shared`` must not depend on
    the execution (plate subsamples, active sets).
    """
    plate_key, key = jax.random.split(run.call_base(call))
    keys = jax.random.split(key, math.prod(lead))

    def one(key, inputs_one):
        plate_seed = seed(rng_seed=plate_key, hide_types=["sample", "prng_key", "control_flow"])
        with _one_execution(run):
            return body(key, plate_seed, inputs_one)

    # a sparse value's active set is one for all executions: map its values only
    axes = jax.tree.map(
        lambda x: SparseTensor(None, 0, x.dense_shape) if _is_sparse(x) else 0,
        inputs,
        is_leaf=_is_sparse,
    )
    return jax.vmap(one, in_axes=(0, axes), out_axes=(0, None))(keys, inputs)


def sample_trace(fn, *args, **kwargs) -> Trace:
    """Run a program and return its trace; latent sites use their gradient estimators.

    Inside :func:`particles` every site gets a leading particle axis ``[K, ...]``.
    ``fn`` may be a NumPyro program, :func:`ppl.marginal` or :func:`ppl.normalize`.

    :param fn: a NumPyro program (model or guide).
    :returns: :class:`Trace` of the execution.

    Example::

        def elbo(model, guide, *args, **kwargs):
            tr = ppl.sample_trace(guide, *args, **kwargs)
            return ppl.log_density(model, tr, *args, **kwargs) - ppl.log_density(
                guide, tr, *args, **kwargs)
    """
    run = current_run("sample_trace")
    if hasattr(fn, "_ppl_sample_trace"):
        return fn._ppl_sample_trace(run, args, kwargs)
    return _run_program(run, fn, args, kwargs)


def _sample_body(run, call, fn, args, kwargs, unobserve, given_sites):
    """The per-execution body of :func:`_run_program` (see :func:`_vectorised`)."""
    rank = run.setup.batch_rank

    def body(key, plate_seed, inputs):
        forced, given = inputs
        tape = []
        with trace() as tr, _sample_sites(run=run, call=call, forced=forced, tape=tape):
            with substitute_params(params=run.params), seed(rng_seed=jax.random.split(key)[1]):
                with plate_seed:
                    _call(fn, args, kwargs, unobserve, given)
        body.records = [(r.key, r.estimator) for r in tape]
        meta, arrays, shared = _export(tr, rank)
        body.meta = meta
        return arrays, shared

    return body


def _call(fn, args, kwargs, unobserve=False, given=None):
    """``fn(*args, **kwargs)``, with ``given`` (a dict of values) as first argument if set."""
    if given is not None:
        args = (given,) + tuple(args)
    if unobserve:
        with _unobserve():
            return fn(*args, **kwargs)
    return fn(*args, **kwargs)


def _given_values(given):
    if given is None:
        return None
    return {k: (s["value"] if isinstance(s, Mapping) else s) for k, s in given.items()}


def _run_program(run: _Run, fn, args, kwargs, unobserve=False, given=None) -> Trace:
    """Execute ``fn`` once per particle (and inner draw) of ``run``, sampling latent sites.

    :param given: optional ``{name: site or value}`` passed as ``fn``'s first argument
        (a reverse model's ``z``), split per execution like trace values.
    """
    call = run.next_call()
    lead = lead_shape(run)
    forced = {name: v for (c, name), v in run.forced.items() if c == call}
    origin = (fn, args, kwargs, run.particles, run.inner)
    if not lead:
        with trace() as tr, _sample_sites(run=run, call=call, forced=forced, tape=run.tape):
            with substitute_params(params=run.params), seed(rng_seed=run.call_key(call)):
                _call(fn, args, kwargs, unobserve, _given_values(given))
        return Trace(tr, origin=origin)
    forced_in = {k: _per_execution(run, k, v, lead) for k, v in forced.items()}
    given_in = None
    if given is not None:
        given_in = {k: _per_execution(run, k, s, lead) for k, s in given.items()}
    body = _sample_body(run, call, fn, args, kwargs, unobserve, given_in is not None)
    arrays, shared = _vectorised(run, call, lead, body, (forced_in, given_in))
    sites = _import(body.meta, arrays, shared, lead)
    for key, est in body.records:
        run.tape.append(SiteRecord(key, len(run.tape), sites[key[1]], est))
    return Trace(sites, origin=origin)


def _replay_inputs(run, sites, lead):
    """The latent values of a trace, one row per execution, and its plate sites."""
    values, plates = {}, OrderedDict()
    for name, site in sites.items():
        if site["type"] == "plate":
            plates[name] = site
        elif site["type"] == "sample" and not site["is_observed"]:
            values[name] = _per_execution(run, name, site, lead)
    return values, plates


def _replay_sites(plates, sites, values):
    """A raw trace for NumPyro's ``replay``: plate subsamples and one execution's values."""
    out = OrderedDict(plates)
    for name, value in values.items():
        infer = sites[name].get("infer") or {}
        out[name] = {
            "type": "sample",
            "name": name,
            "value": value,
            "is_observed": False,
            "infer": infer,
        }
    return out


def _replay_one(run: _Run, fn, sites, args, kwargs, seed_key, what, given=None):
    """One execution of ``fn`` replayed on the raw trace ``sites``; its raw trace."""
    with trace() as out, _require_values(what=what), substitute_params(params=run.params):
        with seed(rng_seed=seed_key), replay(trace=sites):
            _call(fn, args, kwargs, given=given)
    return out


def _replayed(run: _Run, fn, tr, args, kwargs, what, given, finish):
    """``finish(raw trace)`` of ``fn`` replayed on ``tr``, once per execution of ``run``.

    ``finish`` returns ``(batched, shared)`` arrays (see :func:`_vectorised`).
    """
    call = run.next_call()
    lead = lead_shape(run)
    sites = tr.sites if isinstance(tr, Trace) else tr
    values, plates = _replay_inputs(run, sites, lead)
    given_in = None
    if given is not None:
        given_in = {k: _per_execution(run, k, s, lead) for k, s in given.items()}

    def body(key, plate_seed, inputs):
        vals, given_one = inputs
        raw = _replay_sites(plates, sites, vals)
        out = _replay_one(run, fn, raw, args, kwargs, jax.random.split(key)[0], what, given_one)
        return finish(out)

    return _vectorised(run, call, lead, body, (values, given_in)), lead


def replay_program(run: _Run, fn, tr, args, kwargs, what="the trace", given=None):
    """Replay ``fn`` on the values (and plate subsamples) of ``tr``; return its raw trace.

    Inside particles (or an inner sampler) ``fn`` is executed once per particle with
    ``jax.vmap`` and the returned sites carry the leading axes (see :func:`lead_shape`).

    :param given: optional ``{name: site or value}`` passed as ``fn``'s first argument.
    """
    if not lead_shape(run):
        call = run.next_call()
        sites = tr.sites if isinstance(tr, Trace) else tr
        seed_key = run.score_key(call)
        return _replay_one(run, fn, sites, args, kwargs, seed_key, what, _given_values(given))
    rank = run.setup.batch_rank
    meta = {}

    def finish(out):
        m, arrays, shared = _export(out, rank)
        meta.update(m)
        return arrays, shared

    (arrays, shared), lead = _replayed(run, fn, tr, args, kwargs, what, given, finish)
    return _import(meta, arrays, shared, lead)


def log_density(fn, trace, *args, keep_particles=True, keep_plates=False, **kwargs):
    """The log density of program ``fn`` at ``trace`` (observed sites scored).

    ``fn`` is replayed at the values of ``trace``, plate subsample indices included;
    ``mask``, ``scale`` and subsample scaling are honoured. A latent site of ``fn`` that
    ``trace`` lacks is a ``ValueError`` naming it.

    :param keep_particles: keep the particle axis ``K`` (inside :func:`particles`).
    :param keep_plates: ``False``: sum every plate. ``True``: keep the plates that enclose
        every sample site of the model and guide (e.g. the data plate of a local-latent
        model), returning per-element values *without* their subsample scale (the scale is
        applied when the objective's value is summed); or a tuple of plate names to keep.
        ``"spread"``: keep every plate that some sample site is in; a site outside a kept
        plate adds its log density spread evenly over that plate's elements. The sum is
        exact and each data point's element carries its own terms, so score-function sites
        get per-element learning signals (as NumPyro's ``TraceGraph_ELBO``); use it only
        in objectives *linear* in the log densities (``ppl.objectives.elbo`` does).
    :returns: ``f32[]``, ``f32[K]`` inside particles; with ``keep_plates``, an array of
        rank ``batch_rank`` (``[K, ...]`` inside particles) whose kept plate dims have their
        size and other dims size 1.

    Example::

        log_w = ppl.log_density(model, tr, x) - ppl.log_density(guide, tr, x)
    """
    run = current_run("log_density")
    out = score(run, fn, trace, args, kwargs, keep_plates)
    if not keep_particles:
        rank = run.setup.batch_rank if keep_plates is not False else 0
        out = out.sum(axis=tuple(range(out.ndim - rank)))
    return out


def score(run: _Run, fn, trace, args, kwargs, keep_plates=False, register=True):
    """:func:`log_density` for library code: ``register=False`` leaves the objective's
    kept plates alone (for densities that are only intermediate results)."""
    if hasattr(fn, "_ppl_log_density"):
        return fn._ppl_log_density(run, trace, args, kwargs, keep_plates, register)
    if _same_execution(trace, fn, args, kwargs, run):
        return sum_log_prob(run, trace.sites, keep_plates, register=register)
    if run.setup.summed_sites and getattr(fn, "_ppl_program", fn) is run.setup.model_program:
        return _score_summed(run, fn, trace, args, kwargs, keep_plates, register)
    if not lead_shape(run):
        sites = replay_program(run, fn, trace, args, kwargs)
        return sum_log_prob(run, sites, keep_plates, register=register)

    def finish(out):  # one execution's log density, without leading axes
        return sum_log_prob(run, out, keep_plates, register=register), {}

    (out, _), lead = _replayed(run, fn, trace, args, kwargs, "the trace", None, finish)
    return out.reshape(lead + out.shape[1:])


def _score_summed(run: _Run, fn, trace, args, kwargs, keep_plates, register):
    """:func:`score` of the model with its enumerated sites summed out (:mod:`ppl.enum`),
    once per execution of ``run`` (particles and inner draws by ``jax.vmap``)."""
    from ppl.enum import enum_log_density

    call = run.next_call()
    lead = lead_shape(run)
    sites = trace.sites if isinstance(trace, Trace) else trace
    kept = _kept_plates(run, keep_plates)
    unknown = [p for p, dim in kept.items() if dim is None and p not in run.setup.auto_plates]
    if unknown:
        raise ValueError(
            f"log_density(keep_plates={keep_plates!r}) with enumerated sites summed out can "
            f"keep only plates enclosing every site ({sorted(run.setup.auto_plates)}), "
            f"not {unknown}"
        )
    kept = {p: run.setup.auto_plates[p] for p in kept}
    if kept and register:
        run.kept_plates = set(run.kept_plates or ()) | set(kept)
    program = substitute_params(fn, params=run.params)
    rank = run.setup.batch_rank

    def one(values, plates, key):
        out = enum_log_density(
            program,
            values,
            args,
            kwargs,
            rng_key=key,
            keep_plates=kept or None,
            plate_subsamples=plates,
            batch_rank=rank,
            max_plate_nesting=rank,
        )
        if kept:
            return out
        return out.reshape(() if keep_plates is False or keep_plates is None else (1,) * rank)

    values, plates = _replay_inputs(run, sites, lead or (1,))
    plates = {name: site["value"] for name, site in plates.items()}
    if not lead:
        values = {k: v[0] for k, v in values.items()}
        return one(values, plates, run.score_key(call))
    (out, _) = _vectorised(
        run,
        call,
        lead,
        lambda key, _, vals: (one(vals, plates, jax.random.split(key)[0]), {}),
        values,
    )
    return out.reshape(lead + out.shape[1:])


def _same_execution(trace, fn, args, kwargs, run) -> bool:
    """True when ``trace`` was drawn from ``fn`` on these very arguments in the same
    particle context, so its own site densities can be scored without a replay."""
    origin = getattr(trace, "origin", None)
    if origin is None or origin[0] is not fn:
        return False
    o_args, o_kwargs = origin[1], origin[2]
    if len(o_args) != len(args) or set(o_kwargs) != set(kwargs):
        return False
    if not all(a is b for a, b in zip(o_args, args, strict=True)):
        return False
    if not all(o_kwargs[k] is kwargs[k] for k in kwargs):
        return False
    return origin[3] == run.particles and origin[4] == run.inner and id(run) == id(_RUNS[-1])


def _kept_plates(run: _Run, keep_plates) -> dict:
    if keep_plates is False or keep_plates is None:
        return {}
    if keep_plates is True or keep_plates == "auto":
        return dict(run.setup.auto_plates)
    if keep_plates == "spread":
        return {name: dim for name, (dim, _) in run.setup.spread_plates.items()}
    names = (keep_plates,) if isinstance(keep_plates, str) else tuple(keep_plates)
    return {name: None for name in names}


def sum_log_prob(run: _Run, sites, keep_plates=False, names=None, register=True):
    """Sum site log densities over everything but the lead (particle/inner) axes and kept plates.

    :param sites: a raw NumPyro trace (``OrderedDict``).
    :param names: restrict to these sample sites (default: all).
    :param register: record the kept plates as those of the objective's value.
    :returns: ``[*lead]`` or, with kept plates, ``[*lead, *plate dims]`` (rank ``batch_rank``
        plate part, size 1 where a plate is summed).
    """
    rank = run.setup.batch_rank
    full = rank + (2 if run.inner is not None else 1 if run.particles is not None else 0)
    kept = _kept_plates(run, keep_plates)
    total = jnp.zeros((1,) * full)
    for name, site in sites.items():
        if site["type"] != "sample" or (names is not None and name not in names):
            continue
        lp = site_log_prob(site)
        if site.get("scale") is not None:
            lp = lp * site["scale"]
        frames = {f.name: f.dim for f in site["cond_indep_stack"]}
        keep_dims = set()
        spread_dims = []
        for plate in kept:
            lp = lp / run.setup.plate_scales.get(plate, 1.0)
            if plate in frames:
                keep_dims.add(frames[plate])
            elif keep_plates == "spread":  # an even share for each element of the plate
                dim, size = run.setup.spread_plates[plate]
                lp = lp / size
                spread_dims.append((dim, size))
            else:
                raise ValueError(
                    f"log_density(keep_plates=...): site {name!r} is not inside plate "
                    f"{plate!r}, so its log density cannot be kept per {plate!r} element"
                )
        if jnp.ndim(lp) > full:
            raise ValueError(
                f"site {name!r} has batch shape {jnp.shape(lp)} with more dimensions than "
                f"the {rank} batch dimensions found when the model and guide were traced"
            )
        lp = jnp.reshape(lp, (1,) * (full - jnp.ndim(lp)) + jnp.shape(lp))
        axes = tuple(full + d for d in range(-rank, 0) if d not in keep_dims)
        lp = lp.sum(axis=axes, keepdims=True)
        for dim, size in spread_dims:
            lp = jnp.repeat(lp, size, axis=full + dim)
        total = total + lp
    if keep_plates is False or keep_plates is None:
        return total.reshape(total.shape[: full - rank])
    if register:
        run.kept_plates = set(run.kept_plates or ()) | set(kept)
    return total


@contextlib.contextmanager
def particles(num_particles: int):
    """Draw ``num_particles`` independent copies of every site sampled inside the block.

    Every program that :func:`sample_trace` or :func:`log_density` runs inside the block is
    executed once per particle under ``jax.vmap`` (the program itself sees unbatched
    values, so ``Phi @ x`` works as it does outside). Particle ``k`` of the first call is
    seeded with ``split(split(key)[1], K)[k]`` like NumPyro's ``RenyiELBO``; subsampled
    plates draw one subsample shared by all particles. Values get a leading axis, laid
    out ``[K, 1, …, 1, *shape]`` (size-1 dims up to the batch rank of model and guide) and
    :func:`log_density` returns ``f32[K]`` (or ``[K, *plates]``).

    Example::

        with ppl.particles(5):
            tr = ppl.sample_trace(guide, x)
            log_w = ppl.log_density(model, tr, x) - ppl.log_density(guide, tr, x)
        iwelbo = ppl.logmeanexp(log_w)
    """
    check_count("particles(num_particles)", num_particles)
    run = current_run("particles")
    if run.particles is not None:
        raise ValueError("ppl.particles blocks cannot be nested")
    run.particles = int(num_particles)
    try:
        yield
    finally:
        run.particles = None


def check_count(what: str, value, minimum: int = 1) -> int:
    """Validate a positive integer count, naming ``what`` in the error."""
    if isinstance(value, bool) or not isinstance(value, int | jnp.integer):
        raise TypeError(f"{what} expected an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{what} must be >= {minimum}, got {value}")
    return int(value)


def logmeanexp(a, axis=0):
    """``log(mean(exp(a), axis))`` computed stably.

    :param a: array, e.g. log weights ``[K, ...]``.
    :returns: ``a`` reduced over ``axis``.
    """
    a = jnp.asarray(a)
    return logsumexp(a, axis=axis) - math.log(a.shape[axis])


def add_cost(value):
    """Add ``value`` (a scalar or a plate-shaped array) to the objective's value; returns it."""
    run = current_run("add_cost")
    run.costs.append(value)
    return value
