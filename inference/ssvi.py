"""The SSVI driver: optimise (μ, ρ) on the active sets, update the sets on a schedule.

Training alternates (spec §1.5):

* φ-steps: ``every`` optimiser steps (optax) of ``-objective`` with the support fixed, run
  as one ``lax.scan`` per block (one compilation);
* γ-steps: at t = every, 2·every, … < t_end, :func:`ppl.transforms.update_support` removes
  ``floor(f(t)·s)`` weights per site and adds as many, f = :func:`cosine_fraction`; the
  growth score is ``|∂L/∂μ|`` of a dense probe at the posterior mean (``grow="grad"``) or
  uniform (``grow="random"``). With ``skip_step`` the batch of an update step only feeds the
  probe (no optimiser step), as in the reference.

Shapes never change, so the step block and the update compile once each.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from numpyro.handlers import seed, substitute, trace
from numpyro.primitives import Messenger

from ppl import objectives as _objectives
from ppl.grad import check_data, value_and_grad
from ppl.sparse import SparseTensor
from ppl.transforms.subspace import (
    CRITERIA,
    SparseGuide,
    SubspaceState,
    restrict_prior,
    update_support,
)

__all__ = ["SSVI", "SSVIResult", "cosine_fraction", "density_scaled", "scale_observed"]


def cosine_fraction(t, t_end, alpha):
    """The replaced fraction ``f(t) = (α/2)(1 + cos(π t / t_end))`` for ``t < t_end``, else 0.

    :param t: step (int or traced scalar). :param t_end: last update step (exclusive).
    :param alpha: the initial fraction α in [0, 1).
    :returns: ``f32[]``.

    >>> round(float(cosine_fraction(0, 100, 0.3)), 6), float(cosine_fraction(100, 100, 0.3))
    (0.3, 0.0)
    >>> round(float(cosine_fraction(50, 100, 0.3)), 6)
    0.15
    """
    t = jnp.asarray(t, jnp.float32)
    f = 0.5 * alpha * (1.0 + jnp.cos(jnp.pi * t / t_end))
    return jnp.where(t < t_end, f, 0.0)


def density_scaled(
    optimizer, guide: SparseGuide, *, power: float = 1.0, max_multiplier: float | None = 10.0
):
    """Wrap an optax optimizer so that each sparse site's mean moves ``(size/s)^power``
    times as far per step (``1/density`` by default); every other parameter is unchanged.

    Why: a unit of a weight site at density ρ sums ρ× fewer inputs (its effective fan-in is
    ``ρ·fan_in``). Adam's step is about ``lr`` per coordinate whatever the gradient's scale,
    so at one ``lr`` a sparse layer's output moves ρ times as far per step as the dense
    layer's (sign-coherent updates), and SSVI trains slower than dense VI for the same
    budget (the digits CNN at density 0.1 was 32 points behind after 600 steps). With
    ``power = 1`` the layer's output moves as far as the dense one's, the Adam rule
    ``lr ∝ 1/fan_in`` of the maximal-update parametrisation (Yang & Hu, 2021) applied to
    the effective fan-in; ``power = 0.5`` keeps the step relative to the
    ``1/√(ρ·fan_in)`` init scale instead. ρ of the scale parameters stays unscaled
    (σ = softplus(ρ) is not tied to the fan-in). The optimizer state is the wrapped one's,
    unchanged in structure, so :func:`ppl.transforms.update_support` resets its moments as
    before.

    :param optimizer: an ``optax.GradientTransformation`` over the guide's params.
    :param guide: the :class:`ppl.transforms.SparseGuide` (its sites are read at the first
        update, after ``init_state``).
    :param power: the exponent (0: no scaling).
    :param max_multiplier: the largest multiplier (default 10, density 0.1 at power 1;
        ``None``: no cap). Uncapped, the digits CNN at density 0.05 (20×) diverged to 28 %
        accuracy after 600 steps.

    >>> import jax.numpy as jnp, numpyro, numpyro.distributions as dist, optax
    >>> from ppl.transforms import sparse_subspace
    >>> def model():
    ...     numpyro.sample("w", dist.Normal(0.0, 1.0).expand([10, 10]).to_event(2))
    >>> guide, init_state = sparse_subspace(model, 0.25)
    >>> state = init_state(jax.random.PRNGKey(0))
    >>> opt = density_scaled(optax.sgd(1.0), guide)
    >>> g = {"w_loc": -jnp.ones(25), "w_rho": -jnp.ones(25)}
    >>> upd, _ = opt.update(g, opt.init(g))
    >>> float(upd["w_loc"][0]), float(upd["w_rho"][0])
    (4.0, 1.0)
    """
    if not isinstance(guide, SparseGuide):
        raise TypeError(f"guide must be a SparseGuide, got {type(guide).__name__}")
    if not (hasattr(optimizer, "init") and hasattr(optimizer, "update")):
        raise TypeError("optimizer must be an optax.GradientTransformation")
    power = float(power)
    if max_multiplier is not None and not max_multiplier >= 1.0:
        raise ValueError(f"max_multiplier must be >= 1 or None, got {max_multiplier}")
    cap = math.inf if max_multiplier is None else float(max_multiplier)

    def multipliers():
        if guide.sites is None:
            raise RuntimeError("density_scaled: call init_state(key, *args) on the guide first")
        return {
            f"{name}_loc": min((site.size / site.nse) ** power, cap)
            for name, site in guide.sites.items()
            if site.nse is not None and site.nse < site.size
        }

    def update(updates, state, params=None):
        updates, state = optimizer.update(updates, state, params)
        mult = multipliers()
        updates = {k: (v * mult[k] if k in mult else v) for k, v in updates.items()}
        return updates, state

    return optax.GradientTransformation(optimizer.init, update)


class scale_observed(Messenger):
    """Multiply the log density of observed sites by ``factor`` (minibatch ``N/B``).

    >>> import numpyro, numpyro.distributions as dist
    >>> from numpyro.handlers import trace
    >>> def model():
    ...     numpyro.sample("y", dist.Normal(0.0, 1.0), obs=0.0)
    >>> trace(scale_observed(model, 4.0)).get_trace()["y"]["scale"]
    4.0
    """

    def __init__(self, fn=None, factor=1.0):
        self.factor = factor
        super().__init__(fn)

    def process_message(self, msg):
        if msg["type"] == "sample" and msg["is_observed"]:
            msg["scale"] = self.factor if msg["scale"] is None else msg["scale"] * self.factor


class SSVIResult:
    """What :meth:`SSVI.run` returns.

    ``params`` (unconstrained μ, ρ), ``state`` (:class:`SubspaceState`), ``opt_state``,
    ``losses f32[num_steps]`` (−objective per step), ``history`` (one dict per support
    update: ``step``, ``fraction``, per site ``n_removed``/``n_added``/``n_regrown``/
    ``jaccard_magnitude``, ``density``, plus the callback's values), ``timing`` (compile and
    run seconds). Convert with ``ppl.inference.to_inference_data(result, key=..., ...)``.
    """

    def __init__(
        self, params, state, opt_state, losses, history, timing, model, guide, args, kwargs
    ):
        self.params, self.state, self.opt_state = params, state, opt_state
        self.losses, self.history, self.timing = losses, history, timing
        self.model, self.guide, self.args, self.kwargs = model, guide, args, kwargs

    def sample_posterior(self, key, num_samples: int) -> dict:
        """Guide draws ``{site: [num, s]}`` (sparse: active values) or ``[num, *shape]``
        (dense sites, in their support: a constrained site's Normal draw is pushed through
        ``biject_to(support)``)."""
        out = {}
        for k, (name, site) in enumerate(self.guide.sites.items()):
            loc = self.params[name + "_loc"]
            scale = jax.nn.softplus(self.params[name + "_rho"])
            eps = jax.random.normal(jax.random.fold_in(key, k), (num_samples,) + loc.shape)
            out[name] = site.constrain(loc + scale * eps)
        return out

    def to_inference_data(
        self, key=None, num_samples: int = 100, args=None, kwargs=None, batch_size=None
    ):
        """ArviZ ``InferenceData`` from ``num_samples`` guide draws (one chain).

        ``posterior[site]`` has dims ``(chain, draw, "{site}_active")`` for sparse sites
        (the ``s`` active values only), ``constant_data["{site}_idx"]`` the indices and
        ``attrs["{site}_shape"]`` the dense shape; ``posterior_predictive`` (observed and
        deterministic sites), ``log_likelihood``, ``observed_data`` at ``args`` (default:
        the training arguments); ``sample_stats["loss"]`` over ``step``;
        ``attrs["support_history"]`` (JSON).

        :param batch_size: draws evaluated at once (``lax.map``); default 1 when the guide
            has sparse sites (a sparse layer materialises a ``[s, batch·H·W]`` gather per
            draw, so vectorising 32 draws of the digits CNN at density 0.5 asked for 28 GB),
            else ``min(num_samples, 50)``.
        """
        import arviz as az
        import xarray as xr

        import ppl
        from ppl.inference.arviz import _Unobserve, check_positive_int

        num_samples = check_positive_int(num_samples, "num_samples")
        if batch_size is None:
            batch_size = 1 if self.state.idx else min(num_samples, 50)
        batch_size = check_positive_int(batch_size, "batch_size")
        key = jax.random.PRNGKey(0) if key is None else key
        args = self.args if args is None else tuple(args)
        kwargs = dict(self.kwargs if kwargs is None else kwargs)
        k_draw, k_pred = jax.random.split(key)
        draws = self.sample_posterior(k_draw, num_samples)
        idx = self.state.idx
        model = restrict_prior(self.model, self.state)

        def wrap(d):
            return {
                n: (SparseTensor(idx[n], v, self.guide.sites[n].shape) if n in idx else v)
                for n, v in d.items()
            }

        def one(k, d):
            cond = trace(seed(substitute(model, data=wrap(d)), k)).get_trace(*args, **kwargs)
            pred = trace(seed(_Unobserve(substitute(model, data=wrap(d))), k)).get_trace(
                *args, **kwargs
            )
            obs = [n for n, s in cond.items() if s["type"] == "sample" and s["is_observed"]]
            det = [n for n, s in cond.items() if s["type"] == "deterministic"]
            pp = {n: pred[n]["value"] for n in obs}
            pp.update({n: cond[n]["value"] for n in det})
            ll = {n: cond[n]["fn"].log_prob(cond[n]["value"]) for n in obs}
            return pp, ll

        keys = jax.random.split(k_pred, num_samples)
        pp, ll = jax.lax.map(
            lambda a: one(*a), (keys, draws), batch_size=min(num_samples, batch_size)
        )
        proto = trace(seed(substitute(model, data=wrap({n: v[0] for n, v in draws.items()})), 0))
        proto = proto.get_trace(*args, **kwargs)

        def chain(x):
            return np.asarray(x)[None]

        attrs = {"inference": "ssvi", "num_samples": num_samples}
        post, dims = {}, {}
        for n, v in draws.items():
            post[n] = chain(v)
            if n in idx:
                dims[n] = [f"{n}_active"]
                attrs[f"{n}_shape"] = ",".join(str(d) for d in self.guide.sites[n].shape)
        attrs["support_history"] = json.dumps(_jsonable(self.history))
        kw = {"library": ppl, "attrs": attrs}
        groups = {"posterior": az.dict_to_dataset(post, dims=dims, **kw)}
        if pp:
            groups["posterior_predictive"] = az.dict_to_dataset(
                {n: chain(v) for n, v in pp.items()}, **kw
            )
        if ll:
            groups["log_likelihood"] = az.dict_to_dataset(
                {n: chain(v) for n, v in ll.items()}, **kw
            )
            groups["observed_data"] = az.dict_to_dataset(
                {n: np.asarray(proto[n]["value"]) for n in ll}, default_dims=[], **kw
            )
        groups["constant_data"] = az.dict_to_dataset(
            {f"{n}_idx": np.asarray(v) for n, v in idx.items()}, default_dims=[], **kw
        )
        loss = np.asarray(self.losses, np.float64).reshape(-1)
        groups["sample_stats"] = xr.Dataset(
            {"loss": ("step", loss)}, coords={"step": np.arange(loss.shape[0])}, attrs=attrs
        )
        return az.InferenceData(**groups)


def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray | jax.Array | np.generic):
        return np.asarray(x).tolist()
    return x


def _finite(tree):
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


class SSVI:
    """Sparse subspace VI (Li et al., ICLR 2024) over a guide from
    :func:`ppl.transforms.sparse_subspace`.

    :param model: the NumPyro model (weights with Normal priors, layers written with
        :mod:`ppl.sparse`); it is wrapped in :class:`ppl.transforms.restrict_prior`.
    :param guide: the :class:`ppl.transforms.SparseGuide` of ``sparse_subspace(model, ...)``.
    :param optimizer: an ``optax.GradientTransformation`` (e.g. ``optax.adam(1e-3)``).
    :param objective: any ``ppl.objectives`` objective (maximised); default the ELBO.
    :param int every: ΔT, optimiser steps between support updates.
    :param float alpha: initial replaced fraction α in [0, 1) (the remove fraction).
    :param t_end: last update step: a fraction of ``num_steps`` in (0, 1] or an int.
    :param bool skip_step: no optimiser step on update steps (the reference's behaviour).
    :param criterion, grow, grow_scale, allow_regrow, lambda_exp: passed to
        :func:`ppl.transforms.update_support`.

    >>> import jax, jax.numpy as jnp, numpyro, numpyro.distributions as dist, optax, ppl
    >>> def model(x, y=None):
    ...     w = numpyro.sample("w", dist.Normal(0.0, 1.0).expand([6, 1]).to_event(2))
    ...     with numpyro.plate("data", x.shape[0]):
    ...         mean = ppl.sparse.matmul(x, w)[..., 0]
    ...         numpyro.sample("y", dist.Normal(mean, 0.1), obs=y)
    >>> x = jax.random.normal(jax.random.PRNGKey(0), (50, 6))
    >>> y = 2.0 * x[:, 1] - 3.0 * x[:, 4]
    >>> guide, init_state = ppl.transforms.sparse_subspace(model, 2 / 6, init_scale=(0.1, 0.0))
    >>> ssvi = SSVI(model, guide, optax.adam(0.05), every=50, alpha=0.9, t_end=0.8)
    >>> result = ssvi.run(jax.random.PRNGKey(1), 600, x, y)
    >>> result.state.idx["w"]   # the true support {1, 4}, found from a random start
    Array([1, 4], dtype=int32)
    """

    def __init__(
        self,
        model: Callable,
        guide: SparseGuide,
        optimizer,
        objective=None,
        *,
        every: int = 100,
        alpha: float = 0.3,
        t_end: float | int = 0.75,
        skip_step: bool = True,
        criterion="snr_abs",
        grow: str = "grad",
        grow_scale="mean",
        allow_regrow: bool = True,
        lambda_exp: float = 1.0,
    ):
        if not callable(model):
            raise TypeError(f"model must be a callable NumPyro model, got {type(model).__name__}")
        if not isinstance(guide, SparseGuide):
            raise TypeError(
                "guide must come from ppl.transforms.sparse_subspace(model, density), got "
                f"{type(guide).__name__}"
            )
        if not (hasattr(optimizer, "init") and hasattr(optimizer, "update")):
            raise TypeError("optimizer must be an optax.GradientTransformation")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be an int >= 1, got {every!r}")
        if not isinstance(alpha, int | float) or not (0.0 <= float(alpha) < 1.0):
            raise ValueError(f"alpha (the remove fraction) must be in [0, 1), got {alpha!r}")
        if isinstance(t_end, bool) or not isinstance(t_end, int | float) or t_end <= 0:
            raise ValueError(f"t_end must be a fraction in (0, 1] or a step count, got {t_end!r}")
        if isinstance(t_end, float) and t_end > 1.0:
            raise ValueError(f"t_end as a float is a fraction of num_steps in (0, 1], got {t_end}")
        if not callable(criterion) and criterion not in CRITERIA:
            raise ValueError(
                f"criterion must be one of {CRITERIA} or a callable, got {criterion!r}"
            )
        if grow not in ("grad", "random"):
            raise ValueError(f"grow must be 'grad' or 'random', got {grow!r}")
        self.model, self.guide, self.optimizer = model, guide, optimizer
        self.objective = _objectives.elbo if objective is None else objective
        self.every, self.alpha, self.t_end = every, float(alpha), t_end
        self.skip_step = bool(skip_step)
        self.update_kwargs = dict(
            criterion=criterion,
            grow=grow,
            grow_scale=grow_scale,
            allow_regrow=allow_regrow,
            lambda_exp=lambda_exp,
        )
        self._chunk = jax.jit(self._chunk_impl, static_argnames=("batch_size",))
        self._update = jax.jit(self._update_impl, static_argnames=("batch_size",))

    # ---------------------------------------------------------------------------- parts
    def init(self, rng_key, *args, **kwargs):
        """``(params, opt_state, state)``: a random support and the guide's initial params."""
        k1, k2 = jax.random.split(rng_key)
        state = self.guide.init_state(k1, *args, **kwargs)
        params = self.guide.init_params(k2, state, *args, **kwargs)
        return params, self.optimizer.init(params), state

    def _bound(self, state, factor):
        model = scale_observed(restrict_prior(self.model, state), factor)
        from functools import partial

        return model, partial(self.guide, support=state)

    @staticmethod
    def _batch(key, data, batch_size):
        if batch_size is None:
            return data
        n = data[0].shape[0]
        sel = jax.random.choice(key, n, (batch_size,), replace=False)
        return tuple(
            a[sel] if (hasattr(a, "shape") and a.ndim and a.shape[0] == n) else a for a in data
        )

    def _factor(self, data, batch_size):
        return 1.0 if batch_size is None else data[0].shape[0] / batch_size

    def dense_probe(self, params, state, batch, key, kwargs=None, factor=1.0):
        """``{site: f32[*shape]}``: ``∂(−log-likelihood)/∂W`` of each sparse site's dense
        weight tensor at the posterior mean (inactive entries 0, no noise), on ``batch``.

        One dense forward–backward pass (``O(B·d)``), run on update steps only.
        """
        kwargs = dict(kwargs or {})
        info = self.guide.sites
        fixed, dense = {}, {}
        for name, site in info.items():
            loc = params[name + "_loc"]
            if site.nse is None:
                fixed[name] = site.constrain(loc)
            else:
                flat = jnp.zeros(site.size, loc.dtype).at[state.idx[name]].set(loc)
                dense[name] = flat.reshape(site.shape)

        def nll(dense_w):
            tr = trace(seed(substitute(self.model, data={**fixed, **dense_w}), key)).get_trace(
                *batch, **kwargs
            )
            total = 0.0
            for site in tr.values():
                if site["type"] == "sample" and site["is_observed"]:
                    total = total - jnp.sum(site["fn"].log_prob(site["value"]))
            return total * factor

        return jax.grad(nll)(dense)

    def _chunk_impl(
        self, params, opt_state, state, key, t0, num_steps, skip_first, data, kwargs, *, batch_size
    ):
        factor = self._factor(data, batch_size)
        model, guide = self._bound(state, factor)
        vg = value_and_grad(self.objective, model, guide)

        def step(carry, i):
            params, opt_state = carry
            t = t0 + i
            kb, ks = jax.random.split(jax.random.fold_in(key, i))
            batch = self._batch(kb, data, batch_size)
            value, grads = vg(params, ks, *batch, **kwargs)
            grads = jax.tree.map(jnp.negative, grads)
            updates, new_opt = self.optimizer.update(grads, opt_state, params)
            new_params = optax.apply_updates(params, updates)
            active = (t < num_steps) & ~((i == 0) & skip_first)
            ok = active & jnp.isfinite(value) & _finite(new_params)
            params = jax.tree.map(lambda a, b: jnp.where(ok, a, b), new_params, params)
            opt_state = jax.tree.map(lambda a, b: jnp.where(ok, a, b), new_opt, opt_state)
            return (params, opt_state), (-value, ok)

        (params, opt_state), (losses, oks) = jax.lax.scan(
            step, (params, opt_state), jnp.arange(self.every)
        )
        return params, opt_state, losses, oks

    def _update_impl(self, params, opt_state, state, key, t, t_end, data, kwargs, *, batch_size):
        kb, kp, ku = jax.random.split(key, 3)
        batch = self._batch(kb, data, batch_size)
        kw = dict(self.update_kwargs)
        shapes = {n: self.guide.sites[n].shape for n in state.idx}
        grow_grad = None
        if kw["grow"] == "grad":
            grow_grad = self.dense_probe(
                params, state, batch, kp, kwargs, self._factor(data, batch_size)
            )
        frac = cosine_fraction(t, t_end, self.alpha)
        params, opt_state, state, info = update_support(
            params,
            opt_state,
            state,
            ku,
            fraction=frac,
            grow_grad=grow_grad,
            max_fraction=self.alpha,
            shapes=shapes,
            **kw,
        )
        return params, opt_state, state, info, frac

    # ---------------------------------------------------------------------------- driver
    def run(
        self,
        rng_key,
        num_steps: int,
        *args,
        batch_size: int | None = None,
        init: tuple | None = None,
        callback: Callable[[int, dict, SubspaceState], dict] | None = None,
        callback_every: int = 1,
        **kwargs,
    ) -> SSVIResult:
        """Train for ``num_steps`` optimiser steps (update steps included).

        :param rng_key: PRNG key.
        :param int num_steps: total steps.
        :param args: model arguments; with ``batch_size``, every array argument whose leading
            dim equals that of ``args[0]`` is minibatched (the likelihood is scaled by N/B).
        :param batch_size: minibatch size B (``None``: full batch).
        :param init: ``(params, opt_state, state)`` to start from (default :meth:`init`).
        :param callback: ``callback(step, params, state) -> dict`` called after every
            ``callback_every``-th block of ``every`` steps; its values go to ``history``.
        :returns: :class:`SSVIResult`.
        """
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"num_steps must be an int >= 1, got {num_steps!r}")
        if not args:
            raise ValueError("run needs the model's data as positional arguments")
        check_data(*args, **kwargs)
        n = getattr(args[0], "shape", (None,))[0] if getattr(args[0], "ndim", 0) else None
        if batch_size is not None:
            if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
                raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
            if n is None or batch_size > n:
                raise ValueError(f"batch_size {batch_size} exceeds the {n} data points")
            if batch_size == n:
                batch_size = None
        t_end = self.t_end if isinstance(self.t_end, int) else int(self.t_end * num_steps)
        k_init, k_run = jax.random.split(rng_key)
        params, opt_state, state = self.init(k_init, *args, **kwargs) if init is None else init
        data = tuple(jnp.asarray(a) if isinstance(a, np.ndarray) else a for a in args)
        losses, history = [], []
        timing = {"compile_s": 0.0, "run_s": 0.0, "update_s": 0.0}
        compiled = {"chunk": False, "update": False}
        block = 0
        for t0 in range(0, num_steps, self.every):
            key = jax.random.fold_in(k_run, t0)
            is_update = 0 < t0 < t_end and self.alpha > 0
            if is_update:
                tic = time.perf_counter()
                params, opt_state, state, info, frac = self._update(
                    params,
                    opt_state,
                    state,
                    jax.random.fold_in(key, 1),
                    t0,
                    t_end,
                    data,
                    kwargs,
                    batch_size=batch_size,
                )
                jax.block_until_ready(state.idx)
                elapsed = time.perf_counter() - tic
                timing["compile_s" if not compiled["update"] else "update_s"] += elapsed
                compiled["update"] = True
                rec = {"step": t0, "fraction": float(frac)}
                for site, si in info.items():
                    rec[site] = {k: float(v) for k, v in si.items()}
                    rec[site]["density"] = (
                        int(state.idx[site].shape[0]) / self.guide.sites[site].size
                    )
                history.append(rec)
            tic = time.perf_counter()
            params, opt_state, block_losses, _ = self._chunk(
                params,
                opt_state,
                state,
                key,
                t0,
                num_steps,
                jnp.asarray(is_update and self.skip_step),
                data,
                kwargs,
                batch_size=batch_size,
            )
            block_losses = np.asarray(block_losses)
            elapsed = time.perf_counter() - tic
            timing["compile_s" if not compiled["chunk"] else "run_s"] += elapsed
            compiled["chunk"] = True
            losses.append(block_losses[: max(0, min(self.every, num_steps - t0))])
            block += 1
            if callback is not None and (
                block % callback_every == 0 or t0 + self.every >= num_steps
            ):
                extra = callback(min(t0 + self.every, num_steps), params, state) or {}
                history.append({"step": min(t0 + self.every, num_steps), **dict(extra)})
        return SSVIResult(
            params,
            state,
            opt_state,
            np.concatenate(losses),
            history,
            timing,
            self.model,
            self.guide,
            tuple(args),
            dict(kwargs),
        )
