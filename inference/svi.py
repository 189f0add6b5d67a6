"""Stochastic variational inference with optax: ``ppl.inference.SVI``.

NumPyro's ``SVI`` shape (``init`` / ``update`` / ``run`` / ``get_params`` / ``evaluate``),
driven by any objective of :mod:`ppl.objectives` (or a user's own) through
:func:`ppl.value_and_grad`, plus what long runs need: a jit-compiled step scanned in
chunks under a progress bar, a NaN/inf guard, atomic checkpoints with bit-identical
resume, explicit minibatch iterators and data parallelism over a
``jax.sharding.Mesh``. A NumPyro ELBO instance (``Trace_ELBO()``, ``TraceGraph_ELBO()``,
``TraceEnum_ELBO()``, ``RenyiELBO()``) may stand in for the objective and a
``numpyro.optim`` optimizer for the optax one; the other way round,
:func:`ppl.as_numpyro_loss` makes a ppl objective the ``loss=`` of ``numpyro.infer.SVI``.

Conventions
-----------
* Objectives are **maximised**; like NumPyro, the *loss* reported by ``update``,
  ``evaluate`` and ``run`` is ``-objective`` (e.g. the negative ELBO) and is minimised.
* ``SVIState.params`` are **unconstrained**; :meth:`SVI.get_params` and
  ``SVIRunResult.params`` are **constrained** (what ``numpyro.param`` returns).
* Step ``i`` (0-based; ``losses[i]``) uses the key ``jax.random.fold_in(state.rng_key, i)``,
  so results do not depend on how steps are grouped into chunks or split across
  interrupted and resumed runs.

Example::

    >>> import jax, jax.numpy as jnp, optax, numpyro, numpyro.distributions as dist
    >>> from ppl.inference import SVI
    >>> def model(x):
    ...     mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
    ...     with numpyro.plate("data", x.shape[0]):
    ...         numpyro.sample("x", dist.Normal(mu, 1.0), obs=x)
    >>> def guide(x):
    ...     m = numpyro.param("m", 0.0)
    ...     s = numpyro.param("s", 1.0, constraint=dist.constraints.positive)
    ...     numpyro.sample("mu", dist.Normal(m, s))
    >>> x = jnp.array([0.9, 1.4, 1.1, 0.6])
    >>> svi = SVI(model, guide, optax.adam(0.05))
    >>> result = svi.run(jax.random.PRNGKey(0), 500, x, progress_bar=False)
    >>> result.losses.shape
    (500,)
    >>> sorted(result.params)
    ['m', 's']
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import itertools
import json
import math
import operator
import os
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import ppl
import ppl.dsl
from ppl import interop as _interop

from . import checkpoint as _ckpt

__all__ = ["SVI", "SVIState", "SVIRunResult", "SVINonFiniteError"]


# ---------------------------------------------------------------------------
# state and results
# ---------------------------------------------------------------------------


class SVIState(NamedTuple):
    """The full state of an SVI run (a pytree; every field is an array or dict of arrays).

    :ivar dict params: unconstrained ``numpyro.param`` values ``{name: array}``.
    :ivar opt_state: the optimiser state for ``params`` (optax's, or a ``numpyro.optim``
        optimizer's ``(step, state)``).
    :ivar rng_key: the run's base PRNG key (constant); step ``i`` uses
        ``jax.random.fold_in(rng_key, i)``.
    :ivar step: ``int32[]``, the number of steps taken so far (accepted or rejected).
    :ivar num_bad: ``int32[]``, the number of consecutive rejected (non-finite) steps.
    :ivar nonfinite_grads: ``{name: bool[]}``, params whose gradient was non-finite in the
        current run of rejected steps (all ``False`` after an accepted step).
    :ivar nonfinite_loss: ``bool[]``, whether the objective's value was non-finite in the
        current run of rejected steps.
    """

    params: dict
    opt_state: Any
    rng_key: jax.Array
    step: jax.Array
    num_bad: jax.Array
    nonfinite_grads: dict
    nonfinite_loss: jax.Array


class SVIRunResult(NamedTuple):
    """What :meth:`SVI.run` returns.

    :ivar dict params: **constrained** param values (as :meth:`SVI.get_params`).
    :ivar SVIState state: the final state (feed it to ``run(..., init_state=state)``).
    :ivar losses: ``f32[num_steps]``, ``-objective`` per step (NaN/inf for rejected steps).
    """

    params: dict
    state: SVIState
    losses: jax.Array


class SVINonFiniteError(FloatingPointError):
    """Raised by :meth:`SVI.run` after ``max_bad_steps`` consecutive non-finite steps.

    :ivar SVIState state: the last good state (right after the last accepted step).
    :ivar losses: the losses of the steps up to that state.
    :ivar int step: the 0-based index of the step that exhausted ``max_bad_steps``.
    :ivar list sites: the param sites whose gradients were non-finite.
    """

    def __init__(self, message, *, state, losses, step, sites):
        super().__init__(message)
        self.state = state
        self.losses = losses
        self.step = step
        self.sites = sites


# ---------------------------------------------------------------------------
# helpers: argument handling (static vs traced), validation, placement
# ---------------------------------------------------------------------------


def _is_array(x) -> bool:
    return isinstance(x, (np.ndarray, np.generic, jax.Array))


class _Hashable:
    """Wrap a static leaf: equal by value when hashable, else by identity."""

    __slots__ = ("value", "_key")

    def __init__(self, value):
        self.value = value
        try:
            hash(value)
            self._key = (type(value), value)
        except TypeError:
            self._key = ("id", id(value))

    def __hash__(self):
        return hash(self._key)

    def __eq__(self, other):
        return isinstance(other, _Hashable) and self._key == other._key


class _Static(NamedTuple):
    """The non-array part of ``(args, kwargs)``: their treedef and non-array leaves.

    Array leaves are traced arguments of the compiled step (new data of the same shape
    does not recompile); everything else (Python numbers, strings, callables) is a
    compile-time constant, as in ``numpyro.infer.SVI.run`` which closes over its args.
    """

    treedef: Any
    static: tuple
    num_leaves: int

    def merge(self, dyn):
        leaves = list(dyn)[::-1]
        fixed = dict(self.static)
        out = [fixed[i].value if i in fixed else leaves.pop() for i in range(self.num_leaves)]
        return jax.tree_util.tree_unflatten(self.treedef, out)


def _split(args, kwargs) -> tuple[_Static, list]:
    leaves, treedef = jax.tree_util.tree_flatten((tuple(args), dict(kwargs)))
    static, dyn = [], []
    for i, leaf in enumerate(leaves):
        if _is_array(leaf):
            dyn.append(leaf)
        else:
            static.append((i, _Hashable(leaf)))
    return _Static(treedef, tuple(static), len(leaves)), dyn


def _count(name, value, *, allow_none=False):
    if value is None and allow_none:
        return None
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an integer >= 1, got {value!r}")
    try:
        n = operator.index(value)
    except TypeError:
        raise TypeError(
            f"{name} must be an integer >= 1, got {type(value).__name__} {value!r}"
        ) from None
    if n < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {n}")
    return n


def _check_key(rng_key):
    if isinstance(rng_key, jax.Array | np.ndarray):
        dtype = rng_key.dtype
        if jnp.issubdtype(dtype, jax.dtypes.prng_key) and rng_key.ndim == 0:
            return rng_key
        if dtype == np.uint32 and rng_key.ndim == 1 and rng_key.shape[0] >= 2:
            return jnp.asarray(rng_key)
    raise TypeError(
        "rng_key must be a single JAX PRNG key (jax.random.PRNGKey(0) or jax.random.key(0)), "
        f"got {type(rng_key).__name__} {getattr(rng_key, 'shape', '')}"
    )


def _is_typed_key(key) -> bool:
    return jnp.issubdtype(key.dtype, jax.dtypes.prng_key)


def _strong(x):
    """``x`` as a strongly typed array (so scan/cond carry types stay fixed)."""
    x = jnp.asarray(x)
    return jnp.asarray(x, dtype=x.dtype)


def _to_host(x) -> np.ndarray:
    """A host copy that also works for global arrays spanning several processes."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        if x.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def _all_finite(tree) -> jax.Array:
    """``bool[]``: every element of every leaf of ``tree`` is finite."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)]
    return functools.reduce(operator.and_, leaves, jnp.bool_(True))


def _keep_if(ok, new, old):
    """``new`` if ``ok`` else ``old`` (pytrees of equal structure). On CPU one conditional
    (a select per leaf is one kernel each there); elsewhere a select per leaf (on GPU a
    conditional reads its predicate back to the host)."""
    if jax.default_backend() == "cpu":
        return jax.lax.cond(ok, lambda: new, lambda: old)
    return jax.tree_util.tree_map(lambda n, o: jnp.where(ok, n, o), new, old)


def _loss_dtype():
    return jnp.result_type(float)


def _data_size(mesh: Mesh, data_axis) -> int:
    axes = data_axis if isinstance(data_axis, tuple) else (data_axis,)
    return math.prod(mesh.shape[a] for a in axes)


def _place(x, sharding):
    """Make a global ``jax.Array`` with ``sharding`` from this process's data.

    With one process the local data *is* the global array. With several processes (after
    ``jax.distributed.initialize()``), a batch-sharded ``x`` is this process's rows and
    the global leading axis is the concatenation over processes; a replicated ``x`` must
    be identical on every process. Arrays that already live on the mesh pass unchanged.
    """
    if isinstance(x, jax.Array) and x.sharding == sharding:
        return x
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return jax.device_put(x, sharding)
    if jax.process_count() == 1:
        return jax.device_put(x, sharding)
    return jax.make_array_from_process_local_data(sharding, np.asarray(x))


def _replicate_state(state: SVIState, sharding) -> SVIState:
    key = state.rng_key
    typed = _is_typed_key(key)
    impl = jax.random.key_impl(key) if typed else None
    raw = jax.random.key_data(key) if typed else key
    out = jax.tree_util.tree_map(lambda a: _place(a, sharding), state._replace(rng_key=raw))
    if typed:
        out = out._replace(rng_key=jax.random.wrap_key_data(out.rng_key, impl=impl))
    return out


def _check_optimizer(optimizer):
    """The ``numpyro.optim`` optimiser to drive through its own API, or ``None`` for optax."""
    if isinstance(optimizer, optax.GradientTransformation):
        return None
    from numpyro.optim import Minimize, _NumPyroOptim

    if isinstance(optimizer, Minimize):
        raise TypeError(
            "optimizer=numpyro.optim.Minimize() is not supported: it re-evaluates the loss "
            "(BFGS) instead of taking gradient steps; use an optax.GradientTransformation "
            "such as optax.adam(1e-2) or a gradient-based numpyro.optim optimizer "
            "(numpyro.optim.Adam(1e-2), ClippedAdam, SGD, ...)"
        )
    if isinstance(optimizer, _NumPyroOptim):
        return optimizer
    raise TypeError(
        "optimizer must be an optax.GradientTransformation such as optax.adam(1e-2) or a "
        "numpyro.optim optimizer such as numpyro.optim.Adam(1e-2), "
        f"got {type(optimizer).__module__}.{type(optimizer).__qualname__}"
    )


def _param_constraints(model, guide, params, args, kwargs) -> dict:
    """``{name: constraint}`` of the param sites (traced abstractly)."""
    return _interop._param_constraints(
        model,
        guide,
        jax.random.PRNGKey(0),
        args,
        kwargs,
        lambda: ppl.dsl.substitute_params(params=params, strict=False),
    )


def _constrained(value, constraint):
    return value if constraint is None else ppl.dsl.constrain(value, constraint)


def _accepted_keywords(fn):
    """``(names, accepts_any)``: the keyword parameters of program ``fn``."""
    fn = getattr(fn, "_ppl_program", fn)
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # a builtin or C callable: cannot tell
        return (), True
    names, any_kw = [], False
    for p in sig.parameters.values():
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            any_kw = True
        elif p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY):
            names.append(p.name)
    return tuple(names), any_kw


def _check_stable_update(stable_update):
    if not isinstance(stable_update, bool | np.bool_):
        raise TypeError(f"stable_update must be True or False, got {stable_update!r}")
    if not stable_update:
        raise ValueError(
            "stable_update=False is not supported: ppl.inference.SVI always rejects steps "
            "with a non-finite loss, gradient or update (like numpyro's stable_update=True) "
            "and stops after max_bad_steps consecutive ones; leave stable_update out"
        )


# NumPyro ``SVI.run`` options that ppl.inference.SVI does not have (with what to do instead).
_NUMPYRO_ONLY = {
    "forward_mode_differentiation": "ppl.inference.SVI differentiates in reverse mode only",
}


def _param_table(params) -> dict:
    return {k: f"{jnp.result_type(v)}{tuple(np.shape(v))}" for k, v in sorted(params.items())}


def _param_hash(params) -> str:
    return hashlib.sha256(json.dumps(_param_table(params)).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------
# SVI
# ---------------------------------------------------------------------------


class SVI:
    """Stochastic variational inference: maximise ``objective`` over the params of
    ``model`` and ``guide`` with an optax optimiser.

    :param model: a NumPyro model ``model(*args, **kwargs)``.
    :param guide: a NumPyro guide with the same signature (may use
        :func:`ppl.transforms.estimators`, :func:`ppl.marginal`, …).
    :param optimizer: an ``optax.GradientTransformation`` (e.g. ``optax.adam(1e-2)``);
        it receives the gradient of the **loss** (``-objective``), so it minimises as usual.
        ``GradientTransformationExtraArgs`` also get ``value=loss``. Or a gradient-based
        ``numpyro.optim`` optimizer (``numpyro.optim.Adam(1e-2)``, ``ClippedAdam``,
        ``SGD``, …; https://num.pyro.ai/en/stable/optimizers.html), driven through its own
        ``init`` / ``update(grads, state, value=loss)`` / ``get_params`` as
        ``numpyro.infer.SVI`` does; ``SVIState.opt_state`` is then its state.
        ``numpyro.optim.Minimize`` is refused (it does not take gradient steps).
    :param objective: an objective of :mod:`ppl.objectives` (default ``elbo``), a user's
        own ``objective(model, guide, *args, **kwargs)``, a wake-sleep dict
        ``{"model": obj_p, "guide": obj_q}`` or :func:`ppl.as_numpyro_loss` of one; or a
        NumPyro ELBO instance (``numpyro.infer.Trace_ELBO()``, ``TraceGraph_ELBO()``,
        ``TraceEnum_ELBO()``, ``RenyiELBO()``, with any ``num_particles``;
        https://num.pyro.ai/en/stable/svi.html): the step then uses NumPyro's own loss and
        its gradient (:func:`ppl.interop.elbo_value_and_grad`), and the reported loss is
        NumPyro's (the negative ELBO estimate). ``numpyro.mutable`` state is not supported.

    The jit-compiled step is ``value, grads = ppl.value_and_grad(objective, model,
    guide)(params, fold_in(rng_key, step), *args)`` followed by the optimiser update with
    ``-grads``. A step whose value, gradient or updated params are non-finite is rejected
    (params and optimiser state are kept, ``state.num_bad`` counts it).

    Example::

        >>> import jax, jax.numpy as jnp, optax, numpyro, numpyro.distributions as dist
        >>> from ppl.inference import SVI
        >>> def model(x):
        ...     mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
        ...     with numpyro.plate("data", x.shape[0]):
        ...         numpyro.sample("x", dist.Normal(mu, 1.0), obs=x)
        >>> def guide(x):
        ...     m = numpyro.param("m", 0.0)
        ...     numpyro.sample("mu", dist.Normal(m, 0.5))
        >>> x = jnp.ones(8)
        >>> svi = SVI(model, guide, optax.adam(0.1))
        >>> state = svi.init(jax.random.PRNGKey(0), x)
        >>> state, loss = svi.update(state, x)      # one step, loss f32[]
        >>> int(state.step)
        1
    """

    def __init__(self, model: Callable, guide: Callable, optimizer, objective=None):
        if not callable(model):
            raise TypeError(f"model must be a callable NumPyro program, got {type(model)}")
        if not callable(guide):
            raise TypeError(f"guide must be a callable NumPyro program, got {type(guide)}")
        numpyro_optim = _check_optimizer(optimizer)
        if objective is None:
            objective = ppl.objectives.elbo
        if isinstance(objective, _interop.NumPyroLoss):  # ppl.as_numpyro_loss(obj): unwrap
            objective = objective.objective
        self.model = model
        self.guide = guide
        self.optimizer = optimizer
        self.objective = objective
        self._numpyro_optim = numpyro_optim
        self._optim = (
            None if numpyro_optim is not None else optax.with_extra_args_support(optimizer)
        )
        if _interop.is_numpyro_elbo(objective):
            self._value_and_grad = _interop.elbo_value_and_grad(objective, model, guide)
        else:
            self._value_and_grad = ppl.value_and_grad(objective, model, guide)
        self._constrain_args: tuple | None = None
        self._jit_step = jax.jit(self._step_impl, static_argnums=0)
        self._jit_eval = jax.jit(self._eval_impl, static_argnums=0)
        self._jit_chunk = jax.jit(self._chunk_impl, static_argnums=(0, 1, 2))

    # -- the step -----------------------------------------------------------------

    def _step_core(self, state: SVIState, args, kwargs):
        """One guarded optimisation step (pure): ``(new_state, loss)``."""
        key = jax.random.fold_in(state.rng_key, state.step)
        value, grads = self._value_and_grad(state.params, key, *args, **kwargs)
        loss = (-jnp.asarray(value)).astype(_loss_dtype())
        grads = {
            k: jax.tree_util.tree_map(
                lambda g, p: jnp.asarray(g, jnp.result_type(p)), grads[k], state.params[k]
            )
            for k in state.params
        }
        bad_grad = {k: ~_all_finite(grads[k]) for k in state.params}
        bad_value = ~jnp.isfinite(loss)
        neg = jax.tree_util.tree_map(jnp.negative, grads)
        if self._numpyro_optim is not None:  # as numpyro.optim's eval_and_update does
            opt_state = self._numpyro_optim.update(neg, state.opt_state, value=loss)
            params = self._numpyro_optim.get_params(opt_state)
        else:
            updates, opt_state = self._optim.update(neg, state.opt_state, state.params, value=loss)
            params = optax.apply_updates(state.params, updates)
        params = jax.tree_util.tree_map(
            lambda new, old: jnp.asarray(new, jnp.result_type(old)), params, state.params
        )
        finite_params = _all_finite(params)
        any_bad_grad = functools.reduce(operator.or_, bad_grad.values(), jnp.bool_(False))
        ok = ~bad_value & ~any_bad_grad & finite_params

        params, opt_state = _keep_if(ok, (params, opt_state), (state.params, state.opt_state))
        new_state = SVIState(
            params=params,
            opt_state=opt_state,
            rng_key=state.rng_key,
            step=state.step + 1,
            num_bad=jnp.where(ok, 0, state.num_bad + 1).astype(state.num_bad.dtype),
            nonfinite_grads={
                k: jnp.where(ok, False, state.nonfinite_grads[k] | bad_grad[k])
                for k in state.nonfinite_grads
            },
            nonfinite_loss=jnp.where(ok, False, state.nonfinite_loss | bad_value),
        )
        return new_state, loss

    def _step_impl(self, static: _Static, state, dyn):
        args, kwargs = static.merge(dyn)
        return self._step_core(state, args, kwargs)

    def _eval_impl(self, static: _Static, state, dyn):
        args, kwargs = static.merge(dyn)
        key = jax.random.fold_in(state.rng_key, state.step)
        value, _ = self._value_and_grad(state.params, key, *args, **kwargs)
        return (-jnp.asarray(value)).astype(_loss_dtype())

    def _chunk_impl(
        self, static: _Static, batch_static, out_sharding, state, dyn, xs, n_active, max_bad
    ):
        """``lax.scan`` of the step over a fixed-length chunk; the first ``n_active`` steps
        run (the rest are skipped by ``lax.cond``), and none once ``max_bad`` is reached."""
        args, kwargs = static.merge(dyn)

        def body(carry, x):
            i, batch = x
            a, kw = args, kwargs
            if batch_static is not None:
                b_args, b_kwargs = batch_static.merge(batch)
                a, kw = tuple(b_args) + tuple(args), {**kwargs, **b_kwargs}
            go = (i < n_active) & (carry.num_bad < max_bad)

            def skip(c):
                return c, jnp.array(jnp.nan, _loss_dtype())

            return lax.cond(go, lambda c: self._step_core(c, a, kw), skip, carry)

        state, losses = lax.scan(body, state, xs)
        if out_sharding is not None:
            state = lax.with_sharding_constraint(state, out_sharding)
        return state, losses

    # -- public API ---------------------------------------------------------------

    def init(self, rng_key, *args, init_params: Mapping | None = None, **kwargs) -> SVIState:
        """Initial state: params from their ``numpyro.param`` init values, optimiser state.

        :param rng_key: a JAX PRNG key (``jax.random.PRNGKey(0)`` or ``jax.random.key(0)``).
        :param args, kwargs: the model's and guide's arguments (checked for NaN/inf).
        :param dict init_params: ``{name: constrained value}`` to start from instead of the
            ``numpyro.param`` init values (as in ``numpyro.infer.SVI.init``); a name that
            is not a param of the model or guide is a ``ValueError``.
        :returns: :class:`SVIState` with ``step == 0``.
        """
        rng_key = _check_key(rng_key)
        ppl.check_data(*args, **kwargs)
        rng_key, init_key = jax.random.split(rng_key)
        params = ppl.init_params(init_key, self.model, self.guide, *args, **kwargs)
        if not isinstance(params, Mapping) or not params:
            raise ValueError(
                "model and guide have no numpyro.param sites to optimise; "
                f"ppl.init_params returned {params!r}"
            )
        if init_params is not None:
            params = self._apply_init_params(params, init_params, args, kwargs)
        params = {k: jax.tree_util.tree_map(_strong, v) for k, v in params.items()}
        self._constrain_args = (args, kwargs)
        if self._numpyro_optim is not None:
            opt_state = jax.tree_util.tree_map(_strong, self._numpyro_optim.init(params))
        else:
            opt_state = self._optim.init(params)
        return SVIState(
            params=params,
            opt_state=opt_state,
            rng_key=rng_key,
            step=jnp.zeros((), jnp.int32),
            num_bad=jnp.zeros((), jnp.int32),
            nonfinite_grads={k: jnp.zeros((), bool) for k in params},
            nonfinite_loss=jnp.zeros((), bool),
        )

    def _apply_init_params(self, params, init_params, args, kwargs) -> dict:
        """``params`` with the entries of ``init_params`` (constrained) unconstrained in."""
        if not isinstance(init_params, Mapping):
            raise TypeError(
                f"init_params must be a dict {{name: constrained value}}, got {type(init_params)}"
            )
        unknown = sorted(k for k in init_params if k not in params)
        if unknown:
            raise ValueError(
                f"init_params has unknown param name(s) {unknown}; the model and guide have "
                f"params {sorted(params)}"
            )
        found = _param_constraints(self.model, self.guide, params, args, kwargs)
        out = dict(params)
        for name, value in init_params.items():
            c = found.get(name)
            value = jax.tree_util.tree_map(jnp.asarray, value)
            unc = ppl.dsl.unconstrain(value, c)
            want = jax.tree_util.tree_structure(params[name])
            got = jax.tree_util.tree_structure(unc)
            shapes = [jnp.shape(a) for a in jax.tree_util.tree_leaves(params[name])]
            if got != want or [jnp.shape(a) for a in jax.tree_util.tree_leaves(unc)] != shapes:
                raise ValueError(
                    f"init_params[{name!r}] has shape "
                    f"{jax.tree_util.tree_map(jnp.shape, value)}, but param {name!r} has "
                    f"(constrained) shape "
                    f"{jax.tree_util.tree_map(jnp.shape, _constrained(params[name], c))}"
                )
            if not bool(_all_finite(unc)):
                raise ValueError(
                    f"init_params[{name!r}] is outside the support of param {name!r} "
                    f"(constraint {c}) or not finite"
                )
            out[name] = jax.tree_util.tree_map(
                lambda u, p: jnp.asarray(u, jnp.result_type(p)), unc, params[name]
            )
        return out

    def update(self, state: SVIState, *args, **kwargs) -> tuple[SVIState, jax.Array]:
        """Take one (jit-compiled, guarded) optimisation step.

        :returns: ``(new_state, loss)`` with ``loss = -objective`` (``f32[]``) at the
            params of ``state``. A non-finite step is rejected: ``new_state`` keeps the
            params and optimiser state and ``new_state.num_bad`` is incremented (``update``
            never raises for it; :meth:`run` does).
        """
        static, dyn = _split(args, kwargs)
        return self._jit_step(static, state, dyn)

    def evaluate(self, state: SVIState, *args, **kwargs) -> jax.Array:
        """The loss ``-objective`` (``f32[]``) at ``state``'s params, with the key the next
        step would use, without updating anything."""
        static, dyn = _split(args, kwargs)
        return self._jit_eval(static, state, dyn)

    def get_params(self, state: SVIState, *args, **kwargs) -> dict:
        """Constrained param values of ``state`` (``{name: array}``).

        Constraints are found by running model and guide, with ``args``/``kwargs`` if given,
        else with the arguments of the last :meth:`init`.
        """
        if not args and not kwargs and self._constrain_args is not None:
            args, kwargs = self._constrain_args
        return ppl.constrain_params(state.params, self.model, self.guide, *args, **kwargs)

    def run(
        self,
        rng_key,
        num_steps: int,
        *args,
        progress_bar: bool = True,
        chunk_size: int = 100,
        max_bad_steps: int = 10,
        checkpoint=None,
        checkpoint_every: int | None = None,
        mesh: Mesh | None = None,
        data_axis="data",
        batches: Iterable | None = None,
        init_state: SVIState | None = None,
        init_params: Mapping | None = None,
        stable_update: bool = True,
        **kwargs,
    ) -> SVIRunResult:
        """Run ``num_steps`` optimisation steps; return :class:`SVIRunResult`.

        :param rng_key: a JAX PRNG key (ignored when ``init_state`` is given).
        :param int num_steps: number of steps (>= 1).
        :param args, kwargs: the model's and guide's arguments. Arrays are traced
            arguments of the compiled step; other values (Python numbers, strings) are
            compile-time constants.
        :param bool progress_bar: show a tqdm bar (only when stdout is a TTY), updated once
            per chunk with the chunk's mean loss.
        :param int chunk_size: steps per compiled ``lax.scan`` chunk (one dispatch and one
            host sync per chunk). Results do not depend on it.
        :param int max_bad_steps: stop with :class:`SVINonFiniteError` (a
            ``FloatingPointError``) after this many consecutive rejected steps.
        :param checkpoint: a directory; the full state (params, optimiser state, step, PRNG
            key, losses) is written there atomically every ``checkpoint_every`` steps, at
            the end, and (the last good state) when the guard stops the run.
            See :meth:`resume`.
        :param int checkpoint_every: steps between checkpoints (needs ``checkpoint``;
            default: only at the end).
        :param mesh: a ``jax.sharding.Mesh``: array arguments whose leading axis is
            divisible by the size of ``data_axis`` are sharded along it
            (``PartitionSpec(data_axis)``), other arrays and the state are replicated. With
            several processes each process passes its own rows (see docs/scale_out.md);
            arguments that are already global arrays on the mesh are used as they are.
        :param data_axis: the mesh axis name (or tuple of names) to shard data over.
        :param batches: an iterable of per-step batches, each a tuple of positional
            arguments (put before ``args``) or a dict of keyword arguments (merged into
            ``kwargs``); a chunk of them is stacked and scanned over. It must yield at least
            ``num_steps`` items of identical shapes.
        :param init_state: continue from this state (e.g. a previous ``result.state``);
            ``losses`` then holds only this call's steps.
        :param dict init_params: ``{name: constrained value}`` to start from instead of the
            params' init values (as ``numpyro.infer.SVI.run(init_params=...)``; see
            :meth:`init`). Not together with ``init_state``.
        :param bool stable_update: accepted for compatibility with ``numpyro.infer.SVI.run``:
            every step of this SVI is guarded (non-finite steps are rejected, see
            ``max_bad_steps``), so ``True`` changes nothing and ``False`` (which cannot turn
            the guard off) is a ``ValueError``.
        :param kwargs: keyword arguments of the model and guide; a keyword that is neither an
            option of ``run`` nor a parameter of both the model's and the guide's signature
            (a ``**kwargs`` parameter accepts any) is a ``TypeError`` naming it.
        :returns: ``SVIRunResult(params, state, losses)``: constrained params, the final
            state and ``losses`` ``f32[num_steps]`` (``-objective`` per step).

        Example::

            >>> import jax, jax.numpy as jnp, optax, numpyro, numpyro.distributions as dist
            >>> from ppl.inference import SVI
            >>> def model(x):
            ...     mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
            ...     numpyro.sample("x", dist.Normal(mu, 1.0), obs=x)
            >>> def guide(x):
            ...     s = numpyro.param("s", 1.0, constraint=dist.constraints.positive)
            ...     numpyro.sample("mu", dist.Normal(0.5, s))
            >>> svi = SVI(model, guide, optax.adam(0.05))
            >>> res = svi.run(jax.random.PRNGKey(0), 3, jnp.ones(()), progress_bar=False,
            ...               init_params={"s": 0.7})
            >>> res.losses.shape
            (3,)
            >>> svi.run(jax.random.PRNGKey(0), 3, jnp.ones(()), progress_bar=False, lr=0.1)
            Traceback (most recent call last):
            ...
            TypeError: SVI.run() got unexpected keyword argument(s) ['lr']: ...
        """
        self._check_program_kwargs("run", kwargs)
        _check_stable_update(stable_update)
        num_steps = _count("num_steps", num_steps)
        if init_state is not None and init_params is not None:
            raise ValueError(
                "run() got both init_state and init_params; init_state already holds params"
            )
        opts = self._check_run_options(
            chunk_size, max_bad_steps, checkpoint, checkpoint_every, mesh, data_axis
        )
        batch_iter, first = self._open_batches(batches, num_steps)
        if init_state is None:
            b_args, b_kwargs = self._batch_call(first, args, kwargs)
            state = self.init(rng_key, *b_args, init_params=init_params, **b_kwargs)
        else:
            if not isinstance(init_state, SVIState):
                raise TypeError(f"init_state must be an SVIState, got {type(init_state)}")
            ppl.check_data(*args, **kwargs)
            state = init_state
        return self._drive(
            state,
            int(_to_host(state.step)) + num_steps,
            [],
            batch_iter,
            first,
            args,
            kwargs,
            progress_bar,
            **opts,
        )

    def resume(
        self,
        checkpoint_dir,
        num_steps: int,
        *args,
        progress_bar: bool = True,
        chunk_size: int = 100,
        max_bad_steps: int = 10,
        checkpoint_every: int | None = None,
        mesh: Mesh | None = None,
        data_axis="data",
        batches: Iterable | None = None,
        stable_update: bool = True,
        **kwargs,
    ) -> SVIRunResult:
        """Continue the run saved in ``checkpoint_dir`` until ``num_steps`` steps in total.

        Called with the same model, guide, optimizer, objective and arguments, the result
        is **bit-identical** to an uninterrupted ``run`` with the same key: every step's key
        is derived from the saved key and step number. Checkpoints keep being written to
        ``checkpoint_dir`` (every ``checkpoint_every`` steps, default: the saved interval).

        :param int num_steps: the total number of steps of the run (as given to the
            original ``run``); must be >= the saved step.
        :param batches: the same batch sequence as the original run; the first ``step``
            items (already used) are skipped.
        :param stable_update: as in :meth:`run`.
        :param kwargs: keyword arguments of the model and guide (checked as in :meth:`run`).
        :returns: :class:`SVIRunResult` whose ``losses`` cover the whole run (saved + new).
        :raises ValueError: the checkpoint is corrupt or belongs to another model/optimizer.
        """
        self._check_program_kwargs("resume", kwargs)
        _check_stable_update(stable_update)
        num_steps = _count("num_steps", num_steps)
        path = _ckpt.checkpoint_path(checkpoint_dir)
        meta = _ckpt.read_metadata(checkpoint_dir)
        if checkpoint_every is None:
            checkpoint_every = meta.get("checkpoint_every")
        opts = self._check_run_options(
            chunk_size, max_bad_steps, checkpoint_dir, checkpoint_every, mesh, data_axis
        )
        done = meta.get("step")
        if not isinstance(done, int) or done < 0:
            raise ValueError(f"checkpoint {path!r} is corrupt (bad step {done!r})")
        if num_steps < done:
            raise ValueError(
                f"num_steps={num_steps} is smaller than the {done} steps already taken in "
                f"checkpoint {path!r}"
            )
        batch_iter, first = self._open_batches(batches, num_steps, skip=done)
        b_args, b_kwargs = self._batch_call(first, args, kwargs)
        state, losses = self._load(checkpoint_dir, meta, b_args, b_kwargs)
        return self._drive(
            state, num_steps, [losses], batch_iter, first, args, kwargs, progress_bar, **opts
        )

    # -- run machinery ------------------------------------------------------------

    def _check_program_kwargs(self, method, kwargs):
        """``TypeError`` naming keywords that neither ``method`` nor model and guide take."""
        if not kwargs:
            return
        options = sorted(
            name
            for name, p in inspect.signature(getattr(self, method)).parameters.items()
            if p.kind is inspect.Parameter.KEYWORD_ONLY
        )
        bad, problems = [], []
        for name in kwargs:
            if name in _NUMPYRO_ONLY:  # never passed on, even to a model with **kwargs
                bad.append(name)
                problems.append(f"{name!r} (a numpyro.infer.SVI.run option: {_NUMPYRO_ONLY[name]})")
                continue
            refused = []
            for what, fn in (("model", self.model), ("guide", self.guide)):
                names, any_kw = _accepted_keywords(fn)
                if not any_kw and name not in names:
                    refused.append(what)
            if refused:
                bad.append(name)
                problems.append(f"{name!r} (not a parameter of the {' or the '.join(refused)})")
        if bad:
            raise TypeError(
                f"SVI.{method}() got unexpected keyword argument(s) {bad}: "
                + "; ".join(problems)
                + f". Options of {method}(): {options}; other keywords are passed to the "
                "model and guide, so they must be parameters of both"
            )

    def _check_run_options(
        self, chunk_size, max_bad_steps, checkpoint, checkpoint_every, mesh, data_axis
    ):
        chunk_size = _count("chunk_size", chunk_size)
        max_bad_steps = _count("max_bad_steps", max_bad_steps)
        checkpoint_every = _count("checkpoint_every", checkpoint_every, allow_none=True)
        if checkpoint_every is not None and checkpoint is None:
            raise ValueError("checkpoint_every needs checkpoint= (a directory to write to)")
        if checkpoint is not None:
            try:
                checkpoint = os.fspath(checkpoint)
            except TypeError:
                raise TypeError(
                    f"checkpoint must be a directory path, got {type(checkpoint)}"
                ) from None
            if os.path.exists(checkpoint) and not os.path.isdir(checkpoint):
                raise ValueError(f"checkpoint={checkpoint!r} exists and is not a directory")
            parent = (
                checkpoint
                if os.path.isdir(checkpoint)
                else (os.path.dirname(os.path.abspath(checkpoint)))
            )
            while not os.path.exists(parent):
                parent = os.path.dirname(parent)
            if not os.access(parent, os.W_OK):
                raise ValueError(f"checkpoint={checkpoint!r} is not writable")
        if mesh is not None:
            if not isinstance(mesh, Mesh):
                raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh)}")
            axes = data_axis if isinstance(data_axis, tuple) else (data_axis,)
            missing = [a for a in axes if a not in mesh.axis_names]
            if missing:
                raise ValueError(
                    f"data_axis={data_axis!r} is not an axis of the mesh {mesh.axis_names}"
                )
        return dict(
            chunk_size=chunk_size,
            max_bad_steps=max_bad_steps,
            checkpoint=checkpoint,
            checkpoint_every=checkpoint_every,
            mesh=mesh,
            data_axis=data_axis,
        )

    @staticmethod
    def _open_batches(batches, num_steps, skip=0):
        if batches is None:
            return None, None
        if isinstance(batches, (str, bytes)) or not isinstance(batches, Iterable):
            raise TypeError(
                f"batches must be an iterable of per-step argument tuples, got {type(batches)}"
            )
        if hasattr(batches, "__len__") and len(batches) < num_steps:
            raise ValueError(f"batches has {len(batches)} items but num_steps={num_steps}")
        it = iter(batches)
        last = _END
        for _ in range(skip):
            last = next(it, _END)
            if last is _END:
                raise ValueError(f"batches ran out before the {skip} steps to skip on resume")
        first = next(it, _END)
        if first is _END:
            if last is _END:
                raise ValueError("batches is empty")
            return iter(()), last  # nothing left to run; ``last`` serves as a template
        return itertools.chain([first], it), first

    @staticmethod
    def _batch_call(batch, args, kwargs):
        if batch is None:
            return args, kwargs
        if isinstance(batch, Mapping):
            return tuple(args), {**kwargs, **batch}
        if not isinstance(batch, tuple):
            batch = (batch,)
        return tuple(batch) + tuple(args), kwargs

    def _drive(
        self,
        state,
        target,
        loss_parts,
        batch_iter,
        first,
        args,
        kwargs,
        progress_bar,
        *,
        chunk_size,
        max_bad_steps,
        checkpoint,
        checkpoint_every,
        mesh,
        data_axis,
    ):
        """Scan chunks of steps until ``state.step == target`` (guard, bar, checkpoints)."""
        step = int(_to_host(state.step))
        start = step - sum(len(p) for p in loss_parts)
        remaining = target - step
        b_args, b_kwargs = self._batch_call(first, args, kwargs)
        self._constrain_args = (b_args, b_kwargs)
        every = checkpoint_every
        length = max(1, min(chunk_size, remaining, every or chunk_size))
        static, dyn = _split(args, kwargs)
        out_sharding = data_sharding = None
        if mesh is not None:
            out_sharding = NamedSharding(mesh, PartitionSpec())
            state = _replicate_state(state, out_sharding)
            dyn = self._shard_args(dyn, mesh, data_axis)
            data_sharding = NamedSharding(mesh, PartitionSpec(None, data_axis))
        elif (
            isinstance(state.step, jax.Array)
            and len(state.step.sharding.device_set) > 1
            and jax.process_count() == 1
        ):  # a state from a run on a mesh, continued on one device
            state = jax.device_put(state, jax.devices()[0])
        bar = None
        if progress_bar and remaining and sys.stdout.isatty() and jax.process_index() == 0:
            from tqdm import tqdm

            bar = tqdm(total=target, initial=step, desc="SVI", unit="step")

        def save(st, parts):
            if checkpoint is not None and jax.process_index() == 0:
                self._save(checkpoint, st, parts, checkpoint_every, start)

        try:
            while step < target:
                n = min(length, target - step)
                if every:  # chunks end on multiples of checkpoint_every
                    n = min(n, every - step % every)
                batch_static, xs_batch = None, None
                if batch_iter is not None:
                    batch_static, xs_batch = self._stack_batches(
                        batch_iter, n, length, step, mesh, data_axis, data_sharding
                    )
                xs = (jnp.arange(length, dtype=jnp.int32), xs_batch)
                state, losses = self._jit_chunk(
                    static,
                    batch_static,
                    out_sharding,
                    state,
                    dyn,
                    xs,
                    jnp.int32(n),
                    jnp.int32(max_bad_steps),
                )
                new_step = int(_to_host(state.step))
                taken, step = new_step - step, new_step
                chunk_losses = _to_host(losses)[:taken]
                loss_parts.append(chunk_losses)
                if int(_to_host(state.num_bad)) >= max_bad_steps:
                    raise self._nonfinite_error(state, loss_parts, save, checkpoint)
                if bar is not None:
                    good = chunk_losses[np.isfinite(chunk_losses)]
                    bar.set_postfix_str(
                        f"loss {np.mean(good):.4g}" if good.size else "loss non-finite"
                    )
                    bar.update(taken)
                if (every and step % every == 0) or step == target:
                    save(state, loss_parts)
        finally:
            if bar is not None:
                bar.close()
        losses = np.concatenate(loss_parts) if loss_parts else np.zeros((0,), _loss_dtype())
        return SVIRunResult(self.get_params(state), state, jnp.asarray(losses))

    @staticmethod
    def _shard_args(dyn, mesh, data_axis):
        """Shard array args with a leading axis divisible by the data-axis size; replicate
        the rest. In a multi-process run the leading axis of ``x`` is this process's rows."""
        size = _data_size(mesh, data_axis)
        batch = NamedSharding(mesh, PartitionSpec(data_axis))
        repl = NamedSharding(mesh, PartitionSpec())
        out = []
        for leaf in dyn:
            shape = np.shape(leaf)
            rows = shape[0] * jax.process_count() if shape else 0
            if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
                out.append(leaf)  # already a global array: keep its sharding
            elif rows > 0 and rows % size == 0:
                out.append(_place(leaf, batch))
            else:
                out.append(_place(leaf, repl))
        return out

    def _stack_batches(self, it, n, length, step0, mesh, data_axis, data_sharding):
        items = []
        for j in range(n):
            item = next(it, _END)
            if item is _END:
                raise ValueError(
                    f"batches ran out at step {step0 + j}; it must yield at least num_steps items"
                )
            b_args, b_kwargs = self._batch_call(item, (), {})
            try:
                ppl.check_data(*b_args, **b_kwargs)
            except ValueError as e:
                raise ValueError(f"batch for step {step0 + j}: {e}") from None
            items.append((b_args, b_kwargs))
        items += [items[-1]] * (length - n)  # padding for skipped steps (never used)
        structure = jax.tree_util.tree_structure(items[0])
        for j, item in enumerate(items[:n]):
            if jax.tree_util.tree_structure(item) != structure:
                raise ValueError(
                    f"batch for step {step0 + j} has structure "
                    f"{jax.tree_util.tree_structure(item)}, expected {structure}"
                )
        flat = [jax.tree_util.tree_leaves(item) for item in items]
        try:
            stacked = [np.stack([np.asarray(f[i]) for f in flat]) for i in range(len(flat[0]))]
        except ValueError as e:
            raise ValueError(f"batches from step {step0} have inconsistent shapes: {e}") from None
        batch_static = _Static(structure, (), len(stacked))
        if mesh is not None:
            size = _data_size(mesh, data_axis)
            repl = NamedSharding(mesh, PartitionSpec())
            rows = jax.process_count()
            stacked = [
                _place(a, data_sharding if a.ndim >= 2 and a.shape[1] * rows % size == 0 else repl)
                for a in stacked
            ]
        return batch_static, stacked

    def _nonfinite_error(self, state, loss_parts, save, checkpoint):
        step = int(_to_host(state.step)) - 1
        num_bad = int(_to_host(state.num_bad))
        sites = sorted(k for k, v in state.nonfinite_grads.items() if bool(_to_host(v)))
        bad_loss = bool(_to_host(state.nonfinite_loss))
        good = state._replace(
            step=state.step - state.num_bad,
            num_bad=jnp.zeros_like(state.num_bad),
            nonfinite_grads={k: jnp.zeros_like(v) for k, v in state.nonfinite_grads.items()},
            nonfinite_loss=jnp.zeros_like(state.nonfinite_loss),
        )
        good_step = step + 1 - num_bad
        all_losses = np.concatenate(loss_parts)
        keep = len(all_losses) - num_bad
        good_parts = [all_losses[:keep]]
        save(good, good_parts)
        what = []
        if sites:
            what.append(f"non-finite gradients at param sites {sites}")
        if bad_loss:
            what.append("a non-finite objective value")
        if not what:
            what.append("non-finite updated params")
        message = (
            f"SVI stopped at step {step}: {num_bad} consecutive steps "
            f"({step - num_bad + 1}..{step}, counting from 0) were rejected with "
            f"{' and '.join(what)}. The last good state (state.step = {good_step}) is in "
            "this exception's .state"
            + (f" and in the checkpoint in {checkpoint!r}" if checkpoint is not None else "")
            + "; lower the learning rate, check the model's support and the data."
        )
        return SVINonFiniteError(
            message, state=good, losses=jnp.asarray(good_parts[0]), step=step, sites=sites
        )

    # -- checkpoints --------------------------------------------------------------

    def _save(self, directory, state, loss_parts, checkpoint_every, start):
        key = state.rng_key
        typed = _is_typed_key(key)
        raw = state._replace(rng_key=jax.random.key_data(key) if typed else key)
        losses = np.concatenate(loss_parts) if loss_parts else np.zeros((0,), _loss_dtype())
        meta = {
            "kind": "ppl.inference.SVI",
            "step": int(_to_host(state.step)),
            "start_step": int(start),
            "checkpoint_every": checkpoint_every,
            "key_impl": str(jax.random.key_impl(key)) if typed else None,
            "params": _param_table(state.params),
            "params_hash": _param_hash(state.params),
        }
        _ckpt.save_checkpoint(directory, {"state": raw, "losses": losses}, metadata=meta)

    def _load(self, directory, meta, args, kwargs):
        path = _ckpt.checkpoint_path(directory)
        if meta.get("kind") != "ppl.inference.SVI":
            raise ValueError(f"checkpoint {path!r} was not written by ppl.inference.SVI")
        impl = meta.get("key_impl")
        try:
            key = jax.random.key(0, impl=impl) if impl else jax.random.PRNGKey(0)
        except Exception:
            raise ValueError(f"checkpoint {path!r} names an unknown PRNG impl {impl!r}") from None
        template = self.init(key, *args, **kwargs)
        expected = _param_table(template.params)
        if meta.get("params_hash") != _param_hash(template.params):
            raise ValueError(
                f"checkpoint {path!r} was written for a different model: expected params "
                f"{expected}, found {meta.get('params')}"
            )
        typed = impl is not None
        raw = template._replace(
            rng_key=jax.random.key_data(template.rng_key) if typed else template.rng_key
        )
        n = meta.get("step", 0) - meta.get("start_step", 0)
        like = {"state": raw, "losses": np.zeros((max(n, 0),), _loss_dtype())}
        tree, _ = _ckpt.load_checkpoint(directory, like)
        state = tree["state"]
        if int(_to_host(state.step)) != meta.get("step"):
            raise ValueError(f"checkpoint {path!r} is corrupt (step mismatch)")
        if typed:
            state = state._replace(rng_key=jax.random.wrap_key_data(state.rng_key, impl=impl))
        return state, np.asarray(tree["losses"])


_END = object()
