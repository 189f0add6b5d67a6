"""Write (and optionally execute) the tutorial notebooks from the cells below.

The notebooks are generated so that their code stays in one reviewed place. Run
``python notebooks/build_notebooks.py --execute`` to regenerate the executed
``notebooks/01_programmable_vi.ipynb`` (about 3 minutes on 2 CPU cores); the test suite
executes the committed notebook with ``PPL_FAST=1`` (short runs).
"""

from __future__ import annotations

import argparse
import pathlib

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = pathlib.Path(__file__).parent

CELLS_01 = [
    (
        "md",
        """# Programmable variational inference with `ppl`

An *objective* is an ordinary Python function of a NumPyro `model` and `guide`. It samples
traces (`ppl.sample_trace`), scores programs at traces (`ppl.log_density`), draws particles
(`ppl.particles`) and does arithmetic. `ppl.value_and_grad` turns it into an **unbiased
gradient estimator**, with the estimator chosen per sample site (REPARAM, REINFORCE with
baselines, ENUM, MVD).

This tour: (1) a new objective in a cell, (2) estimators per site, (3) ELBO vs IWELBO vs
reweighted wake-sleep on a VAE, (4) ArviZ plots of SVI and NUTS side by side.""",
    ),
    (
        "code",
        """import os

import arviz as az
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax

import ppl
from ppl.inference import NUTS, SVI, to_inference_data
from ppl.transforms import ENUM, MVD, REINFORCE, estimators

FAST = os.environ.get("PPL_FAST") == "1"  # the test suite runs this notebook in fast mode
STEPS = 40 if FAST else 2000
print("fast mode" if FAST else "full mode", "| jax", jax.__version__, jax.devices())""",
    ),
    (
        "md",
        """## 1. A model, a guide, and a new objective written in a cell""",
    ),
    (
        "code",
        """x = jnp.array([0.5, 1.2, -0.3])


def model(x):
    z = numpyro.sample("z", dist.Normal(0.0, 1.0))
    with numpyro.plate("data", x.shape[0]):
        numpyro.sample("x", dist.Normal(z, 1.0), obs=x)


def guide(x):
    m = numpyro.param("m", 0.2)
    s = numpyro.param("s", np.exp(-0.5), constraint=dist.constraints.positive)
    numpyro.sample("z", dist.Normal(m, s))


def tempered_iwelbo(model, guide, *args, K=5, beta=0.5):
    \"\"\"A user's new objective: IWELBO with a tempered likelihood-and-prior term.\"\"\"
    with ppl.particles(K):
        tr = ppl.sample_trace(guide, *args)
        log_p = ppl.log_density(model, tr, *args)
        log_q = ppl.log_density(guide, tr, *args)
    return ppl.logmeanexp(beta * log_p - log_q)


params = ppl.init_params(jax.random.PRNGKey(0), model, guide, x)
f = jax.jit(ppl.value_and_grad(ppl.objectives.elbo, model, guide))
keys = jax.random.split(jax.random.PRNGKey(1), 20_000)
values, grads = jax.vmap(lambda k: f(params, k, x))(keys)
print(f"ELBO {values.mean():.4f} (exact -4.1826); dELBO/dm {grads['m'].mean():.3f} (exact 0.600)")
value, _ = jax.jit(ppl.value_and_grad(tempered_iwelbo, model, guide))(params, keys[0], x)
print(f"tempered IWELBO, one estimate: {value:.3f}")""",
    ),
    (
        "md",
        """## 2. Choosing the gradient estimator per site

A discrete latent has no reparameterisation. Pick REINFORCE (optionally with a baseline),
MVD (measure-valued derivative) or ENUM (exact sum) per site, by handler or by
`infer={"estimator": ...}`; the model and guide stay unmodified.""",
    ),
    (
        "code",
        """def mix_model(x):
    c = numpyro.sample("c", dist.Bernoulli(0.3))
    numpyro.sample("x", dist.Normal(2 * c - 1, 1), obs=x)


def mix_guide(x):
    numpyro.sample("c", dist.Bernoulli(logits=numpyro.param("phi", 0.0)))


x0 = jnp.array(0.4)
rows = []
for name, est in [("REINFORCE", REINFORCE()), ("MVD", MVD()), ("ENUM", ENUM())]:
    g = estimators(mix_guide, {"c": est})
    p = ppl.init_params(jax.random.PRNGKey(0), mix_model, g, x0)
    f = jax.jit(jax.vmap(ppl.value_and_grad(ppl.objectives.elbo, mix_model, g), (None, 0, None)))
    _, gr = f(p, jax.random.split(jax.random.PRNGKey(2), 20_000), x0)
    rows.append((name, float(gr["phi"].mean()), float(gr["phi"].std())))
print("| estimator | mean dELBO/dphi (exact -0.01182) | per-sample sd |")
print("|---|---|---|")
for name, mean, sd in rows:
    print(f"| {name} | {mean:+.4f} | {sd:.3f} |")""",
    ),
    (
        "md",
        """## 3. ELBO vs IWELBO vs reweighted wake-sleep on a VAE

The VAE of `ppl fit vae` (binarised 8×8 digits). Each objective trains the same network
with `ppl.inference.SVI`; we compare the held-out IWELBO(K=100) in nats per test image.""",
    ),
    (
        "code",
        """from ppl.models import vae

x_train = jnp.asarray(vae.load_digits_binarised("train"))
x_test = jnp.asarray(vae.load_digits_binarised("test"))
objectives = {
    "ELBO": ppl.objectives.elbo,
    "IWELBO(5)": ppl.objectives.iwelbo(5),
    "RWS(5)": {"model": ppl.objectives.wake_theta(5), "guide": ppl.objectives.wake_phi(5)},
}
heldout = jax.jit(ppl.value_and_grad(ppl.objectives.iwelbo(100), vae.vae_model, vae.vae_guide))
table, curves = {}, {}
for name, objective in objectives.items():
    svi = SVI(vae.vae_model, vae.vae_guide, optax.adam(1e-3), objective)
    result = svi.run(jax.random.PRNGKey(0), STEPS, x_train, 64, progress_bar=False)
    bound, _ = heldout(result.state.params, jax.random.PRNGKey(1), x_test)
    table[name] = float(bound) / x_test.shape[0]
    curves[name] = np.asarray(result.losses)
print("| objective | held-out IWELBO(100), nats/image |")
print("|---|---|")
for name, v in table.items():
    print(f"| {name} | {v:.2f} |")
fig, ax = plt.subplots(figsize=(6, 3))
for name, losses in curves.items():
    ax.plot(losses, label=name, alpha=0.8)
ax.set(xlabel="step", ylabel="loss (−objective)", yscale="symlog")
ax.legend();""",
    ),
    (
        "md",
        """## 4. SVI and NUTS side by side in ArviZ

Eight schools (non-centred): a mean-field guide fitted by SVI, and BlackJAX NUTS on the
same NumPyro model. Both give `InferenceData`, so ArviZ compares them directly.""",
    ),
    (
        "code",
        """from ppl.models import eight_schools as es

data = es.load_data()
svi = SVI(es.eight_schools, es.eight_schools_guide, optax.adam(0.05))
res = svi.run(
    jax.random.PRNGKey(0), 200 if FAST else 3000, data["sigma"], data["y"], progress_bar=False
)
idata_vi = to_inference_data(
    res,
    es.eight_schools,
    es.eight_schools_guide,
    data["sigma"],
    data["y"],
    num_samples=400,
    key=jax.random.PRNGKey(1),
)
nuts = NUTS(
    es.eight_schools,
    num_warmup=100 if FAST else 500,
    num_samples=100 if FAST else 500,
    num_chains=2 if FAST else 4,
)
idata_mcmc = nuts.run(jax.random.PRNGKey(2), data["sigma"], data["y"])
axes = az.plot_forest(
    [idata_vi, idata_mcmc],
    model_names=["SVI", "NUTS"],
    var_names=["mu", "tau"],
    combined=True,
    figsize=(6, 3),
)
print(az.compare({"svi": idata_vi, "nuts": idata_mcmc}))""",
    ),
]


def build(cells) -> nbformat.NotebookNode:
    nb = new_notebook()
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    for kind, src in cells:
        nb.cells.append(new_markdown_cell(src) if kind == "md" else new_code_cell(src))
    return nb


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--execute", action="store_true", help="execute and store outputs")
    args = parser.parse_args(argv)
    path = HERE / "01_programmable_vi.ipynb"
    nb = build(CELLS_01)
    if args.execute:
        from nbclient import NotebookClient

        resources = {"metadata": {"path": str(HERE)}}
        NotebookClient(nb, timeout=1800, kernel_name="python3", resources=resources).execute()
    tmp = path.with_suffix(".tmp")
    nbformat.write(nb, tmp)
    tmp.replace(path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
