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
* :func:`particles` — draw ``K`` independent copies of every site (a plate at
  ``-(batch_rank + 1)``), so that :func:`log_density` returns an array ``[K, ...]``.
* :func:`add_cost` — add a term to the objective's value.
"""

from __future__ import annotations

import contextlib
import math
from collections import OrderedDict
from collections.abc import Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist
from jax.scipy.special import logsumexp
from numpyro.distributions import biject_to, constraints
from numpyro.handlers import block, replay, seed, trace
from numpyro.primitives import Messenger

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
PARTICLE_PLATE = "_particles"
INNER_PLATE = "_inner"


class Setup(NamedTuple):
    """Static facts about a (model, guide) pair, found by tracing both once.

    ``batch_rank``: the number of batch dimensions any site has (plates and unplated batch
    dims), so particles go at ``-(batch_rank + 1)``. ``auto_plates``: plates enclosing every
    sample site of model and guide (``{name: dim}``). ``plate_scales``: ``{name: size /
    subsample_size}``. ``model_latents``, ``model_params``, ``guide_params``: site names.
    ``site_shapes``: ``{name: value shape}`` of every sample site outside particles.
    """

    batch_rank: int
    auto_plates: dict
    plate_scales: dict
    model_latents: tuple
    model_params: tuple
    guide_params: tuple
    site_shapes: dict = {}


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

    def call_key(self, index: int):
        """Key of the ``index``-th program execution; index 0 matches NumPyro's Trace_ELBO."""
        base = self.rng_key if index == 0 else jax.random.fold_in(self.rng_key, index)
        return jax.random.split(base)[1]

    def score_key(self, index: int):
        base = self.rng_key if index == 0 else jax.random.fold_in(self.rng_key, index)
        return jax.random.split(base)[0]


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
    """The unscaled log density of a sample site's value, zero where the site is masked."""
    lp = log_prob(site["fn"], site["value"])
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
    ``stop_gradient``-ed, and recorded so that the surrogate can score or replay them.
    Values forced by a replay (``run.forced[(call, name)]``) replace the draw.
    """

    def __init__(self, fn=None, run=None, call=0, unobserve=False):
        self.run, self.call, self.unobserve = run, call, unobserve
        super().__init__(fn)

    def process_message(self, msg):
        if msg["type"] != "sample" or msg["is_observed"] or msg["value"] is not None:
            return
        name, fn = msg["name"], msg["fn"]
        est = resolve(msg)
        key = (self.call, name)
        if key in self.run.forced:
            value = self.run.forced[key]
        else:
            rng_key = msg["kwargs"]["rng_key"]
            shape = msg["kwargs"].get("sample_shape", ())
            if isinstance(est, REPARAM):
                value = fn.rsample(rng_key, shape)
            else:
                value = jax.lax.stop_gradient(fn.sample(rng_key, shape))
        msg["value"] = value
        if not isinstance(est, REPARAM):
            self.run.tape.append(SiteRecord(key, len(self.run.tape), msg, est))


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


@contextlib.contextmanager
def _plates(run: _Run):
    """Enter the particle and inner plates that are active in ``run``."""
    rank = run.setup.batch_rank
    with block():
        made = []
        if run.inner is not None:
            made.append(numpyro.plate(INNER_PLATE, run.inner, dim=-(rank + 2)))
        if run.particles is not None:
            made.append(numpyro.plate(PARTICLE_PLATE, run.particles, dim=-(rank + 1)))
    with contextlib.ExitStack() as stack:
        for p in made:
            stack.enter_context(p)
        yield


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


def _run_program(run: _Run, fn, args, kwargs, unobserve=False) -> Trace:
    call = run.next_call()
    plates = _plates(run)
    with trace() as tr, _sample_sites(run=run, call=call), substitute_params(params=run.params):
        with seed(rng_seed=run.call_key(call)), plates:
            if unobserve:
                with _unobserve():
                    fn(*args, **kwargs)
            else:
                fn(*args, **kwargs)
    return Trace(tr, origin=(fn, args, kwargs, run.particles, run.inner))


def replay_program(run: _Run, fn, tr: Trace, args, kwargs, what="the trace") -> OrderedDict:
    """Replay ``fn`` on the values (and plate subsamples) of ``tr``; return its raw trace."""
    call = run.next_call()
    plates = _plates(run)
    sites = tr.sites if isinstance(tr, Trace) else tr
    with trace() as out, _require_values(what=what), substitute_params(params=run.params):
        with seed(rng_seed=run.score_key(call)), replay(trace=sites), plates:
            fn(*args, **kwargs)
    return out


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
    sites = replay_program(run, fn, trace, args, kwargs)
    return sum_log_prob(run, sites, keep_plates, register=register)


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
        for plate in kept:
            if plate not in frames:
                raise ValueError(
                    f"log_density(keep_plates=...): site {name!r} is not inside plate "
                    f"{plate!r}, so its log density cannot be kept per {plate!r} element"
                )
            keep_dims.add(frames[plate])
            lp = lp / run.setup.plate_scales.get(plate, 1.0)
        if jnp.ndim(lp) > full:
            raise ValueError(
                f"site {name!r} has batch shape {jnp.shape(lp)} with more dimensions than "
                f"the {rank} batch dimensions found when the model and guide were traced"
            )
        lp = jnp.reshape(lp, (1,) * (full - jnp.ndim(lp)) + jnp.shape(lp))
        axes = tuple(full + d for d in range(-rank, 0) if d not in keep_dims)
        total = total + lp.sum(axis=axes, keepdims=True)
    if keep_plates is False or keep_plates is None:
        return total.reshape(total.shape[: full - rank])
    if register:
        run.kept_plates = set(run.kept_plates or ()) | set(kept)
    return total


@contextlib.contextmanager
def particles(num_particles: int):
    """Draw ``num_particles`` independent copies of every site sampled inside the block.

    A plate named ``"_particles"`` at dimension ``-(batch_rank + 1)``: values get a leading
    axis ``[K, ...]`` and :func:`log_density` returns ``f32[K]`` (or ``[K, *plates]``).

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
