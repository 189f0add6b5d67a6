"""B3: the noisy cone (spec §2, Table 4) with the five objectives of the paper.

Model: x, y ~ N(0, 10²); z ~ N(x² + y², (0.1 + (x² + y²)/100)²), z = 5 observed
(exact log p(z=5) = −5.3232). Guides: mean-field Normal, and an expressive guide with an
auxiliary angle u ~ U(0, 1) marginalised by ``ppl.marginal`` (reverse = its prior).
Training as in the paper's artifact: 5000 steps of plain gradient ascent, lr 1e-3, on the
mean over 64 keys; evaluation on 5000 keys.

Run: ``python benchmarks/cone.py`` (about a minute on 2 CPU cores).
"""

import time

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist

import ppl

LOG_P = -5.3232
TABLE_4 = {"ELBO": -8.08, "IWELBO(5)": -7.79, "HVI": -9.75, "IWHVI(5)": -8.18, "DIWHVI(5,5)": -7.33}
positive = dist.constraints.positive


def cone(z=5.0):
    x = numpyro.sample("x", dist.Normal(0.0, 10.0))
    y = numpyro.sample("y", dist.Normal(0.0, 10.0))
    s = x**2 + y**2
    numpyro.sample("z", dist.Normal(s, 0.1 + s / 100.0), obs=z)


def mean_field(z=5.0):
    mx, my = numpyro.param("mx", 1.0), numpyro.param("my", 0.0)
    sx = numpyro.param("sx", 0.5, constraint=positive)
    sy = numpyro.param("sy", 0.5, constraint=positive)
    numpyro.sample("x", dist.Normal(mx, sx))
    numpyro.sample("y", dist.Normal(my, sy))


def expressive(z=5.0):
    s1 = numpyro.param("s1", 0.5, constraint=positive)
    s2 = numpyro.param("s2", 0.5, constraint=positive)
    theta = 2 * jnp.pi * numpyro.sample("u", dist.Uniform(0.0, 1.0))
    numpyro.sample("x", dist.Normal(jnp.sqrt(z) * jnp.cos(theta), s1))
    numpyro.sample("y", dist.Normal(jnp.sqrt(z) * jnp.sin(theta), s2))


def train(objective, guide, steps=5000, lr=1e-3, keys_per_step=64, seed=0):
    """Plain gradient ascent on the mean estimate over ``keys_per_step`` keys."""
    params = ppl.init_params(jax.random.PRNGKey(seed), cone, guide)
    f = ppl.value_and_grad(objective, cone, guide)

    def step(p, key):
        values, grads = jax.vmap(lambda k: f(p, k))(jax.random.split(key, keys_per_step))
        return {k: p[k] + lr * grads[k].mean(0) for k in p}, values.mean()

    run = jax.jit(lambda p, keys: jax.lax.scan(step, p, keys))
    params, _ = run(params, jax.random.split(jax.random.PRNGKey(seed + 1), steps))
    values = jax.jit(jax.vmap(lambda k: f(params, k)[0]))(
        jax.random.split(jax.random.PRNGKey(seed + 2), 5000)
    )
    return params, float(values.mean()), float(values.std() / np.sqrt(values.size))


def main():
    obj = ppl.objectives
    rows = [
        ("ELBO", obj.elbo, mean_field),
        ("IWELBO(5)", obj.iwelbo(5), mean_field),
        ("HVI", obj.hvi(), expressive),
        ("IWHVI(5)", obj.iwhvi(5), expressive),
        ("DIWHVI(5,5)", obj.diwhvi(None, 5, 5), expressive),
    ]
    print(f"exact log p(z=5) = {LOG_P}")
    print("| objective | ppl (± s.e.) | Table 4 (genjax.vi) | diff | seconds |")
    print("|---|---|---|---|---|")
    for name, objective, guide in rows:
        start = time.perf_counter()
        _, value, se = train(objective, guide)
        secs = time.perf_counter() - start
        diff = value - TABLE_4[name]
        print(
            f"| {name} | {value:.3f} ± {se:.3f} | {TABLE_4[name]:.2f} | {diff:+.3f} | {secs:.1f} |"
        )
        assert value < LOG_P, f"{name} is not below log p"


if __name__ == "__main__":
    main()
