"""Per-sample standard deviation of each gradient estimator on the spec's single-site
cases (§4.3), next to the spec's reference figures, with the mean and its error.

* Bernoulli: c ~ Bern(0.3), x | c ~ N(2c − 1, 1), x = 0.4; guide Bern(σ(φ)); d ELBO / dφ.
* Normal: E cos(z), z ~ N(0.5, 0.8²); derivatives in μ and σ (a user objective that
  returns ``cos`` of the sampled site).

Run: ``python benchmarks/estimator_variance.py`` (N = 10⁵ draws per row; ~30 s).
"""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist

import ppl
from ppl.transforms import ENUM, MVD, REINFORCE, REPARAM, estimators

N = 100_000


def bern_model(x):
    c = numpyro.sample("c", dist.Bernoulli(0.3))
    numpyro.sample("x", dist.Normal(2 * c - 1, 1), obs=x)


def bern_guide(x):
    numpyro.sample("c", dist.Bernoulli(logits=numpyro.param("phi", 0.0)))


def normal_model():
    numpyro.sample("z", dist.Normal(0.0, 1.0))


def normal_guide():
    mu = numpyro.param("mu", 0.5)
    sigma = numpyro.param("sigma", 0.8, constraint=dist.constraints.positive)
    numpyro.sample("z", dist.Normal(mu, sigma))


def expected_cos(model, guide):
    return jnp.cos(ppl.sample_trace(guide).values["z"])


def draws(objective, model, guide, params, *args, seed=0):
    f = ppl.value_and_grad(objective, model, guide)
    keys = jax.random.split(jax.random.PRNGKey(seed), N)
    return jax.jit(jax.vmap(lambda k: f(params, k, *args)[1]))(keys)


def row(name, g, exact, ref_sd):
    g = np.asarray(g)
    mean, sd = g.mean(), g.std()
    if sd < 1e-6:  # deterministic (ENUM): report the absolute error instead of z
        z = f"|err| = {abs(mean - exact):.1e}"
    else:
        z = f"{(mean - exact) / (sd / np.sqrt(g.size)):+.1f}"
    print(f"| {name} | {mean:+.5f} | {exact:+.5f} | {z} | {sd:.3f} | {ref_sd} |")


def main():
    print(f"N = {N} draws per row; z = (mean − exact) / s.e.")
    print("| estimator | mean | exact | z | per-sample sd | spec sd |")
    print("|---|---|---|---|---|---|")
    x = jnp.array(0.4)
    refs = {0.0: ("1.293", "0.500", "0.500"), -1.0: ("0.996", "0.248", "0.443")}
    exact = {0.0: -0.0118245, -1.0: 0.1873126}
    for phi in (0.0, -1.0):
        # the 'mean' baseline set to E[F] = the ELBO at phi (spec's "baseline E F")
        elbo_at = {0.0: -1.5861152, -1.0: -1.6861307}[phi]
        cases = [
            ("REINFORCE", REINFORCE(), refs[phi][0]),
            ("REINFORCE + baseline E F", REINFORCE(baseline="mean"), refs[phi][1]),
            ("MVD", MVD(), refs[phi][2]),
            ("ENUM", ENUM(), "0"),
        ]
        for name, est, ref in cases:
            g = estimators(bern_guide, {"c": est})
            params = ppl.init_params(jax.random.PRNGKey(0), bern_model, g, x)
            params["phi"] = jnp.array(phi)
            if "c_baseline" in params:
                params["c_baseline"] = jnp.array(elbo_at)
            row(
                f"Bernoulli φ={phi:g}: {name}",
                draws(ppl.objectives.elbo, bern_model, g, params, x)["phi"],
                exact[phi],
                ref,
            )
    refs = {
        "MVD (coupled)": ("0.116", "0.496"),
        "MVD (uncoupled)": ("0.275", "0.883"),
        "REPARAM": ("0.551", "0.597"),
        "REINFORCE": ("0.691", "1.052"),
    }
    ests = {
        "MVD (coupled)": MVD(),
        "MVD (uncoupled)": MVD(coupled=False),
        "REPARAM": REPARAM(),
        "REINFORCE": REINFORCE(),
    }
    for name, est in ests.items():
        g = estimators(normal_guide, {"z": est})
        params = ppl.init_params(jax.random.PRNGKey(0), normal_model, g)
        grads = draws(expected_cos, normal_model, g, params)
        # chain rule: sigma is stored as log sigma; d/dσ = d/dlogσ / σ
        row(f"Normal cos, ∂μ: {name}", grads["mu"], -0.3481344, refs[name][0])
        row(f"Normal cos, ∂σ: {name}", grads["sigma"] / 0.8, -0.5098046, refs[name][1])


if __name__ == "__main__":
    main()
