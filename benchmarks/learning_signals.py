"""Per-element learning signals against NumPyro's ``TraceGraph_ELBO`` and ``TraceEnum_ELBO``.

The model has one global site outside a data plate of N local discrete sites
(``mu ~ N(0, 1)``, ``z_i ~ Bernoulli(1/2)``, ``y_i ~ N(mu + z_i, 1)``); the guide is
mean-field with ``q(z_i) = Bernoulli(p_i)``.

* **REINFORCE** (N = 1000): the standard deviation of ``∂ELBO/∂logit p_i`` over 200 keys,
  averaged over i, for ``ppl.objectives.elbo`` and for ``TraceGraph_ELBO`` (both give each
  ``z_i`` only the costs that depend on it; a whole-objective signal is ~N times noisier).
* **ENUM** (N = 3200): ``z`` summed exactly in the guide (``infer={"enumerate": "parallel"}``);
  median time of one jitted value-and-gradient over ``--repeats`` calls, compile time apart,
  ppl against ``TraceEnum_ELBO`` on the same parameters (the goal is ≤ 2×).

Run: ``python benchmarks/learning_signals.py`` (about a minute).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from _report import fmt, header, machine_line, secs, steady, table, timed
from numpyro.infer import TraceEnum_ELBO, TraceGraph_ELBO

import ppl


def make(n, enumerate_z):
    def model(y):
        mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
        with numpyro.plate("data", n):
            z = numpyro.sample("z", dist.Bernoulli(0.5))
            numpyro.sample("y", dist.Normal(mu + z, 1.0), obs=y)

    def guide(y):
        numpyro.sample("mu", dist.Normal(numpyro.param("m", 0.0), 1.0))
        with numpyro.plate("data", n):
            p = numpyro.param("p", jnp.full(n, 0.5), constraint=dist.constraints.unit_interval)
            infer = {"enumerate": "parallel"} if enumerate_z else {}
            numpyro.sample("z", dist.Bernoulli(p), infer=infer)

    y = jax.random.normal(jax.random.PRNGKey(0), (n,)) + 1.0
    return model, guide, y


def numpyro_grad(elbo, model, guide, y):
    """NumPyro's ELBO as value-and-gradient of the *maximised* objective over ppl's
    unconstrained params (so both sides differentiate the same parameters)."""

    def f(params, key):
        constrained = ppl.constrain_params(params, model, guide, y)
        return -elbo.loss(key, constrained, model, guide, y)

    return jax.jit(jax.value_and_grad(f))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=200, help="keys for the gradient sd")
    parser.add_argument("--repeats", type=int, default=50, help="timed calls per median")
    args = parser.parse_args(argv)
    header("Per-element learning signals", [machine_line()])

    model, guide, y = make(1000, enumerate_z=False)
    params = ppl.init_params(jax.random.PRNGKey(1), model, guide, y)
    keys = jax.random.split(jax.random.PRNGKey(2), args.keys)
    ours = jax.jit(ppl.value_and_grad(ppl.objectives.elbo, model, guide))
    theirs = numpyro_grad(TraceGraph_ELBO(), model, guide, y)
    sd = {}
    for name, f in (
        ("ppl elbo (REINFORCE)", lambda k: ours(params, k, y)),
        ("TraceGraph_ELBO", lambda k: theirs(params, k)),
    ):
        grads = jax.vmap(lambda k, f=f: f(k)[1]["p"])(keys)
        sd[name] = float(np.std(np.asarray(grads), axis=0).mean())
    base = sd["TraceGraph_ELBO"]
    table(
        ["estimator (N = 1000)", "mean sd of ∂/∂logit p_i", "ratio"],
        [(k, fmt(v, 3), fmt(v / base, 2)) for k, v in sd.items()],
    )

    model, guide, y = make(3200, enumerate_z=True)
    params = ppl.init_params(jax.random.PRNGKey(1), model, guide, y)
    ours = jax.jit(ppl.value_and_grad(ppl.objectives.elbo, model, guide))
    theirs = numpyro_grad(TraceEnum_ELBO(), model, guide, y)
    rows, times = [], {}
    key = jax.random.PRNGKey(3)
    for name, f in (
        ("ppl elbo (ENUM)", lambda: ours(params, key, y)),
        ("TraceEnum_ELBO", lambda: theirs(params, key)),
    ):
        _, compile_s = timed(f)
        times[name], calls, _ = steady(f, args.repeats)
        rows.append((name, secs(compile_s), secs(times[name]), calls))
    (v1, g1), (v2, g2) = ours(params, key, y), theirs(params, key)
    ratio = times["ppl elbo (ENUM)"] / times["TraceEnum_ELBO"]
    table(["estimator (N = 3200)", "compile", "median per step", "calls"], rows)
    print(
        f"\nratio ppl / TraceEnum_ELBO: {ratio:.2f} (goal ≤ 2); "
        f"|value diff| {abs(float(v1 - v2)):.1e}, "
        f"max |grad diff| {float(jnp.abs(g1['p'] - g2['p']).max()):.1e}"
    )


if __name__ == "__main__":
    main()
