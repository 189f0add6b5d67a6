"""Eight schools (Rubin 1981), non-centred (``ppl fit eight-schools``).

``mu ~ Normal(0, 5)``, ``tau ~ HalfCauchy(5)``, ``theta_tilde_j ~ Normal(0, 1)``,
``theta_j = mu + tau * theta_tilde_j``, ``y_j ~ Normal(theta_j, sigma_j)`` over plate
``school`` (8). The guide is mean-field Normal in the unconstrained space (what
``AutoNormal`` would build, written out): ``mu`` Normal, ``tau`` LogNormal,
``theta_tilde`` Normal per school. Fits by SVI or by NUTS.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.distributions import constraints

from ppl.models.registry import FitResult, ModelSpec, Problem, register

__all__ = ["SCHOOLS", "SIGMA", "Y", "eight_schools", "eight_schools_guide", "load_data"]

Y = np.array([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0], dtype=np.float32)
SIGMA = np.array([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0], dtype=np.float32)
SCHOOLS = ("A", "B", "C", "D", "E", "F", "G", "H")


def load_data() -> dict[str, np.ndarray]:
    """``{"y": [8], "sigma": [8]}`` (float32): the classic treatment effects and standard errors."""
    return {"y": Y.copy(), "sigma": SIGMA.copy()}


def eight_schools(sigma, y=None):
    """The non-centred hierarchical model; ``y=None`` samples the effects."""
    mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = numpyro.sample("tau", dist.HalfCauchy(5.0))
    with numpyro.plate("school", sigma.shape[0]):
        theta_tilde = numpyro.sample("theta_tilde", dist.Normal(0.0, 1.0))
        theta = numpyro.deterministic("theta", mu + tau * theta_tilde)
        numpyro.sample("y", dist.Normal(theta, sigma), obs=y)


def eight_schools_guide(sigma, y=None):
    """Mean-field Normal guide (LogNormal for the positive ``tau``)."""
    pos = constraints.positive
    mu_loc = numpyro.param("mu_loc", jnp.array(0.0))
    mu_scale = numpyro.param("mu_scale", jnp.array(1.0), constraint=pos)
    tau_loc = numpyro.param("tau_loc", jnp.array(0.0))
    tau_scale = numpyro.param("tau_scale", jnp.array(0.5), constraint=pos)
    n = sigma.shape[0]
    tt_loc = numpyro.param("theta_tilde_loc", jnp.zeros(n))
    tt_scale = numpyro.param("theta_tilde_scale", jnp.full(n, 0.5), constraint=pos)
    numpyro.sample("mu", dist.Normal(mu_loc, mu_scale))
    numpyro.sample("tau", dist.LogNormal(tau_loc, tau_scale))
    with numpyro.plate("school", n):
        numpyro.sample("theta_tilde", dist.Normal(tt_loc, tt_scale))


def _build(opts) -> Problem:
    data = load_data()
    sigma, y = jnp.asarray(data["sigma"]), jnp.asarray(data["y"])
    return Problem(
        model=eight_schools,
        guide=eight_schools_guide,
        args=(sigma,),
        kwargs={"y": y},
        data=data,
    )


def _with_theta(idata):
    """The posterior with ``theta`` (computed from mu, tau, theta_tilde if a driver left
    the deterministic site out)."""
    post = idata.posterior
    if "theta" in post:
        return post
    theta = post["mu"] + post["tau"] * post["theta_tilde"]
    return post.assign(theta=theta)


def plot_forest(idata):
    """Forest plot of the school effects ``theta`` (and ``mu``, ``tau``)."""
    import arviz as az

    post = _with_theta(idata)
    axes = az.plot_forest(
        post, var_names=["theta", "mu", "tau"], combined=True, hdi_prob=0.94, figsize=(6, 5)
    )
    fig = np.ravel(axes)[0].figure
    fig.suptitle("eight schools: 94% HDI of the effects")
    return fig


def _plot(fit: FitResult, problem: Problem, out_dir):
    return {"forest": plot_forest(fit.idata)}


def _summary(idata):
    import arviz as az

    return az.summary(_with_theta(idata), var_names=["mu", "tau", "theta"])


register(
    ModelSpec(
        name="eight-schools",
        description="eight schools: non-centred hierarchical normal model (SVI or NUTS)",
        build=_build,
        plot=_plot,
        inference=("svi", "nuts"),
        default_steps=5000,
        default_lr=1e-2,
        default_num_samples=1000,
        summary=_summary,
        details=(
            "Rubin's eight schools data (y, sigma); the guide is mean-field Normal in the "
            "unconstrained space. forest.png shows the posterior of theta, mu and tau."
        ),
    )
)
