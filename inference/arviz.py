"""Results as ArviZ ``InferenceData``: ``ppl.inference.to_inference_data``.

Every driver of :mod:`ppl.inference` ends in the same place: posterior draws of a
NumPyro model's latent sites, with leading ``(chain, draw)`` dims, turned into an
:class:`arviz.InferenceData` by :func:`build_inference_data`. That one function runs
the model at the draws and fills the groups

* ``posterior`` -- every latent ``sample`` site and every ``deterministic`` site of the
  model, dims ``(chain, draw, *site_dims)``;
* ``posterior_predictive`` -- the observed sites re-sampled at each draw;
* ``log_likelihood`` -- the pointwise log-likelihood of each observed site
  (:func:`numpyro.infer.util.log_likelihood`; event dims are summed, batch dims kept);
* ``observed_data`` -- the observed values;
* ``sample_stats`` -- what the driver passes (SVI: the loss trace; NUTS: divergences,
  step size, tree depth, ...).

Site dims are named from the model's plates: the trace's ``cond_indep_stack`` frames give
each plate's name and its batch dim, so a site in ``numpyro.plate("data", N)`` gets the
dim ``"data"``. Remaining dims are ``<site>_dim_<k>`` (``k`` = the dim's position after
``chain, draw``), or the names given in ``infer={"event_dims": [...]}`` of the sample
site (as :func:`arviz.from_numpyro` reads them). A plate called ``chain`` or ``draw``
gets the dim ``<plate>_plate``.

:func:`to_inference_data` is the SVI entry point: guide draws from
``numpyro.infer.Predictive(guide, params=..., num_samples=...)`` (one chain), then
:func:`build_inference_data`, with the loss trace in ``sample_stats``.

Example::

    >>> import jax, jax.numpy as jnp, numpyro, numpyro.distributions as dist
    >>> import arviz as az
    >>> from ppl.inference import to_inference_data
    >>> def model(x):
    ...     mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
    ...     with numpyro.plate("data", x.shape[0]):
    ...         numpyro.sample("x", dist.Normal(mu, 1.0), obs=x)
    >>> def guide(x):
    ...     m = numpyro.param("m", 0.0)
    ...     numpyro.sample("mu", dist.Normal(m, 0.5))
    >>> x = jnp.array([0.9, 1.4, 1.1, 0.6])
    >>> idata = to_inference_data({"m": 1.0}, model, guide, x, num_samples=200)
    >>> idata.posterior["mu"].dims
    ('chain', 'draw')
    >>> idata.log_likelihood["x"].dims
    ('chain', 'draw', 'data')
    >>> float(az.loo(idata).elpd_loo) < 0
    True
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Callable, Mapping
from typing import Any

import arviz as az
import jax
import jax.numpy as jnp
import numpy as np
import xarray as xr
from numpyro.handlers import seed, substitute, trace
from numpyro.infer import Predictive
from numpyro.infer.util import log_likelihood
from numpyro.primitives import Messenger

import ppl
from ppl.sparse import SparseTensor, to_dense

__all__ = [
    "to_inference_data",
    "build_inference_data",
    "check_model_args",
    "check_positive_int",
    "as_prng_key",
]

# draws per vectorised batch when re-running the model (bounds peak memory, not results)
_BATCH = 256


# ---------------------------------------------------------------------------
# input validation (shared with nuts.py; everything here runs before any compilation)
# ---------------------------------------------------------------------------


def check_positive_int(value, name: str, *, minimum: int = 1) -> int:
    """``value`` as an ``int`` >= ``minimum``, else a ``TypeError``/``ValueError`` naming it."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def as_prng_key(key, name: str = "key"):
    """A single raw ``uint32[2]`` PRNG key from ``key`` (``None`` -> ``PRNGKey(0)``;
    typed ``jax.random.key`` keys are accepted)."""
    if key is None:
        return jax.random.PRNGKey(0)
    if isinstance(key, (jax.Array, np.ndarray)):
        if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
            if key.shape != ():
                raise ValueError(f"{name} must be a single PRNG key, got shape {key.shape}")
            return jax.random.key_data(key)
        if key.shape == (2,) and key.dtype == jnp.uint32:
            return jnp.asarray(key)
    raise TypeError(
        f"{name} must be a PRNG key (jax.random.PRNGKey(seed) or jax.random.key(seed)), "
        f"got {type(key).__name__} {getattr(key, 'shape', '')}"
    )


def _arg_names(model: Callable, num_args: int) -> list[str]:
    """The model's parameter name for each positional argument (``args[i]`` if unknown)."""
    names: list[str] = []
    try:
        parameters = inspect.signature(model).parameters.values()
    except (TypeError, ValueError):
        parameters = ()
    for p in parameters:
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            names.append(p.name)
        elif p.kind is p.VAR_POSITIONAL:
            names += [f"{p.name}[{j}]" for j in range(num_args - len(names))]
        else:
            break
    names = names[:num_args]
    return names + [f"args[{i}]" for i in range(len(names), num_args)]


def check_model_args(model: Callable, args: tuple, kwargs: Mapping, *, what: str = "model"):
    """Raise ``ValueError`` naming the argument if an array argument of ``model`` (or any
    array inside a pytree argument) holds NaN or inf. Non-array arguments pass through."""
    names = _arg_names(model, len(args))
    items = list(zip(names, args, strict=True)) + list(kwargs.items())
    for name, value in items:
        for path, leaf in jax.tree_util.tree_flatten_with_path(value)[0]:
            if not isinstance(leaf, (np.ndarray, np.generic, jax.Array, float)):
                continue
            arr = np.asarray(leaf)
            if not np.issubdtype(arr.dtype, np.inexact):
                continue
            bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
            if bad:
                where = name + jax.tree_util.keystr(path)
                raise ValueError(
                    f"argument {where!r} of the {what} has {bad} non-finite value(s) "
                    f"(NaN or inf); pass finite data (mask missing values instead)"
                )


# ---------------------------------------------------------------------------
# running the model at draws
# ---------------------------------------------------------------------------


class _Unobserve(Messenger):
    """Turn observed ``sample`` sites into latent ones, so that ``seed`` re-samples them
    (the posterior predictive). Must sit inside ``seed``."""

    def process_message(self, msg):
        if msg["type"] == "sample" and msg["is_observed"]:
            msg["value"] = None
            msg["is_observed"] = False


def _vmapped(fn: Callable, xs, num: int):
    """``fn(x)`` for each of the ``num`` entries (leading axis) of the pytree ``xs``, as
    one jit-compiled program: ``vmap`` over batches of at most ``_BATCH`` entries,
    ``lax.map`` over the batches (the last batch padded, so the body is compiled once)."""
    nb = -(-num // _BATCH)
    batch = -(-num // nb)
    pad = nb * batch - num

    def run(xs):
        if nb == 1:
            return jax.vmap(fn)(xs)
        xs = jax.tree.map(lambda x: jnp.concatenate([x, x[:pad]]) if pad else x, xs)
        xs = jax.tree.map(lambda x: x.reshape((nb, batch) + x.shape[1:]), xs)
        out = jax.lax.map(jax.vmap(fn), xs)
        return jax.tree.map(lambda x: x.reshape((nb * batch,) + x.shape[2:])[:num], out)

    return jax.jit(run)(xs)


def _site_dims(
    name: str, site: dict, sizes: tuple, event_ndim: int, plate_dim: Mapping[str, str]
) -> list[str]:
    """Names of the per-draw dims of a site value of shape ``sizes``, the last
    ``event_ndim`` of which are event dims: plate frames (``cond_indep_stack``: name, dim
    counted from the right of the batch dims) name the batch dims they index when the
    size matches, ``infer["event_dims"]`` names event dims, the rest are
    ``<site>_dim_<k>``."""
    ndim = len(sizes)
    dims: list[str | None] = [None] * ndim
    batch_ndim = ndim - event_ndim
    for frame in site.get("cond_indep_stack", ()):
        axis = batch_ndim + frame.dim
        if 0 <= axis < batch_ndim and sizes[axis] == frame.size:
            dims[axis] = plate_dim.get(frame.name, frame.name)
    event_names = list((site.get("infer") or {}).get("event_dims", ()))
    if event_ndim and len(event_names) == event_ndim:
        dims[batch_ndim:] = event_names
    return [d if d is not None else f"{name}_dim_{k}" for k, d in enumerate(dims)]


def _to_numpy(tree):
    return jax.tree.map(np.asarray, tree)


def build_inference_data(
    model: Callable,
    samples: Mapping[str, Any],
    model_args: tuple = (),
    model_kwargs: Mapping[str, Any] | None = None,
    *,
    rng_key,
    params: Mapping[str, Any] | None = None,
    sample_stats: Mapping[str, Any] | xr.Dataset | None = None,
    attrs: Mapping[str, Any] | None = None,
) -> az.InferenceData:
    """Run ``model`` at posterior draws and gather the ``InferenceData`` groups.

    The shared back end of :func:`to_inference_data` (SVI) and :class:`ppl.inference.NUTS`.

    :param model: the NumPyro model.
    :param dict samples: ``{site: array[chain, draw, *site_shape]}``, constrained values of
        latent sample sites (other names -- guide-only auxiliary sites, deterministic
        sites -- are ignored; deterministic sites are recomputed). Latent sites missing
        here are drawn from their prior given the rest.
    :param tuple model_args: positional arguments of ``model`` (with the observed data).
    :param dict model_kwargs: keyword arguments of ``model``.
    :param rng_key: PRNG key for the posterior predictive.
    :param dict params: values substituted for ``numpyro.param`` sites of the model.
    :param sample_stats: ``{stat: array[chain, draw]}``, or a ready ``xarray.Dataset``
        (e.g. an SVI loss trace over its own ``step`` dim), or ``None``.
    :param dict attrs: extra netCDF-serialisable attributes for every group.
    :return: ``InferenceData`` with ``posterior``, and when the model has observed sites
        ``posterior_predictive``, ``log_likelihood``, ``observed_data``; plus
        ``sample_stats`` when given.
    """
    model_kwargs = dict(model_kwargs or {})
    params = dict(params or {})
    rng_key = as_prng_key(rng_key, "rng_key")
    if not samples:
        raise ValueError("samples is empty: the model has no latent sites to report")
    samples = {k: jnp.asarray(v) for k, v in samples.items()}
    lead = {k: v.shape[:2] for k, v in samples.items()}
    shapes = set(lead.values())
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise ValueError(f"samples must share leading (chain, draw) dims, got {lead}")
    num_chains, num_draws = next(iter(shapes))
    num = num_chains * num_draws
    flat = {k: v.reshape((num,) + v.shape[2:]) for k, v in samples.items()}

    model_p = substitute(model, params) if params else model
    key_proto, key_pred = jax.random.split(rng_key)

    # one trace at the first draw: site types, plates, event dims, observed values
    first = {k: v[0] for k, v in flat.items()}

    def first_latent(msg):  # never overwrite observed data or deterministic sites
        if msg["type"] == "sample" and not msg["is_observed"]:
            return first.get(msg["name"])
        return None

    proto = trace(seed(substitute(model_p, substitute_fn=first_latent), key_proto)).get_trace(
        *model_args, **model_kwargs
    )
    for name, site in proto.items():
        if site["type"] == "plate":
            size, sub = site["args"]
            if sub is not None and sub != size:
                raise ValueError(
                    f"plate {name!r} subsamples ({sub} of {size}); convert with model "
                    f"arguments that use the full data (no subsample_size)"
                )
    latent = [n for n, s in proto.items() if s["type"] == "sample" and not s["is_observed"]]
    observed = [n for n, s in proto.items() if s["type"] == "sample" and s["is_observed"]]
    determ = [n for n, s in proto.items() if s["type"] == "deterministic"]
    draws = {k: v for k, v in flat.items() if k in latent}

    # every latent + deterministic site, and the observed sites re-sampled, at each draw
    wanted = set(latent) | set(determ) | set(observed)

    def one(key_and_draw):
        key, draw = key_and_draw
        tr = trace(seed(_Unobserve(substitute(model_p, draw)), key)).get_trace(
            *model_args, **model_kwargs
        )
        values = {n: s["value"] for n, s in tr.items() if n in wanted}
        # pointwise log-likelihood at this draw (all latent sites, incl. prior-drawn ones)
        latent_values = {n: values[n] for n in latent}
        ll = {}
        if observed:
            ll = log_likelihood(model_p, latent_values, *model_args, batch_ndims=0, **model_kwargs)
        return values, ll

    keys = jax.random.split(key_pred, num)
    values, loglik = _vmapped(one, (keys, draws), num)

    # dim names: plates (a plate called "chain" or "draw" is renamed), event dims
    plate_dim = {}
    for n, site in proto.items():
        if site["type"] == "plate":
            plate_dim[n] = f"{n}_plate" if n in ("chain", "draw") else n

    values = _to_numpy(values)

    def chains(arr):
        arr = np.asarray(arr)
        return arr.reshape((num_chains, num_draws) + arr.shape[1:])

    def dims_of(name, arr):
        site = proto[name]
        ndim = arr.ndim - 2
        event_ndim = len(site["fn"].event_shape) if site["type"] == "sample" else 0
        return _site_dims(name, site, arr.shape[2:], min(event_ndim, ndim), plate_dim)

    dims, posterior = {}, {}
    for n in proto:
        if n in latent or n in determ:
            posterior[n] = chains(values[n])
            dims[n] = dims_of(n, posterior[n])
    pp, ll, obs, ll_dims = {}, {}, {}, {}
    for n in observed:
        pp[n] = chains(values[n])
        ll[n] = chains(loglik[n])
        dims[n] = dims_of(n, pp[n])
        ll_dims[n] = dims[n][: ll[n].ndim - 2]  # log_prob keeps the batch dims only
        # the observed value as the site sees it (broadcast by the plates if needed)
        obs[n] = np.broadcast_to(np.asarray(proto[n]["value"]), pp[n].shape[2:])

    kw = {"library": ppl, "attrs": dict(attrs or {})}
    groups = {"posterior": az.dict_to_dataset(posterior, dims=dims, **kw)}
    if observed:
        groups["posterior_predictive"] = az.dict_to_dataset(pp, dims=dims, **kw)
        groups["log_likelihood"] = az.dict_to_dataset(ll, dims=ll_dims, **kw)
        groups["observed_data"] = az.dict_to_dataset(obs, dims=dims, default_dims=[], **kw)
    if isinstance(sample_stats, xr.Dataset):
        groups["sample_stats"] = sample_stats
    elif sample_stats is not None:
        groups["sample_stats"] = az.dict_to_dataset(_to_numpy(dict(sample_stats)), **kw)
    return az.InferenceData(**groups)


# ---------------------------------------------------------------------------
# SVI results
# ---------------------------------------------------------------------------


def _bind_sparse_guide(result, model, guide):
    """``(model, guide)``, with a bare sparse-subspace guide bound to ``result.state``."""
    from ppl.transforms.subspace import SparseGuide, SubspaceState, restrict_prior

    if not isinstance(guide, SparseGuide):
        return model, guide
    state = getattr(result, "state", None)
    if not isinstance(state, SubspaceState):
        raise ValueError(
            "guide is a sparse-subspace guide, which needs its active sets: pass the SSVI "
            "result (it carries .state), or the bound pair "
            "model_r, guide_r = guide.bind(state) as model and guide"
        )
    # restrict_prior leaves a site already restricted (a model from guide.bind) unchanged
    return restrict_prior(model, state), guide.bind(state)[1]


def _split_result(result) -> tuple[dict, Any]:
    if isinstance(result, Mapping):
        return dict(result), None
    if hasattr(result, "params"):
        params = result.params
        if not isinstance(params, Mapping):
            raise TypeError(
                f"result.params must be a dict of param values, got {type(params).__name__}"
            )
        return dict(params), getattr(result, "losses", None)
    raise TypeError(
        "result must be an SVI result (an object with .params and .losses, such as "
        f"ppl.inference.SVIRunResult) or a dict of param values, got {type(result).__name__}"
    )


def to_inference_data(
    result,
    model: Callable | None = None,
    guide: Callable | None = None,
    *args,
    num_samples: int | None = None,
    key=None,
    **kwargs,
) -> az.InferenceData:
    """Convert a fitted guide (or an algorithm's result) into an ArviZ ``InferenceData``.

    Results of the algorithm drivers (e.g. :class:`ppl.inference.sbl.SBLResult`) carry
    their own conversion: ``to_inference_data(result)`` with no model and guide calls
    ``result.to_inference_data(key=key, ...)`` (extra keyword arguments are passed on;
    ``num_samples`` only when given).

    Draws ``num_samples`` samples from the guide (``numpyro.infer.Predictive(guide,
    params=params, num_samples=num_samples)``, one chain), runs the model at them and
    gathers the groups described in :mod:`ppl.inference.arviz`.

    :param result: an SVI result -- any object with ``.params`` (a dict of *constrained*
        param values, as ``SVI.get_params``) and optionally ``.losses`` (``[num_steps]``,
        ``-objective`` per step), e.g. :class:`ppl.inference.SVIRunResult` -- or a plain
        dict of constrained param values.
    :param model: the NumPyro model the guide approximates.
    :param guide: the guide (same signature as ``model``). A sparse-subspace guide
        (:func:`ppl.transforms.sparse_subspace`) is bound to ``result.state`` (an
        :class:`ppl.inference.SSVIResult`), or pass the pair ``guide.bind(state)``. Sparse
        sites (:class:`ppl.sparse.SparseTensor` draws) are reported dense, zeros off the
        active set, with the site's dense shape (Li et al., ICLR 2024).
    :param args: positional arguments of ``model`` and ``guide`` (including observed data).
    :param int num_samples: guide draws (``draw`` dim; ``chain`` has size 1); default 1000.
    :param key: PRNG key for the draws and the posterior predictive; ``PRNGKey(0)`` if
        ``None``.
    :param kwargs: keyword arguments of ``model`` and ``guide``.
    :return: ``arviz.InferenceData`` with groups

        * ``posterior``: ``{site: [1, num_samples, *site_dims]}`` for the model's latent
          and deterministic sites (guide-only auxiliary sites are left out);
        * ``posterior_predictive``, ``log_likelihood`` (pointwise, ``[1, num_samples,
          *batch_dims]``), ``observed_data`` for the observed sites;
        * ``sample_stats``: ``loss`` over its own ``step`` dim (``[num_steps]``), when the
          result has losses.

    Example::

        >>> import jax, jax.numpy as jnp, numpyro, numpyro.distributions as dist
        >>> from collections import namedtuple
        >>> def model(x):
        ...     mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
        ...     with numpyro.plate("data", x.shape[0]):
        ...         numpyro.sample("x", dist.Normal(mu, 1.0), obs=x)
        >>> def guide(x):
        ...     numpyro.sample("mu", dist.Normal(numpyro.param("m", 0.0), 0.5))
        >>> Result = namedtuple("Result", "params losses")
        >>> res = Result({"m": 0.8}, jnp.linspace(10.0, 5.0, 100))
        >>> x = jnp.array([0.9, 1.4, 1.1, 0.6])
        >>> idata = to_inference_data(res, model, guide, x, num_samples=50)
        >>> idata.posterior["mu"].shape, idata.sample_stats["loss"].dims
        ((1, 50), ('step',))
    """
    if model is None and guide is None and hasattr(result, "to_inference_data"):
        if num_samples is not None:
            kwargs["num_samples"] = num_samples
        return result.to_inference_data(key=key, **kwargs)
    if not callable(model):
        raise TypeError(f"model must be callable, got {type(model).__name__}")
    if not callable(guide):
        raise TypeError(f"guide must be callable, got {type(guide).__name__}")
    num_samples = check_positive_int(1000 if num_samples is None else num_samples, "num_samples")
    key = as_prng_key(key, "key")
    params, losses = _split_result(result)
    for name, value in params.items():
        leaves = jax.tree.leaves(value)
        if any(
            jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)
            and not bool(jnp.all(jnp.isfinite(leaf)))
            for leaf in leaves
        ):
            raise ValueError(f"result.params[{name!r}] has non-finite values (NaN or inf)")
    check_model_args(model, args, kwargs)
    model, guide = _bind_sparse_guide(result, model, guide)

    key_guide, key_model = jax.random.split(key)
    guide_draws = Predictive(guide, params=params, num_samples=num_samples, parallel=True)(
        key_guide, *args, **kwargs
    )
    # sparse sites: densify the draws (zeros off the active set), [num, *dense_shape]
    samples = {
        k: jnp.expand_dims(to_dense(v) if isinstance(v, SparseTensor) else v, 0)
        for k, v in guide_draws.items()
    }

    stats = None
    attrs = {"inference": "svi", "num_samples": num_samples}
    if losses is not None:
        loss = np.asarray(losses, dtype=np.float64).reshape(-1)
        stats = xr.Dataset(
            {"loss": ("step", loss)},
            coords={"step": np.arange(loss.shape[0])},
            attrs=az.data.base.make_attrs(
                {**attrs, "final_loss": float(loss[-1]) if loss.size else math.nan},
                library=ppl,
            ),
        )
    if not samples:
        raise ValueError("the guide has no sample sites: nothing to draw the posterior from")
    return build_inference_data(
        model,
        samples,
        args,
        kwargs,
        rng_key=key_model,
        params={k: v for k, v in params.items() if k not in samples},
        sample_stats=stats,
        attrs=attrs,
    )
