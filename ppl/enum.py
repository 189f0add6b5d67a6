r"""Model-side enumeration: discrete model sites that the guide does not sample, summed out.

A model site marked ``infer={"enumerate": "parallel"}`` (what
``numpyro.infer.config_enumerate`` sets on every discrete latent site) and absent from
the guide is marginalised exactly. With ``z`` the latent sites that the guide samples
(``values``) and ``e`` the enumerated ones, the model is scored by its marginal

.. math::

    \log p(x, z) = \log \sum_{e} p(x, z, e),

so an objective such as the ELBO ``E_q[log p(x, z) − log q(z)]`` (or IWELBO, Rényi, …
over the continuous latents) sees the discrete sites summed out, and the guide's own sites
keep whatever gradient estimator they have.

The sum is never formed over the joint support of ``e`` (``Π_e |supp e|`` terms): the
factors ``log p(site | parents)`` are a plated factor graph and the sum is a
sum-product contraction in the log semiring (``⊕ = logaddexp``, ``⊗ = +``), done by
*tensor variable elimination* (Obermeyer et al. 2019, "Tensor Variable Elimination for
Plated Factor Graphs", ICML): an enumerated variable is summed out at the innermost plate
set that contains it, after which the plates that no remaining variable lives in are
product-reduced (``Σ_i`` in log space). For a mixture, for instance,

.. math::

    \log p(x, \mu) = \log p(\mu) + \sum_{i} \log \sum_{k} \pi_k\, \mathcal N(x_i \mid \mu_k).

Chains are eliminated the same way. ``numpyro.contrib.funsor.markov`` (a Python loop)
recycles tensor dimensions, so the chain ``z_1 → … → z_T`` is contracted step after step
(the forward algorithm, ``O(T K²)``); ``numpyro.contrib.control_flow.scan`` stacks the steps
along a ``_time`` dimension whose transition factors are contracted by a parallel scan
(``funsor.sum_product.sequential_sum_product``; Särkkä and García-Fernández 2019).

Subsampling: a plate of size ``N`` seen through a minibatch of ``M`` carries the scale
``N / M``, applied where the plate is product-reduced (``s · Σ_{i ∈ batch} log g_i``, with
``g_i`` the plate element's factor after its local variables are summed out), which is
what NumPyro's ``TraceEnum_ELBO`` computes (a contracted cost times its scale) and an
unbiased estimate of the full-data ``Σ_i log g_i``. ``numpyro.handlers.scale`` factors are
linear for non-enumerated terms and, as in ``TraceEnum_ELBO``, must be one common scalar
over the terms that touch an enumerated site.

The machinery is NumPyro's (``numpyro.contrib.funsor``, see the ``TraceEnum_ELBO`` docs,
https://num.pyro.ai/en/stable/svi.html#traceenum-elbo, and
``numpyro.contrib.funsor.infer_util._enum_log_density``): the model runs under
``numpyro.contrib.funsor.enum`` with plates turned into enumeration-aware plates
(``plate_to_enum_plate``) and a packed trace; each site's log density becomes a funsor
named by its plates and enumerated variables; ``funsor.sum_product.sum_product`` (with
``plate_to_scale``) contracts them and ``compute_markov_factors`` eliminates ``scan`` time
dimensions.
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict, defaultdict
from collections.abc import Mapping

import funsor
import funsor.optimizer
import jax
import jax.numpy as jnp
import numpy as np
from numpyro.contrib.funsor import enum, plate_to_enum_plate
from numpyro.contrib.funsor import trace as packed_trace
from numpyro.contrib.funsor.infer_util import _get_shift, _shift_name, compute_markov_factors
from numpyro.distributions.util import is_identically_one
from numpyro.handlers import seed, substitute, trace
from numpyro.primitives import Messenger

funsor.set_backend("jax")

__all__ = ["enumerated_sites", "enum_log_density"]

_PREV = re.compile(r"^(_PREV_)+")


def enumerated_sites(model_trace: Mapping) -> tuple[str, ...]:
    """Names of the latent sample sites of a raw NumPyro trace marked for enumeration.

    :param model_trace: an ``OrderedDict`` ``name -> site`` (``numpyro.handlers.trace``).
    :returns: the names, in trace order, of the non-observed sample sites whose ``infer``
        has ``{"enumerate": "parallel"}`` (as ``numpyro.infer.config_enumerate`` sets).

    Example::

        tr = numpyro.handlers.trace(numpyro.handlers.seed(model, 0)).get_trace(x)
        enumerated_sites(tr)  # ('assignment',)
    """
    return tuple(
        name
        for name, site in model_trace.items()
        if site["type"] == "sample"
        and not site["is_observed"]
        and (site.get("infer") or {}).get("enumerate") == "parallel"
    )


class _values_not_enumerated(Messenger):
    """A site the caller gives a value is scored at that value, never enumerated."""

    def __init__(self, fn=None, names=frozenset()):
        self.names = names
        super().__init__(fn)

    def process_message(self, msg):
        if (
            msg["type"] == "sample"
            and not msg["is_observed"]
            and msg["name"] in self.names
            and (msg.get("infer") or {}).get("enumerate") is not None
        ):
            msg["infer"] = {**msg["infer"], "enumerate": None}  # a copy: infer may be shared


def _substitute_fn(values, subsamples, enumerating=False):
    """``substitute_fn`` giving latent sites their values and plates their subsamples.

    A function (not ``data=``) so that observed sites keep their ``obs`` and so that it
    also reaches ``scan`` bodies (NumPyro forwards substitute handlers into them). Under
    enumeration NumPyro enumerates every discrete site of a ``scan`` body, so such a site
    cannot be given a value.
    """

    def fn(msg):
        if msg["type"] == "sample" and not msg["is_observed"]:
            value = values.get(msg["name"])
            if (
                value is not None
                and enumerating
                and "_scan_current_index" in (msg.get("infer") or {})
                and msg["fn"].has_enumerate_support
            ):
                raise ValueError(
                    f"site {msg['name']!r} is enumerated inside numpyro.contrib.control_flow."
                    "scan (NumPyro enumerates every discrete site of a scan body) but values "
                    "gives it a value; drop it from the guide or move it out of the scan"
                )
            return value
        if msg["type"] == "plate":
            return subsamples.get(msg["name"])
        return None

    return fn


def _plate_nesting(model, args, kwargs, params, rng_key, subs_fn) -> int:
    """The number of batch dimensions of the model's sites (plates and unplated batch
    dims), by abstract evaluation of one plain execution (enumerated sites drawn)."""
    found = []

    def run():
        with trace() as tr, substitute(substitute_fn=subs_fn), substitute(data=params):
            with seed(rng_seed=rng_key):
                model(*args, **kwargs)
        rank = 0
        for site in tr.values():
            if site["type"] != "sample":
                continue
            fn = site["fn"]
            rank = max(rank, len(fn.batch_shape), jnp.ndim(site["value"]) - fn.event_dim)
            rank = max([rank] + [-f.dim for f in site["cond_indep_stack"] if f.dim is not None])
        found.append(rank)
        return None

    jax.eval_shape(run)
    return found[0]


def _site_log_prob(site):
    fn, value = site["fn"], site["value"]
    if site.get("intermediates"):
        lp = fn.log_prob(value, site["intermediates"])
    else:
        from ppl.dsl import log_prob  # late: ppl.dsl may import this module

        lp = log_prob(fn, value)
    if site.get("mask") is not None:
        lp = jnp.where(site["mask"], lp, 0.0)
    return lp


def _concrete_scale(scale, name):
    """A handler scale as a Python float (enumerated terms need one common scalar)."""
    try:
        value = np.asarray(scale)
    except Exception:  # a tracer: its value is unknown while tracing
        value = None
    if value is None or value.ndim != 0:
        raise ValueError(
            f"site {name!r} touches an enumerated site and has a non-constant or array "
            "numpyro.handlers.scale; enumeration supports only constant scalar scales "
            "(as NumPyro's TraceEnum_ELBO)"
        )
    return float(value)


def enum_log_density(
    model,
    values: Mapping,
    args: tuple = (),
    kwargs: Mapping | None = None,
    *,
    params: Mapping | None = None,
    rng_key,
    keep_plates: Mapping | None = None,
    plate_subsamples: Mapping | None = None,
    batch_rank: int = 0,
    max_plate_nesting: int | None = None,
) -> jax.Array:
    """The log density of ``model`` at ``values``, enumerated sites summed out exactly.

    Every latent site of ``model`` takes its value from ``values``, except sites marked
    ``infer={"enumerate": "parallel"}`` that ``values`` lacks: those are summed out
    (``log Σ_e p(x, z, e)``, see the module docstring). Observed sites use their ``obs``.
    Plates (nested, subsampled), ``mask``, ``scale`` and ``numpyro.contrib.funsor.markov``
    loops are handled as NumPyro's ``TraceEnum_ELBO`` does; ``numpyro.contrib.control_flow
    .scan`` chains as ``numpyro.contrib.funsor.log_density`` does (``TraceEnum_ELBO`` does
    not eliminate scan's time dimension). Traceable: usable under ``jit``, ``vmap`` and
    ``grad`` (w.r.t. ``values`` and ``params``).

    :param model: a NumPyro program (e.g. ``config_enumerate(model)``).
    :param values: ``{name: value}`` for every non-enumerated latent site (extra entries,
        and entries for observed sites, are ignored).
    :param args: the model's positional arguments.
    :param kwargs: the model's keyword arguments.
    :param params: ``{name: constrained value}`` substituted at ``param`` sites.
    :param rng_key: a PRNG key for anything random in the model (e.g. plate subsampling
        without ``plate_subsamples``).
    :param keep_plates: ``None``: return a scalar, every plate summed with its subsample
        scale. Or ``{plate name: dim}`` of plates enclosing every sample site of the model:
        the result keeps them as array dims, *without* their subsample scale (the caller
        applies it); other plates are summed with their scale.
    :param plate_subsamples: ``{plate name: subsample indices}`` to use (e.g. the guide's).
    :param batch_rank: the rank of the result when ``keep_plates`` is given.
    :param max_plate_nesting: the model's number of batch dims; by default found by
        abstract evaluation (enumeration dims go to the left of them and of ``batch_rank``).
    :returns: ``f32[]``; with ``keep_plates``, an array of rank ``batch_rank`` whose kept
        plate dims have the plate's (subsample) size and other dims size 1 — the output
        convention of ``ppl.dsl.sum_log_prob``.
    :raises ValueError: an enumerated site without finite support, or a latent site that
        is neither in ``values`` nor marked for enumeration (both named).

    Example::

        lp = enum_log_density(config_enumerate(mixture), {"locs": locs}, (x,),
                              params={}, rng_key=jax.random.key(0))
    """
    kwargs = dict(kwargs or {})
    values = dict(values)
    params = dict(params or {})
    kept = dict(keep_plates or {})
    subs_fn = _substitute_fn(values, dict(plate_subsamples or {}))
    if kept and any(-int(d) > batch_rank for d in kept.values()):
        raise ValueError(
            f"keep_plates {kept} has a dim beyond batch_rank={batch_rank}; pass the "
            "rank of the output as batch_rank"
        )
    if max_plate_nesting is None:
        max_plate_nesting = _plate_nesting(model, args, kwargs, params, rng_key, subs_fn)
    nesting = max(int(max_plate_nesting), int(batch_rank))

    enum_subs_fn = _substitute_fn(values, dict(plate_subsamples or {}), enumerating=True)
    with plate_to_enum_plate(), enum(first_available_dim=-nesting - 1 if nesting else None):
        with packed_trace() as model_trace, _values_not_enumerated(names=frozenset(values)):
            with substitute(substitute_fn=enum_subs_fn), substitute(data=params):
                with seed(rng_seed=rng_key):
                    model(*args, **kwargs)

    result = _contract(model_trace, values, kept)
    if not kept:
        if result.inputs:
            raise _leftover(result)
        return jnp.asarray(funsor.to_data(result))
    if set(result.inputs) - set(kept):
        raise _leftover(result)
    name_to_dim = OrderedDict((name, kept[name]) for name in result.inputs)
    out = jnp.asarray(funsor.to_data(result, name_to_dim=name_to_dim))
    return out.reshape((1,) * (batch_rank - out.ndim) + out.shape)


def _leftover(result):
    names = sorted({k.split("__BOUND")[0] for k in result.inputs})
    return ValueError(
        f"enum_log_density: the model's log density kept dimensions {names} that are "
        "neither plates nor enumerated sites"
    )


def _check_site(name, site, values):
    """Raise for enumeration that cannot happen; True when the site is enumerated."""
    base = _PREV.sub("", name)
    fn = site["fn"]
    marked = (site.get("infer") or {}).get("enumerate") == "parallel"
    if marked and not fn.has_enumerate_support:
        raise ValueError(
            f"site {base!r} is marked for enumeration (infer={{'enumerate': 'parallel'}}) "
            f"but its distribution {type(fn).__name__} has no finite support; sample it in "
            "the guide instead"
        )
    if marked:
        return True
    if base not in values:
        raise ValueError(
            f"latent site {base!r} of the model has no value: the guide must sample "
            f"{base!r} or mark it for enumeration with infer={{'enumerate': 'parallel'}} "
            "(e.g. numpyro.infer.config_enumerate(model))"
        )
    return False


def _contract(model_trace, values, kept):
    """Sum-product of the trace's log factors: enumerated sites and unkept plates out.

    Follows ``numpyro.contrib.funsor.infer_util._enum_log_density``, except that the
    factors are unscaled and subsample scales enter where their plates are reduced
    (``plate_to_scale``), and handler scales multiply the contracted terms.
    """
    sample_sites = [(n, s) for n, s in model_trace.items() if s["type"] == "sample"]
    sum_vars, prod_vars = frozenset(), frozenset()
    for name, site in sample_sites:
        if not site["is_observed"] and _check_site(name, site, values):
            sum_vars |= {name}
        frames = {f.name for f in site["cond_indep_stack"] if f.dim is not None}
        for plate in kept:
            if plate not in frames:
                raise ValueError(
                    f"enum_log_density(keep_plates=...): site {_PREV.sub('', name)!r} is "
                    f"not inside plate {plate!r}, so its log density cannot be kept per "
                    f"{plate!r} element"
                )
        prod_vars |= frames

    plate_to_scale: dict[str, float] = {}
    enum_factors, enum_scales, plain_factors = [], {}, []
    time_to_factors = defaultdict(list)
    time_to_init_vars = defaultdict(frozenset)
    time_to_markov_dims = defaultdict(frozenset)
    history = 0
    for name, site in sample_sites:
        lp = _site_log_prob(site)
        # subsample scales by plate; NumPyro files handlers.scale factors under key None
        site_plate_scales = {
            p: s for p, s in (site.get("plate_to_scale") or {}).items() if p is not None
        }
        plate_to_scale.update(site_plate_scales)
        scale = site["scale"]  # subsample scales x handler scales: keep the latter
        if scale is not None and site_plate_scales:
            scale = scale / math.prod(site_plate_scales.values())
        if scale is None or is_identically_one(scale):
            scale = None
        dim_to_name = site["infer"]["dim_to_name"]
        if all(d == 1 for d in jnp.shape(lp)) and dim_to_name == OrderedDict():
            lp = lp.squeeze()
        names = set(dim_to_name.values())
        # unplated batch dims (named "_pyro_dim_k" by the packed trace) are products too
        prod_vars |= {n for n in names if n not in sum_vars and not n.startswith("_time")}
        time_dim = None
        for dim, dname in dim_to_name.items():
            if dname.startswith("_time"):
                time_dim = funsor.Variable(dname, funsor.Bint[jnp.shape(lp)[dim]])
                history = max(history, max(_get_shift(s) for s in dim_to_name.values()))
                break
        if time_dim is None and not (names & sum_vars):
            if scale is not None:
                lp = lp * scale
            plain_factors.append(funsor.to_funsor(lp, output=funsor.Real, dim_to_name=dim_to_name))
            continue
        enum_scales[name] = 1.0 if scale is None else _concrete_scale(scale, _PREV.sub("", name))
        factor = funsor.to_funsor(lp, output=funsor.Real, dim_to_name=dim_to_name)
        if time_dim is None:
            enum_factors.append(factor)
            continue
        if history == 0:
            enum_factors.append(factor)
            prod_vars |= {time_dim.name}
        else:
            time_to_factors[time_dim].append(factor)
        time_to_init_vars[time_dim] |= frozenset(
            s for s in dim_to_name.values() if s.startswith("_PREV_")
        )

    common = set(enum_scales.values())
    if len(common) > 1:
        raise ValueError(
            "the sites that touch enumerated sites must share one numpyro.handlers.scale "
            f"(as in NumPyro's TraceEnum_ELBO); found scales {enum_scales}"
        )
    enum_scale = common.pop() if common else 1.0

    reduce_plates = prod_vars - frozenset(kept)
    if time_to_factors:
        for time_dim, init_vars in time_to_init_vars.items():
            for var in init_vars:
                curr = _shift_name(var, -_get_shift(var))
                dim_to_name = model_trace[curr]["infer"]["dim_to_name"]
                if var in dim_to_name.values():
                    time_to_markov_dims[time_dim] |= frozenset(dim_to_name.values())
        for time_dim in time_to_factors:
            inner = reduce_plates - time_to_markov_dims[time_dim]
            scaled = sorted(p for p in inner if plate_to_scale.get(p, 1.0) != 1.0)
            if scaled:
                raise NotImplementedError(
                    f"subsampled plate(s) {scaled} inside a scan body, eliminated within a "
                    "time step, are not supported by enumeration"
                )
        enum_factors = enum_factors + compute_markov_factors(
            time_to_factors,
            time_to_init_vars,
            time_to_markov_dims,
            sum_vars,
            reduce_plates,
            history,
            funsor.ops.logaddexp,
            funsor.ops.add,
        )

    result = _sum_product(plain_factors, frozenset(), reduce_plates, plate_to_scale)
    if enum_factors:
        contracted = _sum_product(enum_factors, sum_vars, reduce_plates, plate_to_scale)
        result = result + (contracted if enum_scale == 1.0 else contracted * enum_scale)
    return result


def _sum_product(factors, sum_vars, plates, plate_to_scale):
    """``log Σ_{sum_vars} Π_{plates} exp(Σ factors)`` by tensor variable elimination; a
    plate's subsample scale multiplies the log factor where the plate is reduced."""
    if not factors:
        return funsor.Number(0.0)
    with funsor.interpretations.lazy:
        lazy = funsor.sum_product.sum_product(
            funsor.ops.logaddexp,
            funsor.ops.add,
            factors,
            eliminate=frozenset(sum_vars) | frozenset(plates),
            plates=frozenset(plates),
            plate_to_scale={p: s for p, s in plate_to_scale.items() if s != 1.0},
        )
    return funsor.optimizer.apply_optimizer(lazy)
