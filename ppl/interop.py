"""Interop with NumPyro's own inference, both ways.

* :func:`as_numpyro_loss` turns a ppl objective into a loss for ``numpyro.infer.SVI``
  (the ELBO protocol of NumPyro's ``numpyro.infer.elbo.ELBO``: ``loss`` and
  ``loss_with_mutable_state``; see https://num.pyro.ai/en/stable/svi.html).
* :func:`elbo_value_and_grad` turns a NumPyro ELBO instance (``Trace_ELBO``,
  ``TraceGraph_ELBO``, ``TraceEnum_ELBO``, ``RenyiELBO``, …) into the
  ``f(params, rng_key, *args, **kwargs) -> (value, grads)`` form of
  :func:`ppl.value_and_grad`, which is how ``ppl.inference.SVI(...,
  objective=Trace_ELBO())`` uses it.

Conventions: ppl objectives are **maximised**, NumPyro losses are **minimised**; the loss
of :func:`as_numpyro_loss` is ``-objective``, and the value of :func:`elbo_value_and_grad`
is ``-loss``. ``numpyro.infer.SVI`` hands its loss **constrained** param values (it
differentiates through its own ``constrain_fn``), while :func:`ppl.value_and_grad` takes
**unconstrained** ones; the bridge maps between the two with the param sites'
``biject_to(constraint)``.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
from jax import lax
from numpyro.distributions import biject_to, constraints
from numpyro.handlers import replay, seed, substitute, trace
from numpyro.infer.elbo import ELBO

from ppl.dsl import substitute_params, unconstrain
from ppl.grad import _setup, _Spec, _surrogate, check_data, init_params

__all__ = ["NumPyroLoss", "as_numpyro_loss", "elbo_value_and_grad", "is_numpyro_elbo"]


def _program(fn):
    return getattr(fn, "_ppl_program", fn)


def is_numpyro_elbo(obj) -> bool:
    """Whether ``obj`` is a NumPyro ELBO instance (``numpyro.infer.elbo.ELBO``)."""
    return isinstance(obj, ELBO)


def _param_constraints(model, guide, rng_key, args, kwargs, handler):
    """``{param name: constraint}`` of the param sites of guide and model (guide's win, as
    in ``numpyro.infer.SVI.init``). Traced abstractly: adds nothing to a compiled step."""
    found = {}

    def run():
        k1, k2 = jax.random.split(rng_key)
        with trace() as gt, handler(), seed(rng_seed=k1):
            _program(guide)(*args, **kwargs)
        with trace() as mt, handler(), seed(rng_seed=k2), replay(trace=gt):
            _program(model)(*args, **kwargs)
        for tr in (mt, gt):
            for name, site in tr.items():
                if site["type"] == "param":
                    found[name] = site["kwargs"].get("constraint", constraints.real)

    jax.eval_shape(run)
    return found


def _needed_params(model, guide, rng_key, args, kwargs) -> list:
    """Names of the params that :func:`ppl.init_params` creates (traced abstractly)."""
    found = []
    jax.eval_shape(lambda: found.extend(init_params(rng_key, model, guide, *args, **kwargs)))
    return found


def _check_objective(objective):
    if isinstance(objective, NumPyroLoss):
        return objective.objective
    if is_numpyro_elbo(objective):
        raise TypeError(
            f"as_numpyro_loss(objective) expects a ppl objective, got the NumPyro loss "
            f"{type(objective).__name__}; pass it to numpyro.infer.SVI(loss=...) directly"
        )
    if isinstance(objective, Mapping):
        if set(objective) != {"model", "guide"}:
            raise ValueError(
                "as_numpyro_loss(objective): a dict objective needs exactly the keys 'model' "
                f"and 'guide', got {sorted(objective)}"
            )
        for k, v in objective.items():
            if not callable(v):
                raise TypeError(
                    f"as_numpyro_loss(objective): objective[{k!r}] must be callable, "
                    f"got {type(v).__name__}"
                )
        return dict(objective)
    if not callable(objective):
        raise TypeError(
            "as_numpyro_loss(objective) expects a ppl objective "
            "objective(model, guide, *args, **kwargs) (e.g. ppl.objectives.elbo), "
            f"got {type(objective).__name__}"
        )
    return objective


class NumPyroLoss:
    """A ppl objective as a NumPyro loss (made by :func:`as_numpyro_loss`).

    :ivar objective: the wrapped ppl objective (maximised; the loss is its negation).
    """

    #: ``numpyro.infer.SVI.init`` warns about discrete latent sites unless the loss can
    #: handle them; ppl objectives can (REINFORCE, ENUM, MVD estimators).
    can_infer_discrete = True

    def __init__(self, objective):
        self.objective = _check_objective(objective)

    def __repr__(self):
        name = getattr(self.objective, "__name__", None) or repr(self.objective)
        return f"ppl.as_numpyro_loss({name})"

    def loss(self, rng_key, param_map, model, guide, *args, **kwargs):
        """``f32[]`` surrogate of ``-objective`` at the constrained ``param_map``.

        Its value is ``-objective`` (one Monte Carlo estimate with ``rng_key``, the same
        estimate that ``ppl.value_and_grad`` returns with that key) and its gradient with
        respect to ``param_map`` is minus the ppl estimator's gradient (REPARAM, REINFORCE,
        ENUM or MVD per site), carried to the constrained values.
        """
        return self.loss_with_mutable_state(rng_key, param_map, model, guide, *args, **kwargs)[
            "loss"
        ]

    def loss_with_mutable_state(self, rng_key, param_map, model, guide, *args, **kwargs):
        """``{"loss": f32[], "mutable_state": None}`` (NumPyro's ELBO protocol; ppl
        objectives keep no ``numpyro.mutable`` state)."""
        if not isinstance(param_map, Mapping):
            raise TypeError(f"param_map must be a dict of param values, got {type(param_map)}")
        check_data(*args, **kwargs)
        missing = sorted(set(_needed_params(model, guide, rng_key, args, kwargs)) - set(param_map))
        if missing:
            raise ValueError(
                f"as_numpyro_loss: the objective needs param(s) {missing} that are not in "
                f"param_map (which has {sorted(param_map)}): numpyro.infer.SVI only creates "
                "the numpyro.param sites of model and guide, not the running mean of "
                "REINFORCE(baseline='mean'), the params of a callable baseline or of a "
                "ppl.marginal reverse program; train such objectives with ppl.inference.SVI"
            )
        data = dict(param_map)
        found = _param_constraints(
            model, guide, rng_key, args, kwargs, lambda: substitute(data=data)
        )
        params = {k: unconstrain(v, found.get(k)) for k, v in param_map.items()}
        setup = _setup(model, guide, params, rng_key, args, kwargs)

        def surrogate(objective, p):
            spec = _Spec(objective, model, guide, args, kwargs, rng_key, setup)
            return _surrogate(spec, p)[0]

        objective = self.objective
        if isinstance(objective, Mapping):  # wake-sleep: each side gets its own gradient
            owned = set(setup.model_params)
            sg = lambda v: jax.tree_util.tree_map(lax.stop_gradient, v)  # noqa: E731
            p_model = {k: (v if k in owned else sg(v)) for k, v in params.items()}
            p_guide = {k: (sg(v) if k in owned else v) for k, v in params.items()}
            s_p = surrogate(objective["model"], p_model)
            s_q = surrogate(objective["guide"], p_guide)
            s = s_p + (s_q - lax.stop_gradient(s_q))
        else:
            s = surrogate(objective, params)
        return {"loss": -s, "mutable_state": None}


def as_numpyro_loss(objective) -> NumPyroLoss:
    """A ppl objective as the ``loss=`` of ``numpyro.infer.SVI`` (minimising ``-objective``).

    The returned object follows NumPyro's ELBO protocol
    (https://num.pyro.ai/en/stable/svi.html): ``numpyro.infer.SVI`` calls
    ``loss.loss(rng_key, param_map, model, guide, *args, **kwargs)`` with the
    **constrained** param values and differentiates it through its own unconstrained
    params. The loss unconstrains ``param_map`` with each param site's
    ``biject_to(constraint).inv`` and returns the surrogate of :func:`ppl.value_and_grad`:
    its value is ``-objective`` and its gradient is the (negated) ppl estimator's gradient,
    so one step of ``numpyro.infer.SVI`` with key ``k`` equals one step of
    :func:`ppl.value_and_grad` with key ``k`` and the same optimiser (up to rounding in
    ``biject_to(c).inv(biject_to(c)(u)) ≈ u``).

    :param objective: a ppl objective ``objective(model, guide, *args, **kwargs)`` to be
        maximised (``ppl.objectives.elbo``, ``ppl.objectives.iwelbo(K)``, a user's own, …)
        or a wake-sleep dict ``{"model": obj_p, "guide": obj_q}``.
    :returns: a :class:`NumPyroLoss`; ``.loss(...)`` returns ``f32[]``.
    :raises ValueError: (when the loss is traced) the objective needs params that
        ``numpyro.infer.SVI`` does not create (``REINFORCE(baseline="mean")`` running
        means, params of callable baselines or of a ``ppl.marginal`` reverse program).

    Mutable state (``numpyro.mutable``) is not supported.

    Example::

        >>> import jax, jax.numpy as jnp, optax, numpyro, numpyro.distributions as dist, ppl
        >>> from numpyro.infer import SVI
        >>> def model(x):
        ...     mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
        ...     with numpyro.plate("data", x.shape[0]):
        ...         numpyro.sample("x", dist.Normal(mu, 1.0), obs=x)
        >>> def guide(x):
        ...     m = numpyro.param("m", 0.0)
        ...     s = numpyro.param("s", 1.0, constraint=dist.constraints.positive)
        ...     numpyro.sample("mu", dist.Normal(m, s))
        >>> x = jnp.array([0.9, 1.4, 1.1, 0.6])
        >>> loss = ppl.as_numpyro_loss(ppl.objectives.iwelbo(4))
        >>> svi = SVI(model, guide, optax.adam(0.05), loss=loss)
        >>> result = svi.run(jax.random.PRNGKey(0), 200, x, progress_bar=False)
        >>> result.losses.shape
        (200,)
        >>> sorted(result.params)
        ['m', 's']
    """
    return NumPyroLoss(objective)


def elbo_value_and_grad(elbo, model, guide):
    """A NumPyro ELBO instance in the form of :func:`ppl.value_and_grad`.

    ``f(params, rng_key, *args, **kwargs) -> (value, grads)`` where ``params`` are
    **unconstrained** (as :func:`ppl.init_params` makes them), ``value = -loss`` with
    ``loss = elbo.loss(rng_key, constrained params, model, guide, *args, **kwargs)`` (the
    ELBO estimate, maximised) and ``grads = -∇ loss`` with respect to ``params`` — the
    loss and gradient of one ``numpyro.infer.SVI`` step with step key ``rng_key``
    (https://num.pyro.ai/en/stable/svi.html). Params are constrained with
    ``biject_to(constraint)`` of their sites, as ``numpyro.infer.SVI`` does.

    :param elbo: a ``numpyro.infer.elbo.ELBO`` instance (``Trace_ELBO()``,
        ``TraceGraph_ELBO()``, ``TraceEnum_ELBO()``, ``RenyiELBO()``, …).

    Example::

        >>> import jax, jax.numpy as jnp, numpyro, numpyro.distributions as dist, ppl
        >>> from numpyro.infer import Trace_ELBO
        >>> from ppl.interop import elbo_value_and_grad
        >>> def model():
        ...     numpyro.sample("z", dist.Normal(0.0, 1.0))
        >>> def guide():
        ...     s = numpyro.param("s", 1.0, constraint=dist.constraints.positive)
        ...     numpyro.sample("z", dist.Normal(0.0, s))
        >>> params = ppl.init_params(jax.random.PRNGKey(0), model, guide)
        >>> f = elbo_value_and_grad(Trace_ELBO(), model, guide)
        >>> value, grads = f(params, jax.random.PRNGKey(1))   # value f32[], grads like params
        >>> float(value)          # q = p: the ELBO is 0
        0.0
    """
    if not is_numpyro_elbo(elbo):
        raise TypeError(
            f"elbo_value_and_grad expects a numpyro.infer.elbo.ELBO instance, got {type(elbo)}"
        )

    def f(params, rng_key, *args, **kwargs):
        if not isinstance(params, Mapping):
            raise TypeError(f"params must be a dict of param values, got {type(params)}")
        check_data(*args, **kwargs)
        unc = dict(params)
        found = _param_constraints(
            model,
            guide,
            rng_key,
            args,
            kwargs,
            lambda: substitute_params(params=unc, strict=False),
        )
        transforms = {k: biject_to(c) for k, c in found.items()}

        def loss_fn(p):
            constrained = {k: (transforms[k](v) if k in transforms else v) for k, v in p.items()}
            return elbo.loss(rng_key, constrained, model, guide, *args, **kwargs)

        loss, grads = jax.value_and_grad(loss_fn)(unc)
        return -loss, jax.tree_util.tree_map(lambda g: -g, grads)

    return f
