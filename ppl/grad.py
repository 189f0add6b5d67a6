"""From an objective program to an unbiased gradient estimator (surrogate + replay).

``value_and_grad(objective, model, guide)(params, key, *args)`` runs the objective once
(the *forward run*), which leaves a tape of the non-reparameterised sample sites it drew.
It then builds one scalar surrogate ``S`` whose value is an unbiased estimate of the
objective and whose gradient is an unbiased estimate of the objective's gradient, and
calls ``jax.value_and_grad(S)``:

* REPARAM sites need nothing: their draws are differentiable.
* REINFORCE site ``s``: ``+ (ℓ_s − sg ℓ_s) · sg(F − b)`` with ``ℓ_s`` the unscaled, masked
  log density of the draw and ``F`` the objective's value, per element of the plates the
  value keeps (``ppl.objectives.elbo`` keeps every plate, spreading terms outside a plate
  over its elements), so that a data point's score only sees its own costs. A plate along
  which a term outside it depends on the site (found by provenance tracking, as NumPyro's
  ``TraceGraph_ELBO`` does) is *coupled*: each element's signal is the whole value there.
* MVD site: ``+ Σ_η (η − sg η) · sg(c_η (F(z⁺) − F(z⁻)))`` where ``F(z±)`` re-runs the
  objective with the site forced to ``z±`` (a *replay*; every other site keeps its
  random numbers, since keys are fixed per program execution and site order).
* ENUM site: the rest of the program is replaced by ``Σ_v q(v) · S(v)`` where ``S(v)`` is
  the surrogate of a replay with the site forced to ``v`` (recursively, so nested ENUM
  sites are summed exactly).

Replays are ``vmap``-ed over forced values. Elements of a site along plates that the
objective's value keeps per element are replayed all at once; other elements (event
dims, particles that the objective reduces non-linearly) get one replay each. By the
tower property every per-site choice composes into an unbiased estimator (spec §1.4).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from numpyro.handlers import replay, seed, substitute, trace

from ppl.dsl import (
    Setup,
    _Run,
    log_prob,
    running,
    site_log_prob,
    substitute_params,
    unconstrain,
)
from ppl.enum import enumerated_sites
from ppl.transforms.estimators import (
    ENUM,
    MVD,
    REINFORCE,
    REPARAM,
    elementwise,
    mvd_rule,
    resolve,
)

__all__ = ["value_and_grad", "init_params", "constrain_params", "check_data"]

sg = lax.stop_gradient


class _Spec(NamedTuple):
    objective: Callable
    model: Callable
    guide: Callable
    args: tuple
    kwargs: dict
    rng_key: jax.Array
    setup: Setup


def _program(fn):
    """The plain NumPyro program behind ``fn`` (a marginal or normalised program unwraps)."""
    return getattr(fn, "_ppl_program", fn)


def _setup(model, guide, params, rng_key, args, kwargs) -> Setup:
    """Trace guide and model once to learn plates, batch rank and sites; validate the pair.

    The tracing is abstract (``jax.eval_shape``), so it adds nothing to the compiled step.
    """
    found = []
    jax.eval_shape(lambda: found.append(_trace_setup(model, guide, params, rng_key, args, kwargs)))
    return found[0]


def _trace_setup(model, guide, params, rng_key, args, kwargs) -> Setup:
    k1, k2 = jax.random.split(rng_key)
    with trace() as gt, substitute_params(params=params), seed(rng_seed=k1):
        _program(guide)(*args, **kwargs)
    for site in gt.values():
        if site["type"] == "sample" and not site["is_observed"]:
            resolve(site)  # raises for impossible estimator/distribution pairs
    with trace() as mt, substitute_params(params=params), seed(rng_seed=k2), replay(trace=gt):
        _program(model)(*args, **kwargs)
    summed = tuple(n for n in enumerated_sites(mt) if n not in gt)
    missing = [
        name
        for name, site in mt.items()
        if site["type"] == "sample"
        and not site["is_observed"]
        and name not in gt
        and name not in summed
    ]
    if missing:
        raise ValueError(
            f"the guide is missing latent site(s) {missing} of the model; "
            f"the guide samples {[n for n, s in gt.items() if s['type'] == 'sample']} "
            "(or mark a discrete model site for enumeration with "
            "infer={'enumerate': 'parallel'} / numpyro.infer.config_enumerate)"
        )
    _check_match(mt, gt)
    sample_sites = [
        s for tr in (gt, mt) for n, s in tr.items() if s["type"] == "sample" and n not in summed
    ]
    rank = 0
    for s in sample_sites:
        batch_ndim = jnp.ndim(s["value"]) - len(s["fn"].event_shape)
        rank = max(rank, len(s["fn"].batch_shape), batch_ndim)
        rank = max([rank] + [-f.dim for f in s["cond_indep_stack"]])
    common = None
    for s in sample_sites:
        frames = {f.name: f.dim for f in s["cond_indep_stack"]}
        common = frames if common is None else {k: v for k, v in common.items() if k in frames}
    scales, sizes = {}, {}
    for tr in (gt, mt):
        for name, site in tr.items():
            if site["type"] == "plate":
                size, subsample = site["args"][0], site["args"][1]
                subsample = size if subsample is None else subsample
                scales[name] = float(size) / float(subsample)
                sizes[name] = int(subsample)
    common = common or {}
    if summed:  # enumerated sites are summed per element of the enclosing plates only
        spread = {name: (dim, sizes[name]) for name, dim in common.items()}
    else:
        spread = _spread_plates(sample_sites, sizes)
    nonlocal_plates = {}
    if set(spread) != set(common):
        nonlocal_plates = _nonlocal_plates(
            model, guide, params, k1, k2, args, kwargs, gt, mt, spread
        )
    return Setup(
        batch_rank=rank,
        auto_plates=common or {},
        plate_scales=scales,
        model_latents=tuple(
            n
            for n, s in mt.items()
            if s["type"] == "sample" and not s["is_observed"] and n not in summed
        ),
        model_params=tuple(n for n, s in mt.items() if s["type"] == "param"),
        guide_params=tuple(n for n, s in gt.items() if s["type"] == "param"),
        site_shapes={
            n: tuple(jnp.shape(s["value"]))
            for tr in (mt, gt)
            for n, s in tr.items()
            if s["type"] == "sample"
        },
        summed_sites=summed,
        model_program=_program(model) if summed else None,
        spread_plates=spread,
        nonlocal_plates=nonlocal_plates,
    )


def _spread_plates(sample_sites, sizes) -> dict:
    """``{plate: (dim, subsample size)}`` for every plate some sample site is in, unless
    two plates share a dim (sequential plates): those are summed, not kept."""
    dims = {}
    for site in sample_sites:
        for f in site["cond_indep_stack"]:
            dims[f.name] = f.dim
    shared = {d for d in dims.values() if list(dims.values()).count(d) > 1}
    return {n: (d, sizes[n]) for n, d in dims.items() if d not in shared and n in sizes}


def _nonlocal_plates(model, guide, params, k1, k2, args, kwargs, gt, mt, spread) -> dict:
    """``{site: plates}``: for each non-reparameterised guide site, the plates it is in
    along which a log-density term *outside* the plate depends on its value.

    Dependencies are found as NumPyro's ``TraceGraph_ELBO`` finds them, by provenance
    tracking (:func:`numpyro.ops.provenance.eval_provenance`, abstract, no FLOPs) through
    the guide and the model replayed against it; control flow counts as depending on all
    of its inputs. Where tracking fails, every plate of every such site counts (the whole
    output is then each element's signal: unbiased, but noisier).
    """
    from numpyro.ops.provenance import eval_provenance

    tracked = {}
    for name, site in gt.items():
        if site["type"] != "sample" or site["is_observed"] or isinstance(resolve(site), REPARAM):
            continue
        plates = frozenset(f.name for f in site["cond_indep_stack"]) & set(spread)
        if plates:
            tracked[name] = plates
    if not tracked:
        return {}

    def substitute_fn(values):
        def fn(msg):
            if msg["name"] not in values:
                return None
            value = values[msg["name"]]
            parents = [
                jnp.sum(jnp.real(leaf)) * 0
                for leaf in jax.tree.leaves(msg["fn"])
                if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)
            ]  # the value depends on the distribution's parameters too
            return value + jnp.asarray(sum(parents, 0.0)).astype(jnp.result_type(value))

        return fn

    def log_densities(**values):
        sub = substitute(_program(guide), substitute_fn=substitute_fn(values))
        with trace() as g, substitute_params(params=params), seed(rng_seed=k1):
            sub(*args, **kwargs)
        with trace() as m, substitute_params(params=params), seed(rng_seed=k2), replay(trace=g):
            _program(model)(*args, **kwargs)
        return {
            (i, n): site_log_prob(site)
            for i, tr in enumerate((g, m))
            for n, site in tr.items()
            if site["type"] == "sample"
        }

    # the setup's own traces (same params and seeds) give each term's plates
    frames = {
        (i, n): frozenset(f.name for f in site["cond_indep_stack"])
        for i, tr in enumerate((gt, mt))
        for n, site in tr.items()
        if site["type"] == "sample"
    }
    try:
        deps = eval_provenance(log_densities, **{n: gt[n]["value"] for n in tracked})
    except Exception:  # noqa: BLE001 - conservative fallback, see the docstring
        return dict(tracked)
    out = {}
    for term, sources in deps.items():
        for name in sources:
            if name in tracked:
                outside = tracked[name] - frames.get(term, frozenset())
                if outside:
                    out[name] = out.get(name, frozenset()) | outside
    return out


def _check_match(model_trace, guide_trace) -> None:
    """Model and guide agree on every latent site's shape, as NumPyro's ELBOs require.

    The guide's draw must have the model's event shape, the same number of event dims
    as the guide's own distribution, and a batch shape that the model's batch shape
    broadcasts to without growing (otherwise the model would silently score a broadcast
    value: a guide draw of shape (2, 1) against a model site of shape (1, 2)).
    """
    for name, site in model_trace.items():
        if site["type"] != "sample" or site["is_observed"] or name not in guide_trace:
            continue
        g = guide_trace[name]
        if g["type"] != "sample" or g["is_observed"]:
            continue
        value = site["value"]
        shape = tuple(jnp.shape(value))
        m_event, g_event = tuple(site["fn"].event_shape), tuple(g["fn"].event_shape)
        if len(m_event) != len(g_event):
            raise ValueError(
                f"site {name!r}: model and guide event dims disagree (model event shape "
                f"{m_event}, guide event shape {g_event}); use .to_event(n) so that both "
                "treat the same dims as one event"
            )
        if shape[len(shape) - len(m_event) :] != m_event:
            raise ValueError(
                f"site {name!r}: the guide's value has shape {shape}, but the model's "
                f"distribution has event shape {m_event}"
            )
        batch = shape[: len(shape) - len(m_event)]
        model_batch = tuple(site["kwargs"].get("sample_shape", ())) + tuple(site["fn"].batch_shape)
        try:
            joint = jnp.broadcast_shapes(batch, model_batch)
        except ValueError:
            joint = None
        if joint != batch:
            raise ValueError(
                f"site {name!r}: model and guide shapes disagree: the guide's value has "
                f"batch shape {batch}, the model's distribution batch shape {model_batch} "
                "(inside its plates); give the guide the model's shape"
            )


# ---------------------------------------------------------------------------
# executing the objective and building the surrogate
# ---------------------------------------------------------------------------


def _execute(spec: _Spec, params, forced) -> _Run:
    """Run the objective body once with ``forced`` site values; normalise its output."""
    run = _Run(params, spec.rng_key, spec.setup, forced)
    with running(run):
        out = spec.objective(spec.model, spec.guide, *spec.args, **spec.kwargs)
    out = jnp.asarray(out)
    for cost in run.costs:
        out = out + cost
    rank = spec.setup.batch_rank
    if not jnp.issubdtype(out.dtype, jnp.floating):
        raise TypeError(f"the objective must return a floating-point array, got {out.dtype}")
    plate_shaped = run.kept_plates is not None or rank == 0
    if out.ndim == 0:
        out = out.reshape((1,) * rank)
        run.particle_axis = False
    elif out.ndim == rank + 1 and plate_shaped:
        run.particle_axis = True
    elif out.ndim == rank and run.kept_plates is not None:
        run.particle_axis = False
    else:
        raise ValueError(
            f"the objective returned an array of shape {out.shape}; expected a scalar, or an "
            f"array over the plates kept by log_density(..., keep_plates=True) (rank {rank}), "
            "optionally with a leading particle axis"
        )
    run.out = out
    return run


def _reduce(spec: _Spec, run: _Run, s):
    if run.particle_axis:
        s = s.mean(axis=0)
    scale = 1.0
    for plate in run.kept_plates or ():
        scale *= spec.setup.plate_scales.get(plate, 1.0)
    return s.sum() * scale


class _Layout(NamedTuple):
    """How one site's elements line up with the objective's output (all static)."""

    elem_shape: tuple  # E: batch shape of the element-wise distribution
    batch_ndim: int  # len(fn.batch_shape)
    extra: int  # reinterpreted event dims (at the right of E)
    out_shape: tuple
    coupled: tuple  # axes of E replayed one element at a time
    local: tuple  # per batch dim of the site: does each element have its own output element?


def _layout(spec: _Spec, rec, run) -> _Layout:
    """A site's batch dim is *local* when the output keeps it per element of the same plate
    and no term outside that plate depends on the site (``Setup.nonlocal_plates``); its
    elements then get their own learning signal and are replayed all at once. Other dims
    are *coupled*: the signal is the whole output along them."""
    fn = rec.msg["fn"]
    el = elementwise(fn)
    elem = tuple(el.batch_shape)
    bs = tuple(fn.batch_shape)
    os_ = tuple(run.out.shape)
    frames = {f.dim: f.name for f in rec.msg["cond_indep_stack"]}
    kept = run.kept_plates or set()
    nonlocal_ = spec.setup.nonlocal_plates.get(rec.msg["name"], frozenset())
    local = []
    for p in range(-len(bs), 0):
        sized = -p <= len(os_) and os_[p] == bs[p]
        if -p > spec.setup.batch_rank:  # a particle or inner-draw axis
            local.append(sized)
        else:
            plate = frames.get(p)
            local.append(sized and (bs[p] == 1 or (plate in kept and plate not in nonlocal_)))
    coupled = [i for i, ok in enumerate(local) if not ok] + list(range(len(bs), len(elem)))
    return _Layout(elem, len(bs), len(elem) - len(bs), os_, tuple(coupled), tuple(local))


def _nonlocal_axes(lay: _Layout, ndim: int) -> tuple:
    """Axes of an array whose last ``lay.batch_ndim`` dims are the site's batch dims (then
    ``lay.extra`` event dims when ``ndim`` includes them) that are not local."""
    offset = ndim - lay.batch_ndim
    return tuple(offset + i for i, ok in enumerate(lay.local) if not ok and offset + i >= 0)


def _to_elements(x, lay: _Layout):
    """An output-shaped array, broadcastable against the site's element shape ``E``: the
    output itself along local dims, its mean along the others (see :func:`_to_output`)."""
    nb = lay.batch_ndim
    if x.ndim > nb:  # output dims that the site lacks (particles, outer plates): average
        x = x.mean(axis=tuple(range(x.ndim - nb)))
    x = x.reshape((1,) * (nb - x.ndim) + x.shape)
    axes = tuple(i for i in _nonlocal_axes(lay, nb) if x.shape[i] != 1)
    if axes:
        x = x.mean(axis=axes, keepdims=True)
    return x.reshape(x.shape + (1,) * lay.extra)


def _to_output(t, lay: _Layout):
    """Sum an element-shaped term ``t`` into the output's shape (inverse of _to_elements):
    along a coupled dim the elements' terms are summed and the sum stands at every output
    element (REINFORCE divides its term by :func:`_share` first, so that summing the output
    times the plate's scale counts it once)."""
    t = jnp.broadcast_to(t, lay.elem_shape)
    if lay.extra:
        t = t.sum(axis=tuple(range(t.ndim - lay.extra, t.ndim)))
    axes = tuple(i for i in _nonlocal_axes(lay, t.ndim) if t.shape[i] != 1)
    if axes:
        t = t.sum(axis=axes, keepdims=True)
    os_ = lay.out_shape
    if t.ndim > len(os_):
        t = t.sum(axis=tuple(range(t.ndim - len(os_))))
    t = t.reshape((1,) * (len(os_) - t.ndim) + t.shape)
    axes = tuple(i for i in range(len(os_)) if os_[i] == 1 and t.shape[i] != 1)
    if axes:
        t = t.sum(axis=axes, keepdims=True)
    return jnp.broadcast_to(t, os_)


def _group_masks(lay: _Layout):
    """Boolean masks ``[J, *E]``: one per element group replayed together."""
    elem, coupled = lay.elem_shape, lay.coupled
    sizes = [elem[d] for d in coupled]
    num = int(np.prod(sizes)) if sizes else 1
    mask = jnp.ones((num,) + elem, dtype=bool)
    if sizes:
        coords = np.indices(sizes).reshape(len(sizes), num)
        for i, d in enumerate(coupled):
            shape = [1] * (len(elem) + 1)
            shape[d + 1] = elem[d]
            iota = jnp.arange(elem[d]).reshape(shape)
            sel = jnp.asarray(coords[i]).reshape((num,) + (1,) * len(elem))
            mask = mask & (iota == sel)
    return mask


def _expand_event(mask, value_ndim):
    return mask.reshape(mask.shape + (1,) * (value_ndim - (mask.ndim - 1)))


def _site_key(spec: _Spec, rec):
    call, name = rec.key
    key = jax.random.fold_in(spec.rng_key, zlib.crc32(name.encode()) & 0x7FFFFFFF)
    return jax.random.fold_in(key, call)


def _reinforce(spec, params, run, rec):
    msg, est = rec.msg, rec.estimator
    lay = _layout(spec, rec, run)
    lp = site_log_prob(msg)
    # the signal in the objective's units: along output dims where the site's elements do
    # not have their own output element, the mean times (size × subsample scale) is the sum
    share = _share(spec, run, lay)
    signal = _to_elements(sg(run.out), lay._replace(extra=0)) * share
    baseline = est.baseline
    b = 0.0
    if baseline == "loo":
        axis = lay.batch_ndim - spec.setup.batch_rank - 1
        if not (run.particle_axis and axis >= 0 and signal.shape[axis] > 1):
            raise ValueError(
                f"REINFORCE(baseline='loo') at site {msg['name']!r} needs K >= 2 particles and "
                "an objective whose value keeps the particle axis (e.g. ppl.objectives.elbo "
                "inside ppl.particles(K)); use baseline='mean' otherwise"
            )
        num = signal.shape[axis]
        b = (signal.sum(axis=axis, keepdims=True) - signal) / (num - 1)
    elif baseline is not None:
        if baseline == "mean":
            name = f"{msg['name']}_baseline"
            if name not in params:
                raise ValueError(
                    f"REINFORCE(baseline='mean') at site {msg['name']!r} keeps its running mean "
                    f"in params[{name!r}], which is missing; create params with ppl.init_params"
                )
            b = params[name]
        else:
            with substitute_params(params=params):
                b = baseline(*spec.args, **spec.kwargs)
        err = sg(signal) - b
        run.extra = run.extra - 0.5 * (jnp.mean(err**2) - sg(jnp.mean(err**2)))
    term = (lp - sg(lp)) * sg(signal - b) / share
    return _to_output(term, lay._replace(elem_shape=jnp.shape(term), extra=0))


def _share(spec: _Spec, run: _Run, lay: _Layout) -> float:
    """``Π (size × scale)`` over the output's plate dims that :func:`_to_elements` averages
    for this site: the factor from an averaged output element to the objective's units."""
    rank = spec.setup.batch_rank
    dims = {}
    for name in run.kept_plates or ():
        found = spec.setup.spread_plates.get(name, (spec.setup.auto_plates.get(name),))[0]
        if found is not None:
            dims[found] = name
    os_ = lay.out_shape
    averaged = set(range(-min(rank, len(os_)), -lay.batch_ndim if lay.batch_ndim else 0))
    averaged |= {a - lay.batch_ndim for a in _nonlocal_axes(lay, lay.batch_ndim)}
    share = 1.0
    for d in averaged:
        if -d <= rank and os_[d] > 1:
            share *= os_[d] * spec.setup.plate_scales.get(dims.get(d), 1.0)
    return share


def _replay_outputs(spec, params, forced, rec, values):
    """Primal objective outputs ``[J, *out]`` for the site forced to each of ``values``."""

    def one(v):
        return sg(_execute(spec, params, {**forced, rec.key: v}).out)

    return jax.vmap(one)(values)


def _mvd(spec, params, run, forced, rec):
    msg, z = rec.msg, rec.msg["value"]
    lay = _layout(spec, rec, run)
    el = elementwise(msg["fn"])
    masks = _group_masks(lay)
    vmask = _expand_event(masks, z.ndim)
    here = _to_elements(sg(run.out), lay)

    def per_element(zval):
        if zval is None:
            return here
        outs = _replay_outputs(spec, params, forced, rec, jnp.where(vmask, zval, z))
        return jnp.sum(jnp.where(masks, jax.vmap(lambda o: _to_elements(o, lay))(outs), 0.0), 0)

    term = 0.0
    for eta, c, z_plus, z_minus in mvd_rule(el, z, _site_key(spec, rec), rec.estimator.coupled):
        weight = sg(c * (per_element(z_plus) - per_element(z_minus)))
        term = term + (eta - sg(eta)) * weight
    return _to_output(term, lay)


def _enum(spec, params, run, forced, rec):
    msg, z = rec.msg, rec.msg["value"]
    lay = _layout(spec, rec, run)
    el = elementwise(msg["fn"])
    support = el.enumerate_support(expand=False)
    num_values = support.shape[0]
    probs = jnp.exp(log_prob(el, support))  # [V, *E]
    probs = jnp.broadcast_to(probs, (num_values,) + lay.elem_shape)
    masks = _group_masks(lay)
    vmask = _expand_event(masks, z.ndim)
    full = jnp.broadcast_to(support, (num_values,) + z.shape)
    forced_values = jnp.where(vmask[:, None], full[None], z[None, None])  # [J, V, *z]
    groups = masks.shape[0]
    flat = forced_values.reshape((groups * num_values,) + z.shape)
    start = rec.position + 1

    def cont(v):
        new = {**forced, rec.key: v}
        return _process(spec, params, _execute(spec, params, new), new, start)

    outs = jax.vmap(cont)(flat).reshape((groups, num_values) + lay.out_shape)
    weights = jax.vmap(jax.vmap(lambda m, p: _to_output(jnp.where(m, p, 0.0), lay)))(
        jnp.broadcast_to(masks[:, None], (groups, num_values) + lay.elem_shape),
        jnp.broadcast_to(probs[None], (groups, num_values) + lay.elem_shape),
    )
    expected = jnp.sum(weights * outs, axis=1)  # [J, *out]
    if groups == 1:
        return expected[0]
    here = _process(spec, params, run, {**forced, rec.key: z}, start)
    return here + jnp.sum(expected - here, axis=0)


def _process(spec, params, run, forced, start):
    """The output-shaped surrogate of ``run`` for the tape from position ``start`` on."""
    s = run.out
    for rec in run.tape[start:]:
        if rec.key in forced:
            continue
        if isinstance(rec.estimator, REINFORCE):
            s = s + _reinforce(spec, params, run, rec)
        elif isinstance(rec.estimator, MVD):
            s = s + _mvd(spec, params, run, forced, rec)
        elif isinstance(rec.estimator, ENUM):
            return (s - run.out) + _enum(spec, params, run, forced, rec)
    return s


def _surrogate(spec: _Spec, params):
    run = _execute(spec, params, {})
    s = _reduce(spec, run, _process(spec, params, run, {}, 0)) + run.extra
    return s, sg(s)


# ---------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------


def check_data(*args, **kwargs) -> None:
    """Raise ``ValueError`` naming the argument if a concrete float array holds NaN or inf.

    Tracers (inside ``jit``) are skipped; drivers call this before compiling.

    Example::

        >>> import jax.numpy as jnp
        >>> check_data(jnp.array([1.0, 2.0]))
    """
    named = [(f"argument {i}", a) for i, a in enumerate(args)] + [
        (f"argument {k!r}", v) for k, v in kwargs.items()
    ]
    for label, value in named:
        for path, leaf in jax.tree_util.tree_flatten_with_path(value)[0]:
            if isinstance(leaf, jax.core.Tracer):
                continue
            if isinstance(leaf, (np.ndarray, jax.Array, float)):
                arr = np.asarray(leaf)
                if np.issubdtype(arr.dtype, np.floating) and not np.all(np.isfinite(arr)):
                    where = label + jax.tree_util.keystr(path)
                    raise ValueError(f"{where} contains NaN or inf values; clean the data first")


def _check_program(fn, what):
    if not callable(fn):
        raise TypeError(f"{what} must be a callable NumPyro program, got {type(fn).__name__}")


def value_and_grad(objective, model, guide, **unused):
    """Turn an objective program into an unbiased estimator of its value and gradient.

    :param objective: ``objective(model, guide, *args, **kwargs) -> array`` written with
        :func:`ppl.sample_trace`, :func:`ppl.log_density`, :func:`ppl.particles`, … (see
        ``ppl.objectives``), to be **maximised**; or a dict ``{"model": obj_p, "guide":
        obj_q}`` (wake-sleep): model params get ``obj_p``'s gradient, guide params
        ``obj_q``'s.
    :param model: a NumPyro model.
    :param guide: a NumPyro guide (or :func:`ppl.marginal` of one).
    :returns: ``f(params, rng_key, *args, **kwargs) -> (value f32[], grads)`` where
        ``params`` is a dict of unconstrained param values (:func:`init_params`) and
        ``grads`` has its structure. ``f`` is jit-compatible.

    Example::

        >>> import jax, jax.numpy as jnp, numpyro, numpyro.distributions as dist, ppl
        >>> def model(x):
        ...     z = numpyro.sample("z", dist.Normal(0, 1))
        ...     numpyro.sample("x", dist.Normal(z, 1), obs=x)
        >>> def guide(x):
        ...     m = numpyro.param("m", 0.0)
        ...     numpyro.sample("z", dist.Normal(m, 1))
        >>> x = jnp.array([0.5, 1.2, -0.3])
        >>> params = ppl.init_params(jax.random.PRNGKey(0), model, guide, x)
        >>> f = jax.jit(ppl.value_and_grad(ppl.objectives.elbo, model, guide))
        >>> value, grads = f(params, jax.random.PRNGKey(1), x)
        >>> sorted(grads)
        ['m']
    """
    if unused:
        raise TypeError(f"value_and_grad got unexpected keyword arguments {sorted(unused)}")
    if isinstance(objective, Mapping):
        if set(objective) != {"model", "guide"}:
            raise ValueError(
                f"a dict objective needs exactly the keys 'model' and 'guide', got "
                f"{sorted(objective)}"
            )
        for k, v in objective.items():
            _check_program(v, f"objective[{k!r}]")
    else:
        _check_program(objective, "objective")
    _check_program(model, "model")
    _check_program(guide, "guide")

    def f(params, rng_key, *args, **kwargs):
        if not isinstance(params, Mapping):
            raise TypeError(f"params must be a dict of param values, got {type(params)}")
        check_data(*args, **kwargs)
        setup = _setup(model, guide, params, rng_key, args, kwargs)

        def grad_of(obj):
            spec = _Spec(obj, model, guide, args, kwargs, rng_key, setup)
            (_, value), grads = jax.value_and_grad(lambda p: _surrogate(spec, p), has_aux=True)(
                params
            )
            return value, grads

        if not isinstance(objective, Mapping):
            return grad_of(objective)
        value, grads_p = grad_of(objective["model"])
        _, grads_q = grad_of(objective["guide"])
        owned = set(setup.model_params)
        grads = {k: (grads_p[k] if k in owned else grads_q[k]) for k in params}
        return value, grads

    return f


def init_params(rng_key, model, guide, *args, **kwargs) -> dict:
    """Initial unconstrained values of every ``numpyro.param`` of guide and model.

    Also creates the ``"<site>_baseline"`` params of ``REINFORCE(baseline="mean")`` sites
    and the params of callable baselines and of a :func:`ppl.marginal` reverse program.

    :returns: ``{name: unconstrained value}`` (guide params first, then model params).

    Example::

        >>> import jax, numpyro, numpyro.distributions as dist, ppl
        >>> def model():
        ...     numpyro.sample("z", dist.Normal(0, 1))
        >>> def guide():
        ...     s = numpyro.param("s", 1.0, constraint=dist.constraints.positive)
        ...     numpyro.sample("z", dist.Normal(0, s))
        >>> ppl.init_params(jax.random.PRNGKey(0), model, guide)
        {'s': Array(0., dtype=float32)}
    """
    check_data(*args, **kwargs)
    keys = jax.random.split(rng_key, 4)
    gt = trace(seed(_program(guide), keys[0])).get_trace(*args, **kwargs)
    shared = {n: s["value"] for n, s in gt.items() if s["type"] == "param"}
    model_fn = substitute(replay(seed(_program(model), keys[1]), gt), data=shared)
    mt = trace(model_fn).get_trace(*args, **kwargs)  # a model param may take the guide's
    traces = [gt]
    extra = getattr(guide, "_ppl_init_traces", None)
    if extra is not None:
        traces += extra(keys[2], gt, args, kwargs)
    traces.append(mt)
    params = {}
    for tr in traces:
        for name, site in tr.items():
            if site["type"] == "param" and name not in params:
                c = site["kwargs"].get("constraint")
                params[name] = unconstrain(site["value"], c)
    for name, site in gt.items():
        if site["type"] != "sample" or site["is_observed"]:
            continue
        est = resolve(site)
        if isinstance(est, REINFORCE) and est.baseline == "mean":
            params.setdefault(f"{name}_baseline", jnp.zeros(()))
        elif isinstance(est, REINFORCE) and callable(est.baseline):
            bt = trace(seed(est.baseline, keys[3])).get_trace(*args, **kwargs)
            for pname, psite in bt.items():
                if psite["type"] == "param" and pname not in params:
                    c = psite["kwargs"].get("constraint")
                    params[pname] = unconstrain(psite["value"], c)
    return {k: jax.tree.map(_strong, v) for k, v in params.items()}


def _strong(x):
    """A strongly typed array (Python floats would be weakly typed and retrace scans)."""
    x = jnp.asarray(x)
    return jnp.asarray(x, dtype=x.dtype)


def constrain_params(params, model, guide, *args, **kwargs) -> dict:
    """Constrained values of an unconstrained ``params`` dict (as ``numpyro.param`` sees them).

    Example::

        >>> import jax, numpyro, numpyro.distributions as dist, ppl
        >>> def model():
        ...     numpyro.sample("z", dist.Normal(0, 1))
        >>> def guide():
        ...     s = numpyro.param("s", 1.0, constraint=dist.constraints.positive)
        ...     numpyro.sample("z", dist.Normal(0, s))
        >>> p = ppl.init_params(jax.random.PRNGKey(0), model, guide)
        >>> float(ppl.constrain_params(p, model, guide)["s"])
        1.0
    """
    key = jax.random.PRNGKey(0)
    out = {}
    guide_fn = substitute_params(seed(_program(guide), key), params=params, strict=False)
    gt = trace(guide_fn).get_trace(*args, **kwargs)
    model_fn = substitute_params(
        replay(seed(_program(model), key), gt), params=params, strict=False
    )
    mt = trace(model_fn).get_trace(*args, **kwargs)
    for tr in (gt, mt):
        for name, site in tr.items():
            if site["type"] == "param" and name in params:
                out[name] = site["value"]
    for name in params:
        out.setdefault(name, params[name])
    return out
