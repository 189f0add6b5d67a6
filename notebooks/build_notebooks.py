"""Write (and optionally execute) the tutorial notebooks from the cells below.

The notebooks are generated so that their code stays in one reviewed place. Run
``python notebooks/build_notebooks.py --execute`` to regenerate the executed
``notebooks/01_programmable_vi.ipynb`` (about 3 minutes on 2 CPU cores); the test suite
executes the committed notebook with ``PPL_FAST=1`` (short runs).
"""

from __future__ import annotations

import argparse
import pathlib
import sys

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


CELLS_06 = [
    (
        "md",
        """# Kronecker sparse Bayesian learning (KroSBL)

He & Joseph recover a sparse vector from `y = (A_1 ⊗ … ⊗ A_I) x + n` when the support of x
is itself a Kronecker product (an IRS-MIMO channel: angles of arrival and departure on
grids). The prior `x ~ N(0, diag(γ_1 ⊗ … ⊗ γ_I))` has `Σ n_i` hyperparameters instead of
`N = Π n_i`, and EM over them uses the factors' structure:

* **E-step** (`ppl.inference.sbl.estep`): `μ`, `diag Σ` and the cost `L = log|C| + yᴴC⁻¹y`
  from the eigendecompositions of the small matrices `A_i diag(γ_i) A_iᴴ`; nothing
  `N×N` or `M×M` is formed;
* **M-step**: `"am"` (alternating closed-form factor updates; the cost never increases),
  `"svd"` (best rank-one fit of `Σ_jj + |μ_j|²`), or `"classic"` (unstructured γ).

This notebook: (1) one problem, three M-steps; (2) the cost per iteration and the recovered
support; (3) NMSE against SNR with OMP baselines; (4) run time against N; (5) the IRS
channel-estimation problem with block coupling; (6) the same model in NumPyro under SVI.""",
    ),
    (
        "code",
        """import os
import time

import arviz as az
import jax
import matplotlib.pyplot as plt
import numpy as np

from ppl.inference import sbl, to_inference_data
from ppl.models import krosbl

FAST = os.environ.get("PPL_FAST") == "1"  # the test suite runs this notebook in fast mode
SEEDS = 2 if FAST else 10
# the spec's problem (N = 1000, M = 480); fast mode shrinks it to N = 216, M = 80
SIZES = dict(ns=(6, 6, 6), ms=(4, 4, 5)) if FAST else dict(ns=(10, 10, 10), ms=(6, 8, 10))
print("fast mode" if FAST else "full mode", "| jax", jax.__version__, jax.devices())""",
    ),
    (
        "md",
        """## 1. One problem, three M-steps

`I = 3` modes of 10 entries (N = 1000), `M = 6·8·10 = 480` measurements, 3 active entries
per mode (27 non-zeros), 20 dB (in fast mode: 6 entries and 4·4·5 measurements).""",
    ),
    (
        "code",
        """data = krosbl.generate_synthetic(0, **SIZES, k=3, snr_db=20)
fits = {}
for m_step in ("classic", "am", "svd"):
    t0 = time.perf_counter()
    res = sbl.fit(data["factors"], data["y"], m_step=m_step, noise_var=data["noise_var"])
    fits[m_step] = res
    print(
        f"{m_step:8s} NMSE {krosbl.nmse(res.mean, data['x']):.2e}  iterations {res.n_iter:3d}"
        f"  converged {res.converged}  {time.perf_counter() - t0:.2f} s (incl. compile)"
    )""",
    ),
    (
        "md",
        """## 2. Cost per iteration and the recovered support

AM decreases `L` at every iteration (generalised EM); SVD usually needs fewer iterations.""",
    ),
    (
        "code",
        """fig, axes = plt.subplots(1, 2, figsize=(11, 3.5))
for name, res in fits.items():
    axes[0].plot(res.history, label=name)
axes[0].set(xlabel="EM iteration", ylabel="SBL cost L", title="cost per iteration")
axes[0].legend()
idx = np.arange(data["x"].size)
axes[1].stem(idx, np.abs(data["x"]), linefmt="C7-", markerfmt="C7o", basefmt=" ", label="true")
axes[1].plot(idx, np.abs(fits["am"].mean), "C1.", label="AM estimate")
axes[1].set(xlabel="index j (C order)", ylabel="|x_j|", title="support")
axes[1].legend()
plt.tight_layout()
amp = np.abs(fits["am"].mean)
found = amp > 1e-3 * amp.max()
true = data["support"]
print("support recovery |Ŝ∩S|/|Ŝ∪S| =", (found & true).sum() / (found | true).sum())""",
    ),
    (
        "md",
        """## 3. NMSE against SNR

Median NMSE over seeds for classic SBL, AM, SVD and two greedy baselines: OMP on the full
dictionary and Kronecker OMP (at most 5 atoms per mode). `benchmarks/krosbl.py` runs the
full comparison (more seeds and SNRs, IQRs, support recovery).""",
    ),
    (
        "code",
        """snrs = [5, 25] if FAST else [0, 10, 20, 30]


def em(m_step):
    return lambda d: sbl.fit(d["factors"], d["y"], m_step=m_step, noise_var=d["noise_var"]).mean


methods = {
    "classic SBL": em("classic"),
    "AM-KroSBL": em("am"),
    "SVD-KroSBL": em("svd"),
    "OMP": lambda d: sbl.omp(d["factors"], d["y"], d["noise_var"], max_atoms=100),
    "KOMP": lambda d: sbl.komp(d["factors"], d["y"], d["noise_var"], caps=5),
}
table = {name: [] for name in methods}
for snr in snrs:
    problems = [krosbl.generate_synthetic(s, **SIZES, k=3, snr_db=snr) for s in range(SEEDS)]
    for name, method in methods.items():
        table[name].append(np.median([krosbl.nmse(method(d), d["x"]) for d in problems]))
fig, ax = plt.subplots(figsize=(6, 4))
for name, vals in table.items():
    ax.semilogy(snrs, vals, "o-", label=name)
ax.set(xlabel="SNR (dB)", ylabel=f"median NMSE ({SEEDS} seeds)", title="NMSE vs SNR")
ax.legend()
print("| SNR | " + " | ".join(table) + " |")
for i, snr in enumerate(snrs):
    print(f"| {snr} | " + " | ".join(f"{table[n][i]:.2e}" for n in table) + " |")""",
    ),
    (
        "md",
        """## 4. Run time against N

`I = 2`, `n_1 = n_2 = n`, `m_i = n/2`: time of a 50-iteration fit after compilation. Classic
SBL works with the dense `M×N` dictionary and an `M×M` eigendecomposition, so its cost
grows like `N³`-ish; KroSBL's like `N·max m_i`.""",
    ),
    (
        "code",
        """ns_grid = [8, 16] if FAST else [8, 16, 32, 64]
times = {"classic": [], "am": [], "svd": []}
for n in ns_grid:
    rng = np.random.default_rng(n)
    fs = [rng.normal(size=(n // 2, n)) for _ in range(2)]
    y = rng.normal(size=(n // 2) ** 2)
    for m_step in times:
        kw = dict(m_step=m_step, noise_var=0.1, max_iter=50, tol=1e-300)
        sbl.fit(fs, y, **kw)  # compile
        t0 = time.perf_counter()
        sbl.fit(fs, y, **kw)
        times[m_step].append(time.perf_counter() - t0)
N = np.array(ns_grid) ** 2
fig, ax = plt.subplots(figsize=(6, 4))
for m_step, ts in times.items():
    slope = np.polyfit(np.log(N), np.log(ts), 1)[0]
    ax.loglog(N, ts, "o-", label=f"{m_step} (slope {slope:.1f})")
ax.set(xlabel="N", ylabel="seconds per 50 iterations", title="run time vs N")
ax.legend()""",
    ),
    (
        "md",
        """## 5. IRS-MIMO channel estimation

The embedded draw of `ppl fit krosbl` (spec §1.9): 6 MS antennas, 16 BS antennas, a
256-element IRS, an 18-point angle grid per mode (N = 18³ = 5832), M = 288, 20 dB. The
channel's support is 3 contiguous grid points in the IRS and BS angle modes, so pattern
coupling of those modes (`block_sizes=(3, 1, 3)`, PC-KroSBL) is the paper's remedy. NMSE
is that of the cascaded channel, averaged over the IRS patterns.

Two things to notice. With the default pruning ratio (1e-6, which keeps true small entries)
AM has not converged after 150 iterations here; the paper's ratio 1e-2 (plus an absolute
floor 1e-4) prunes the spurious entries and converges in a few dozen. And on these draws
the plain Kronecker M-steps are already as good as the coupled one: the coupling does not
reproduce the paper's 10-50× gain (see `benchmarks/krosbl.py` for 20 draws).""",
    ),
    (
        "code",
        """irs = krosbl.load_default()
rows = []
methods_irs = [] if FAST else [("classic SBL", dict(m_step="classic"))]  # ~3 min on 2 cores
for name, kw in methods_irs + [
    ("AM-KroSBL", dict(m_step="am")),
    ("AM-KroSBL, paper pruning", dict(m_step="am", prune_ratio=1e-2, prune_abs=1e-4)),
    ("SVD-KroSBL", dict(m_step="svd")),
    ("PC-KroSBL (β=0.8)", dict(m_step="am", block_sizes=(3, 1, 3))),
]:
    t0 = time.perf_counter()
    res = sbl.fit(irs["factors"], irs["y"], noise_var=irs["noise_var"], **kw)
    rows.append((name, krosbl.irs_nmse(irs, res.mean), res.n_iter, time.perf_counter() - t0))
    if name.startswith("PC"):
        pc = res
print("| method | cascaded-channel NMSE | iterations | seconds |")
print("|---|---|---|---|")
for name, err, it, sec in rows:
    print(f"| {name} | {err:.3g} | {it} | {sec:.1f} |")
figs = krosbl.plot(pc, irs)""",
    ),
    (
        "md",
        """## 6. The same model in NumPyro, and ArviZ

`krosbl_model(..., marginal=True)` is an ordinary NumPyro model whose γ factors are `param`
sites and whose y has the `KronSBLMarginal` likelihood (eigen route, differentiable), so
`ppl.inference.SVI` with an empty guide performs type-II maximum likelihood by gradient
ascent; EM reaches the same cost in far fewer steps. Every EM result converts to
`InferenceData`.""",
    ),
    (
        "code",
        """import optax

from ppl.inference import SVI

small = krosbl.generate_synthetic(1, ns=(10, 10), ms=(6, 6), k=2, snr_db=20)
em = sbl.fit(small["factors"], small["y"], noise_var=small["noise_var"], max_iter=500, tol=1e-8)


def no_guide(y=None, **kwargs):
    pass


svi = SVI(krosbl.krosbl_model, no_guide, optax.adam(0.1))
steps = 200 if FAST else 2000
out = svi.run(
    jax.random.PRNGKey(0),
    steps,
    y=small["y"],
    factors=small["factors"],
    noise_var=small["noise_var"],
    marginal=True,
    progress_bar=False,
)
gammas = [out.params[f"gamma_{i + 1}"] for i in range(2)]
_, _, l_svi = sbl.estep(small["factors"], gammas, small["noise_var"], small["y"])
print(
    f"EM cost L = {em.cost:.4f} in {em.n_iter} iterations; SVI cost L = {float(l_svi):.4f} "
    f"after {steps} Adam steps"
)
idata = to_inference_data(em)
print(idata)
az.plot_forest(idata, var_names=["gamma_1", "gamma_2"], combined=True, figsize=(6, 5));""",
    ),
]


CELLS_03 = [
    (
        "md",
        """# Scale mixtures of NNGPs: Student-t processes and general scale priors

An infinitely wide network is a Gaussian process whose covariance is its **NNGP kernel**
K. Lee et al. (ICLR 2022) put a prior on the variance σ² of the last layer (the
**readout scale**): the output becomes a *scale mixture* of GPs. An inverse-gamma prior
gives a **Student-t process** in closed form; other priors (Burr XII, half-Cauchy on σ)
need a posterior over one scalar, which `ppl` computes by Gauss–Hermite quadrature at
the Laplace mode, importance sampling or NUTS.

This tutorial: (1) NNGP kernels and finite networks, (2) heavy tails at finite width,
(3) regression with outliers and a shifted test split, (4) the scale as a NumPyro site:
`marginalize_scale`, NUTS and ArviZ, (5) general priors and why the reference code's
importance sampler fails, (6) classification on digits.""",
    ),
    (
        "code",
        """import os
import warnings

import arviz as az
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.handlers import seed, trace
from numpyro.infer.util import log_density

from ppl.distributions import BurrXII, HalfCauchyScale
from ppl.inference import nngp as inf
from ppl.models import nngp
from ppl.transforms.nngp import (
    Dense, Erf, Relu, infinite_width, kernel_fn, marginalize_scale, network, scale_mixture,
    serial, unit_scale,
)

FAST = os.environ.get("PPL_FAST") == "1"  # the test suite runs this notebook in fast mode
print("fast mode" if FAST else "full mode", "| jax", jax.__version__, jax.devices())""",
    ),
    (
        "md",
        """## 1. NNGP kernels, and the finite networks they are the limit of

A network is described stax-style; its last `Dense` is the readout (σ_v = `W_std`).
`kernel_fn(net)` gives K(x, x') by the layer recursion (closed forms for ReLU and erf).
The same description is also a *finite* network: `network("f", net, x, width=...)`
draws N(0, 1) weights as sample sites. Its empirical covariance over many draws
approaches K as the width grows.""",
    ),
    (
        "code",
        """def mlp(act, depth, w_var=2.0, b_var=0.1):
    hidden = [Dense(W_std=w_var**0.5, b_std=b_var**0.5), act] * depth
    return serial(*hidden, Dense(W_std=1.0))


x_grid = jnp.linspace(-3, 3, 61)[:, None]
fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
for ax, (name, act) in zip(axes[:2], [("ReLU", Relu()), ("erf", Erf())]):
    for depth in (1, 2, 4):
        k = kernel_fn(mlp(act, depth))
        ax.plot(x_grid[:, 0], k(x_grid, jnp.zeros((1, 1)))[:, 0], label=f"depth {depth}")
    ax.set(title=f"{name}: K(x, 0)", xlabel="x")
    ax.legend()

net = mlp(Relu(), 2)
x3 = jnp.array([[-1.0], [0.3], [2.0]])
draws = 100 if FAST else 1000
for width in (8, 64, 512):
    f = jax.lax.map(
        lambda key: seed(lambda x: network("f", net, x, width=width), key)(x3),
        jax.random.split(jax.random.key(0), draws),
    )
    emp = np.asarray(f.T @ f / draws)
    axes[2].scatter(np.asarray(kernel_fn(net)(x3)).ravel(), emp.ravel(), label=f"width {width}")
lim = [0, float(kernel_fn(net)(x3).max()) * 1.2]
axes[2].plot(lim, lim, "k--", lw=1)
axes[2].set(xlabel="NNGP kernel", ylabel=f"empirical E[f f'] ({draws} nets)", title="finite nets")
axes[2].legend()
plt.tight_layout()""",
    ),
    (
        "md",
        """## 2. A prior on the readout scale: heavy tails

`scale_mixture(model, prior)` inserts a `scale ~ prior` site that multiplies the readout
variance; `infinite_width(model)` replaces the network by its GP. With
σ² ~ IG(a, b) the output at one input is Student-t with 2a degrees of freedom, and a
finite network's kurtosis tends to 3(a−1)/(a−2) (spec T6): here a = 6, so 3.75 instead
of the Gaussian 3.""",
    ),
    (
        "code",
        """a = b = 6.0
x1 = jnp.ones((1, 1))
one_layer = serial(Dense(W_std=1.0), Relu(), Dense(W_std=1.0))


def output(x):
    return network("f", one_layer, x)


n_draws = 4000 if FAST else 100_000
keys = jax.random.split(jax.random.key(1), n_draws)
rows = []
for width in (4, 16, 64):
    model = infinite_width(scale_mixture(output, dist.InverseGamma(a, b)), width=width)
    f = np.asarray(jax.lax.map(lambda k: seed(model, k)(x1)[0], keys))
    kurt = np.mean(f**4) / np.mean(f**2) ** 2
    exact = 3 * (a - 1) / (a - 2) * (1 + 5 / width)
    rows.append((width, kurt, exact))
gp = infinite_width(scale_mixture(output, dist.InverseGamma(a, b)))
f_inf = np.asarray(jax.lax.map(lambda k: seed(gp, k)(x1)[0], keys))
print("width  kurtosis (MC)  exact 3(a-1)/(a-2)(1+5/n)")
for w, k, e in rows:
    print(f"{w:5d}  {k:13.3f}  {e:8.3f}")
kurt_inf = np.mean(f_inf**4) / np.mean(f_inf**2) ** 2
print(f"  inf  {kurt_inf:13.3f}  {3 * (a - 1) / (a - 2):8.3f}")""",
    ),
    (
        "md",
        """## 3. Regression with outliers and an out-of-distribution test split

scikit-learn's diabetes data (442 patients, 10 features), standardised. The default
variant of `ppl fit nngp`: train on BMI ≤ its 80th percentile, test on the rest, with
5 % of the training targets shifted by 4–8 standard deviations. A depth-2 ReLU NNGP with
noise on the same scale, y | σ² ~ N(0, σ²(K + τ²I)), under three scale models: plain
NNGP (σ² = β/n plug-in), Student-t (IG(2, 2), closed form) and Burr XII(2, 2) (Gauss–
Hermite). The posterior mean does not depend on the prior; the predictive spread and
the evidence do.""",
    ),
    (
        "code",
        """data = nngp.load_default("outliers-ood")
reg_net = nngp.make_net(depth=2)
priors = {"nngp": None, "ig": dist.InverseGamma(2.0, 2.0), "burr": BurrXII(2.0, 2.0)}
results = nngp.compare(data, net=reg_net, noise=0.1, priors=priors)
print(f"{'prior':6s} {'RMSE':>7s} {'NLL':>7s} {'log p(y)':>10s} {'E[σ²|y]':>8s}")
for name, r in results.items():
    print(
        f"{name:6s} {r['rmse']:7.4f} {r['nll']:7.4f} {float(r['log_evidence']):10.2f} "
        f"{float(r['mean_scale']):8.3f}"
    )
figs = nngp.plot(results, data)""",
    ),
    (
        "md",
        """With a few hundred training points and one global scale the three predictives differ
only slightly (the t's degrees of freedom are 2a + n): heavy tails matter when n is
small. The same comparison on 30 training points: """,
    ),
    (
        "code",
        """small = {k: (v[:30] if k in ("x_train", "y_train") else v) for k, v in data.items()}
small_res = nngp.compare(small, net=reg_net, noise=0.1, priors=priors)
for name, r in small_res.items():
    print(f"{name:6s} n=30: NLL {r['nll']:.4f}  log p(y) {float(r['log_evidence']):.2f}")""",
    ),
    (
        "md",
        """## 4. The scale is an ordinary NumPyro site

`nngp.regression` is a NumPyro model with a `scale` site. `marginalize_scale` integrates
an inverse-gamma scale out in closed form (one observed multivariate Student-t site), so
`log_density` gives the log evidence exactly; NUTS samples the scale of the *same* model,
and ArviZ reads the draws.""",
    ),
    (
        "code",
        """xs, ys = data["x_train"], data["y_train"]
kw = {"net": reg_net, "noise": 0.1, "scale_prior": dist.InverseGamma(2.0, 2.0)}
with jax.enable_x64(True):
    lp, tr = log_density(marginalize_scale(nngp.regression), (xs, ys), kw, {})
print("marginalize_scale log p(y):", float(lp))
print("closed form (inference.nngp):", float(results["ig"]["log_evidence"]))
print("sites:", {k: v["type"] for k, v in tr.items()}, type(tr["y"]["fn"]).__name__)

from numpyro.infer import MCMC, NUTS

mcmc = MCMC(NUTS(nngp.regression), num_warmup=150 if FAST else 1000,
            num_samples=150 if FAST else 2000, progress_bar=False)
mcmc.run(jax.random.key(2), xs, ys, **kw)
idata = az.from_numpyro(mcmc)
print(az.summary(idata, var_names=["scale"]))
print("closed-form E[σ²|y]:", float(results["ig"]["mean_scale"]))
az.plot_posterior(idata, var_names=["scale"], figsize=(5, 3));""",
    ),
    (
        "md",
        """## 5. General priors: Gauss–Hermite, and importance sampling done right

For a non-conjugate prior the data enter only through β = yᵀC⁻¹y and ln|C|, so the
posterior over u = ln σ² is one-dimensional. `method="gh"` (default) integrates it with
32 Gauss–Hermite nodes at the Laplace mode (error ≈ 1e-10 here); `method="is"` uses a
Student-t₄ proposal on u. The reference code's importance sampler draws from the
*prior*: when the likelihood sits far from the prior, its effective sample size
collapses, and `ppl` warns.""",
    ),
    (
        "code",
        """kernel = kernel_fn(unit_scale(reg_net))
burr = BurrXII(2.0, 2.0)
with jax.enable_x64(True):
    gh = inf.fit(kernel, xs, ys, prior=burr, noise=0.1, method="gh")
    is_t = inf.fit(kernel, xs, ys, prior=burr, noise=0.1, method="is", key=jax.random.key(3))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        is_prior = inf.fit(kernel, xs, ys, prior=burr, noise=0.1, method="is",
                           proposal="prior", key=jax.random.key(3))
for name, post in [("GH-32", gh), ("IS, t4 proposal", is_t), ("IS, prior proposal", is_prior)]:
    print(f"{name:20s} log p(y) {float(post.log_evidence):10.3f}  ESS {float(post.ess):7.1f}")
print("warning:", [str(w.message)[:100] for w in caught])""",
    ),
    (
        "md",
        """## 6. Classification on digits: sparse variational GP vs Student-t process

Ten latent functions share K and one σ²; q(σ²) is inverse-gamma and learned (spec §1.5).
`nngp.classification` and `nngp.classification_guide` are a plain NumPyro model/guide pair,
trained here by `ppl.inference.SVI` with the ELBO (short run in fast mode).""",
    ),
    (
        "code",
        """import optax

import ppl
from ppl.inference import SVI

digits = nngp.load_digits_split("clean")
cls_net = nngp.make_net(depth=2)
x_tr, y_tr = digits["x_train"], digits["y_train"]
scores = {}
# Compiling the sparse-GP ELBO takes ~30 s on 2 CPU cores: the test suite (fast mode)
# skips this section; run the notebook in full mode to train both models.
models = [] if FAST else [("SVGP", None), ("SVTP", dist.InverseGamma(2.0, 2.0))]
for name, prior in models:
    svi = SVI(nngp.classification, nngp.classification_guide, optax.adam(2e-2), ppl.objectives.elbo)
    run = svi.run(jax.random.key(4), 1500, x_tr, y_tr, net=cls_net, num_classes=10,
                  inducing=x_tr[:100], scale_prior=prior, batch_size=100, progress_bar=False)
    probs = nngp.classification_predict(run.params, digits["x_test"], net=cls_net,
                                        scale_prior=prior, num_samples=64)
    scores[name] = nngp.classification_metrics(probs, digits["y_test"])
print("fast mode: classification skipped" if FAST else "test metrics:")
for name, m in scores.items():
    print(name, {k: round(float(v), 4) for k, v in m.items()})""",
    ),
    (
        "md",
        """**Where next.** `ppl fit nngp` runs section 3 from the command line and writes an
ArviZ `posterior.nc`, the predictive and scale plots and a summary;
`benchmarks/nngp.py` prints the regression table against the spec's numbers, the
classification table and kernel timings.""",
    ),
]


CELLS_02 = [
    (
        "md",
        """# Latent SDEs driven by fractional noise

Fractional Brownian motion B^H has correlated increments: rough paths for a **Hurst index**
H < ½, smooth trending ones for H > ½ (H = ½ is Brownian motion). It is not Markov, so an
SDE driven by it cannot be simulated or conditioned step by step. Daems et al. (ICLR 2024)
approximate it by a weighted sum of K Ornstein–Uhlenbeck processes sharing one Brownian
motion (**MA-fBM**), B̂^H_t = Σ_k ω_k Y_k(t) with speeds γ_k on a geometric grid and the
weights ω(H) that minimise the integrated L2 error in closed form; X and (Y_1..Y_K) then
form an ordinary Markov SDE.

In `ppl` this is a program transformation: a model calls `fbm_sde(...)` inside
`markov_fbm()`, which turns it into the augmented Markov SDE with sample sites for the OU
start and the Brownian increments. A guide adds a **control** u to the increments; the
increments' density ratio is the exact Girsanov term, so `ppl.objectives.elbo` (or
`iwelbo`, `renyi`) is the latent-SDE ELBO with no special code.

This notebook: (1) the approximation and its error; (2) an fBM bridge against the exact
posterior; (3) recovering H, exactly (Kalman) and by VI; (4) a mini-video model, a blob
whose position follows a fractional OU process.""",
    ),
    (
        "code",
        """import os
import time

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import numpyro
import optax

import ppl
from ppl.inference import SVI
from ppl.inference.fbm import hurst_mle, kalman_log_likelihood, posterior_marginals
from ppl.models.fbm_sde import LatentSDE, simulate_fou
from ppl.models.fbm_video import simulate_video, video_sde
from ppl.transforms.fbm import (
    approximation_error,
    fbm_covariance,
    gamma_grid,
    ma_covariance,
    optimal_omega,
)

FAST = os.environ.get("PPL_FAST") == "1"  # the test suite runs this notebook in fast mode
print("fast mode" if FAST else "full mode", "| backend:", jax.default_backend())""",
    ),
    (
        "md",
        """## 1. The Markov approximation

`gamma_grid(K, γ_max)` gives the speeds (γ_1·γ_K = 1), `optimal_omega` the weights, solved in
float64 and differentiable in H. Type II (Riemann–Liouville) is approximated far better than
type I (Mandelbrot–van Ness, Γ-normalised) for H > ½ at K = 5; the type I error comes from
the slowest speed, and a larger γ_max reduces it.""",
    ),
    (
        "code",
        """gammas = gamma_grid(5, 20.0)
hs = np.round(np.arange(0.1, 0.95, 0.1), 2)
print("γ:", np.round(np.asarray(gammas), 3))
print(" H   | rel. L2 error type I | type II")
for h in hs:
    e1 = float(approximation_error(h, gammas, 2.4, fbm_type="I"))
    e2 = float(approximation_error(h, gammas, 2.4, fbm_type="II"))
    print(f" {h:.1f} | {e1:20.1e} | {e2:.1e}")

t = np.linspace(0.01, 2.4, 100)
fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
for ax, kind in zip(axes, ("I", "II"), strict=True):
    for h, c in ((0.3, "C0"), (0.7, "C3")):
        om = optimal_omega(h, gammas, 2.4, fbm_type=kind)
        ax.plot(t, fbm_covariance(t, t, h, kind), c, label=f"fBM, H = {h}")
        ma = ma_covariance(t, t, gammas, om, kind)
        ax.plot(t, ma, c + "--", label=f"MA-fBM (K = 5), H = {h}")
    ax.set(title=f"type {kind}: Var B_t", xlabel="t")
axes[0].legend(fontsize=8)
fig.tight_layout()""",
    ),
    (
        "md",
        """## 2. The fBM bridge against the exact posterior

X_0 = 0, dX = dB^H (H = 0.7, type I), and X_2 = 0 observed with sd 0.1. The prior is linear
and Gaussian, so the posterior of the MA model is known exactly
(`ppl.inference.fbm.posterior_marginals`, a Kalman computation on the augmented state) and
so is the log evidence (`kalman_log_likelihood`). The variational posterior is the same SDE
with a control MLP; `LatentSDE.paths` returns its paths on the whole Euler grid.

`kl_gradient="expected"` keeps the ELBO's value but differentiates the Girsanov expectation
½∫u²dt instead of the sampled density ratio (it drops a zero-mean martingale term from the
gradient): much lower variance, unbiased for the ELBO, but biased for importance-weighted
objectives, which is why `"exact"` is the default.""",
    ),
    (
        "code",
        """bridge = LatentSDE(
    dim=1, hurst=0.7, drift=lambda t, x: 0.0 * x, diffusion=lambda t, x: jnp.ones_like(x),
    x0=0.0, horizon=2.0, dt=0.01, gamma_max=20.0, obs_sd=0.1, width=16 if FAST else 128,
    kl_gradient="expected",  # the ELBO's low-variance path gradient (see the note above)
)
ts_b, ys_b = jnp.array([2.0]), jnp.zeros((32, 1, 1))
svi = SVI(bridge.model, bridge.guide, optax.adam(3e-3))
start = time.perf_counter()
res_b = svi.run(jax.random.PRNGKey(0), 100 if FAST else 2000, ts_b, ys_b)
print(f"trained in {time.perf_counter() - start:.0f} s")

elbo = jax.jit(ppl.value_and_grad(ppl.objectives.elbo, bridge.model, bridge.guide))
ys_eval = jnp.zeros((512, 1, 1))
keys = jax.random.split(jax.random.PRNGKey(7), 4)
vals = [float(elbo(res_b.state.params, k, ts_b, ys_eval)[0]) / 512 for k in keys]
with jax.enable_x64(True):
    exact = float(kalman_log_likelihood(np.array([2.0]), np.zeros((1, 1)), 0.1, 0.7, fbm_type="I",
                                        gamma_max=20.0, horizon=2.0)[0])
print(f"ELBO per sequence {np.mean(vals):.3f}   exact log evidence {exact:.3f}   "
      f"gap {exact - np.mean(vals):.3f} nats")""",
    ),
    (
        "code",
        """ys_many = jnp.zeros((1024, 1, 1))
grid, xs = bridge.paths(res_b.params, jax.random.PRNGKey(1), ts_b, ys_many)
grid, xs = np.asarray(grid), np.asarray(xs[..., 0])  # [N+1], [N+1, 1024]
mean_ex, sd_ex = posterior_marginals(np.array([2.0]), np.array([0.0]), 0.1, 0.7, grid,
                                     fbm_type="I", gamma_max=20.0, horizon=2.0)
fig, ax = plt.subplots(figsize=(7, 3.2))
ax.fill_between(grid, mean_ex - 2 * sd_ex, mean_ex + 2 * sd_ex, color="k", alpha=0.15,
                label="exact posterior ± 2 sd")
ax.plot(grid, xs[:, :20], color="C0", lw=0.6, alpha=0.6)
ax.plot(grid, 2 * xs.std(axis=1), "C1", label="2 × sd of the VI paths")
ax.plot(grid, -2 * xs.std(axis=1), "C1")
ax.set(xlabel="t", ylabel="X_t", title="fBM bridge, H = 0.7: VI paths against the exact band")
ax.legend(fontsize=8)
err = np.max(np.abs(xs.std(axis=1) - sd_ex)) / sd_ex.max()
print(f"max |sd error| / peak sd = {100 * err:.1f} %")""",
    ),
    (
        "md",
        """## 3. Recovering the Hurst index

With no neural network the likelihood of a linear fBM-driven SDE is exact: a Kalman filter
on the augmented state with Van Loan transitions. `hurst_mle` maximises it over H.""",
    ),
    (
        "code",
        """for h in (0.3, 0.5, 0.7):
    d = simulate_fou(1, hurst=h, num_paths=64)
    h_hat = hurst_mle(d["ts"], d["ys"][..., 0], 0.05, fbm_type="I", gamma_max=10.0, drift_rate=1.0)
    print(f"true H = {h}:  Kalman MLE Ĥ = {h_hat:.3f}")""",
    ),
    (
        "md",
        """By VI, H is one more parameter: `LatentSDE(hurst=None)` learns H = sigmoid(`hurst_raw`)
together with the drift, σ and the control, starting from H = ½. Below, fractional OU
data with H = 0.3.

Which guide matters here. The paper's guide only shifts the drift of the Brownian
increments, ΔW̃ ~ N(u dt, dt). On the Euler grid (dt = 1/30) it cannot undo the noise of
the last step before an observation, and that noise is large against the observation sd of
0.05 on rough paths. The ELBO gap then grows as H falls, and the learned H drifts toward
smooth priors: the exact optimum of that family lies at H = 0.55 on these data
(`benchmarks/fbm.py`, `family_gaps`). `noise_scale=True` also learns a noise scale per
step, ΔW̃ ~ N(u dt, s² dt). That family's best gap is under 0.3 nats per path. The
exact-BM model (`hurst="bm"`) is the comparison on held-out paths.""",
    ),
    (
        "code",
        """data = simulate_fou(1, hurst=0.3, num_paths=64)
held = simulate_fou(2, hurst=0.3, num_paths=32)
ts, ys, ys_held = jnp.asarray(data["ts"]), jnp.asarray(data["ys"]), jnp.asarray(held["ys"])
chunks, per_chunk = (3, 30) if FAST else (15, 100)

fits = {}
models = [("MA-fBM, drift + scale", None, True)]
if not FAST:
    models += [("MA-fBM, drift only", None, False), ("BM, drift + scale", "bm", True)]
for label, hurst, noise_scale in models:
    sde = LatentSDE(
        dim=1, hurst=hurst, drift="ou", horizon=2.4, obs_sd=0.05, kl_gradient="expected",
        noise_scale=noise_scale,
    )
    svi = SVI(sde.model, sde.guide, optax.adam(1e-2))
    state, trail = None, []
    for _ in range(chunks):
        r = svi.run(jax.random.PRNGKey(0), per_chunk, ts, ys, init_state=state, progress_bar=False)
        state = r.state
        trail.append(sde.hurst_value(r.params))
    f = jax.jit(ppl.value_and_grad(ppl.objectives.elbo, sde.model, sde.guide))
    held_elbo = np.mean([float(f(state.params, jax.random.PRNGKey(i), ts, ys_held)[0]) / 32
                         for i in range(4)])
    fits[label] = (sde, r, trail, held_elbo)
    print(f"{label:22s} Ĥ = {trail[-1]:.3f}   held-out ELBO per path = {held_elbo:.2f}")

fig, ax = plt.subplots(figsize=(5, 2.8))
steps = per_chunk * np.arange(1, chunks + 1)
for label in fits:
    if not label.startswith("BM"):
        ax.plot(steps, fits[label][2], "o-", label=f"learned H ({label[8:]})")
ax.axhline(0.3, color="k", ls="--", label="true H")
ax.set(xlabel="Adam step", ylabel="H", ylim=(0, 1), title="Hurst index during training")
ax.legend(fontsize=8)""",
    ),
    (
        "md",
        """## 4. A mini-video: a blob on a fractional OU path

The headline model at small scale (the paper's `ball` data): 32×32 frames of a Gaussian blob
whose centre follows a 2-d fOU process, 20 frames 0.1 apart. `video_sde` is a `LatentSDE`
with a convolutional encoder (frames → context for the control and q(x₀)) and decoder
(latent state → frame), D = 2, K = 5, three Euler steps per frame.""",
    ),
    (
        "code",
        """n_clips, size = (8, 16) if FAST else (128, 32)  # fast mode: 16×16 frames
video = simulate_video(
    10, hurst=0.7, num_sequences=n_clips, num_frames=8 if FAST else 20, size=size,
    scale=size / 6.4,
)
fig, axes = plt.subplots(1, 8, figsize=(12, 1.8))
for i, ax in enumerate(axes):
    ax.imshow(video["ys"][0, i].reshape(size, size), cmap="gray", vmin=0, vmax=1)
    ax.set_title(f"t = {video['ts'][i]:.1f}", fontsize=8)
    ax.axis("off")
fig.suptitle("one training clip (H = 0.7)")""",
    ),
    (
        "code",
        """ts_v = jnp.asarray(video["ts"])
small = {"features": 8, "width": 16} if FAST else {}
vsde = video_sde(horizon=float(ts_v[-1]), size=size, kl_gradient="expected", **small)
rng = np.random.default_rng(0)
num_steps, batch = (3, 4) if FAST else (60, 16)  # benchmarks/fbm.py B3 trains 300
batches = [(ts_v, jnp.asarray(video["ys"][rng.choice(n_clips, batch, replace=False)]))
           for _ in range(num_steps)]
svi = SVI(vsde.model, vsde.guide, optax.adam(3e-3))
start = time.perf_counter()
res_v = svi.run(jax.random.PRNGKey(0), num_steps, batches=iter(batches))
print(f"{num_steps} steps in {time.perf_counter() - start:.0f} s; learned H = "
      f"{vsde.hurst_value(res_v.params):.3f} (true 0.7)")

clip = jnp.asarray(video["ys"][:1])
grid, xs = vsde.paths(res_v.params, jax.random.PRNGKey(1), ts_v, clip)
idx = np.round(np.asarray(ts_v) / vsde.dt).astype(int)
with numpyro.handlers.substitute(data=res_v.params):
    recon = np.asarray(vsde._decode(xs[idx, 0]))  # [T, size²]
fig, axes = plt.subplots(2, 8, figsize=(12, 3.4))
for i in range(8):
    axes[0, i].imshow(video["frames"][0, i].reshape(size, size), cmap="gray", vmin=0, vmax=1)
    axes[1, i].imshow(recon[i].reshape(size, size), cmap="gray", vmin=0, vmax=1)
    axes[0, i].axis("off")
    axes[1, i].axis("off")
axes[0, 0].set_title("clean frames", fontsize=8, loc="left")
axes[1, 0].set_title("decoded posterior path", fontsize=8, loc="left")""",
    ),
    (
        "md",
        """## Where to go next

* `ppl fit fbm-sde --out runs/fbm` fits the embedded fOU data set from the command line and
  writes `posterior.nc`, posterior paths, the learned H against the Kalman MLE, and a summary
  (`--noise-scale` for the guide with a learned noise scale).
* `benchmarks/fbm.py` prints the bridge table (ELBO gap and posterior-sd error for
  H ∈ {0.3, 0.5, 0.7}), Hurst recovery by VI against the BM model, the solver speed table
  (our Euler ELBO against diffrax Stratonovich–Milstein with a virtual Brownian tree) and the
  mini-video comparison.
* Every objective of `ppl.objectives` works on these models: try `ppl.objectives.iwelbo(8)`
  in place of the ELBO above.""",
    ),
]


CELLS_04 = [
    (
        "md",
        """# FunBaT: functional Bayesian Tucker decomposition with state-space GP factors

Continuous-indexed tensor data $y(x^1, \\dots, x^K)$ is modelled as a Tucker product of a core
$W$ and smooth factor functions of each mode's index, $y_n \\approx \\sum_r W_{r_1 \\dots r_K}
\\prod_k u^k_{r_k}(x^k_n)$, each $u^k_r$ a Matérn GP (Fang et al., ICLR 2024). A Matérn GP is
a linear SDE in disguise, so inference over the $n_k$ unique indexes of a mode costs $O(n_k)$
by Kalman smoothing inside conditional EP (CEP).

This tutorial: (1) the GP → state-space transformation and the Kalman smoother, checked
against dense GP algebra; (2) FunBaT on data with known factor functions; (3) predictions at
unseen indexes with error bars; (4) ArviZ.""",
    ),
    (
        "code",
        """import functools
import os

import arviz as az
import jax
import matplotlib.pyplot as plt
import numpy as np
import numpyro
from numpyro import handlers

from ppl.inference import funbat, kalman
from ppl.models import funbat as fm
from ppl.transforms.state_space import GaussianProcess, Matern, discretize, lti_sde, state_space

FAST = os.environ.get("PPL_FAST") == "1"  # the test suite runs this notebook in fast mode
ITERS = 20 if FAST else 150
print("fast mode" if FAST else "full mode", "| jax", jax.__version__, jax.devices())""",
    ),
    (
        "md",
        """## 1. A GP site, and the same site in state-space form

`GaussianProcess(kernel, index)` is an ordinary NumPyro distribution (dense covariance).
The program transformation `state_space(model)` swaps it for a `StateSpaceGP` with the
same density, computed by a Kalman filter on the sorted indexes.""",
    ),
    (
        "code",
        """def gp_model(t):
    numpyro.sample("f", GaussianProcess(Matern(1.5, 1.0, 1.0), t))


t = np.sort(np.random.default_rng(1).uniform(0, 10, 60))
with jax.enable_x64(True):
    f = handlers.seed(gp_model, 0)  # a draw from the prior
    value = handlers.trace(f).get_trace(t)["f"]["value"]
    dense = handlers.trace(f).get_trace(t)["f"]["fn"].log_prob(value)
    site = handlers.trace(handlers.seed(state_space(gp_model), 0)).get_trace(t)["f"]
    print(
        type(site["fn"]).__name__,
        "log p dense:",
        float(dense),
        "state space:",
        float(site["fn"].log_prob(value)),
    )""",
    ),
    (
        "md",
        """GP regression by RTS smoothing: the observations enter as information-form factors
$(\\Lambda, \\eta) = (1/\\sigma^2, y/\\sigma^2)$; `kalman.bridge` predicts between, before and
after the training indexes (exact conditioning on both neighbours, so no shrunken or negative
variances).""",
    ),
    (
        "code",
        """rng = np.random.default_rng(1)
t = np.sort(rng.uniform(0, 10, 300))
y = np.sin(t) + 0.5 * np.cos(2.3 * t) + 0.3 * rng.normal(size=300)
with jax.enable_x64(True):
    k = Matern(1.5, 1.0, 1.0)
    sde = lti_sde(k)
    A, Q = discretize(sde, t)
    ms, Ps, cross = kalman.smoother(A, Q, sde.H, np.full((300, 1, 1), 1 / 0.09), y[:, None] / 0.09)
    xs = np.linspace(-1.5, 11.5, 400)
    mean, cov = kalman.bridge(sde, t, ms, Ps, cross, xs)
    mean, cov = np.asarray(mean), np.asarray(cov)
    # the same posterior by dense GP regression (O(n³))
    Ky = np.asarray(k(t, t)) + 0.09 * np.eye(300)
    Ks = np.asarray(k(xs, t))
    dense_mean = Ks @ np.linalg.solve(Ky, y)
    prior_var = np.diag(np.asarray(k(xs, xs)))
    dense_var = prior_var - np.einsum("ij,ji->i", Ks, np.linalg.solve(Ky, Ks.T))
print(
    "max |Kalman - dense|: mean",
    np.abs(mean[:, 0] - dense_mean).max(),
    "variance",
    np.abs(cov[:, 0, 0] - dense_var).max(),
)
sd = np.sqrt(cov[:, 0, 0])
plt.figure(figsize=(8, 3))
plt.plot(t, y, ".", ms=3, color="0.6", label="data")
plt.plot(xs, mean[:, 0], label="posterior mean (bridge)")
plt.fill_between(xs, mean[:, 0] - 2 * sd, mean[:, 0] + 2 * sd, alpha=0.3, label="±2 sd")
plt.legend()
plt.xlabel("t")
plt.tight_layout()""",
    ),
    (
        "md",
        """## 2. FunBaT on data with known factors

`load_default("synthetic2")` is the spec's generator G(2, 0): two modes with 40 indexes each
in [0, 1], rank 2, factors $u^1 = (\\sin 2\\pi x, \\cos 2\\pi x)$,
$u^2 = (\\cos \\pi x, x \\sin 3\\pi x)$, 2000 noisy entries (sd 0.1) and 600 test entries, half
of them at an index never seen in training. The model is an ordinary NumPyro program; the
CEP driver reads kernels, grids, ranks and priors from its trace.""",
    ),
    (
        "code",
        """d = fm.load_default("synthetic2")
model = functools.partial(fm.model, ranks=2, kernels=Matern(0.5, 0.2, 1.0))
config = funbat.FunBaTConfig(num_iters=ITERS, tol=1e-5, damping=(0.5, 0.5, 0.0))
res = funbat.fit(jax.random.PRNGKey(0), model, d["train_indexes"], d["train_y"], config)
print(
    f"{res.n_iter} sweeps, converged: {res.converged}, "
    f"train RMSE {res.history['train_rmse'][-1]:.4f}, noise sd {res.history['noise_sd'][-1]:.4f}"
)
fig, ax = plt.subplots(1, 2, figsize=(9, 3))
ax[0].plot(res.history["train_rmse"])
ax[0].set_title("train RMSE per sweep")
ax[1].semilogy(res.history["max_delta"])
ax[1].set_title("max |Δ prediction| / sd(y)")
fig.tight_layout()""",
    ),
    (
        "md",
        """## 3. Predictions at seen and unseen indexes

`predict` bridges each mode's chain to the new indexes and returns the entry's predictive
mean and variance (including the core's uncertainty and the noise). The oracle is the
noise-free truth.""",
    ),
    (
        "code",
        """mean, var = funbat.predict(res, d["test_indexes"])
mean, var = np.asarray(mean), np.asarray(var)
err = mean - d["test_y"]
rmse = lambda e: float(np.sqrt(np.mean(e**2)))
oracle = d["test_f"] - d["test_y"]
unseen = d["test_unseen"]
print(
    f"test RMSE {rmse(err):.4f} (oracle {rmse(oracle):.4f}); "
    f"seen {rmse(err[~unseen]):.4f}, unseen {rmse(err[unseen]):.4f}"
)
print("95% interval coverage:", float(np.mean(np.abs(err) <= 1.96 * np.sqrt(var))))
fm.plot_factors(res, d);""",
    ),
    (
        "md",
        """The learned functions match the true ones up to an invertible map per mode (absorbed
by the core), so the dashed curves are the true factors after a least-squares alignment.

## 4. ArviZ

`to_inference_data` draws from the CEP posterior (factor functions on the grid, jointly along
each chain; W; τ), runs the model for the posterior predictive, and keeps the per-sweep
diagnostics in `sample_stats`.""",
    ),
    (
        "code",
        """num = 50 if FAST else 500
idata = funbat.to_inference_data(res, jax.random.PRNGKey(1), num_samples=num)
print(idata)
az.summary(idata, var_names=["W", "tau"])""",
    ),
    (
        "md",
        """**Where next.** `ppl fit funbat` runs section 2 from the command line (`--data
synthetic3`, `--nu`, `--rank`, `--restarts`) and writes `posterior.nc`, `factors.png` and a
summary; `benchmarks/funbat.py` prints the accuracy table against the spec's figures, CEP with
Kalman vs dense-GP updates, and smoother scaling (sequential vs associative scan).""",
    ),
]


CELLS_05 = [
    (
        "md",
        """# Sparse subspace variational inference (SSVI) for Bayesian neural networks

SSVI (Li, Miao, Qiu, Zhang, ICLR 2024) keeps a mean-field Gaussian posterior on an **active
set** of `s = density · d` weights per layer and exact zeros elsewhere, during training and
at prediction time. Training alternates Adam steps on the active (μ, ρ) with support
updates: the weights with the lowest signal-to-noise ratio of |θ| are removed and as many
are added where the loss gradient is largest, on a cosine schedule.

In `ppl` the pieces are: `ppl.sparse.SparseTensor` (gather + segment-sum layers),
`ppl.transforms.sparse_subspace` (the guide), `ppl.transforms.restrict_prior` (the prior
restricted to the active set), `ppl.transforms.update_support` (one pure removal/addition
step) and the driver `ppl.inference.SSVI`.""",
    ),
    (
        "code",
        """import os
from functools import partial

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax

from ppl.inference import SSVI, cosine_fraction, to_inference_data
from ppl.models import bnn
from ppl.sparse import SparseTensor, matmul, to_dense
from ppl.transforms import sparse_subspace

FAST = os.environ.get("PPL_FAST") == "1"  # the test suite runs this notebook in fast mode
print("fast mode" if FAST else "full mode", "| jax", jax.__version__, jax.devices())""",
    ),
    (
        "md",
        """## 1. Sparse weights: only the active entries are stored and touched

A `SparseTensor` holds sorted flat indices and the active values; `matmul` gathers the
inputs of the active rows, scales them and sums per output column (`O(batch · s)`).""",
    ),
    (
        "code",
        """w = SparseTensor(jnp.array([1, 4, 7]), jnp.array([2.0, -1.0, 0.5]), (3, 3))
x = jnp.array([[1.0, 2.0, 3.0]])
print(to_dense(w))
print(matmul(x, w), x @ to_dense(w))""",
    ),
    (
        "md",
        """## 2. Finding the support of a sparse linear regression

Twenty features, five of them used by the truth (spec T7). SSVI at density 5/20 starts from
a random support and swaps weights every 100 steps while the replaced fraction decays.""",
    ),
    (
        "code",
        """rng = np.random.default_rng(42)
X = rng.normal(size=(200, 20))
S = np.sort(rng.choice(20, 5, replace=False))
w_true = np.zeros(20)
w_true[S] = rng.normal(0, 2, 5)
y = X @ w_true + 0.5 * rng.normal(size=200)


def linreg(x, y=None):
    w = numpyro.sample("w", dist.Normal(0.0, 1.0).expand([x.shape[-1], 1]).to_event(2))
    with numpyro.plate("data", x.shape[0]):
        numpyro.sample("y", dist.Normal(matmul(x, w)[..., 0], 0.5), obs=y)


guide, init_state = sparse_subspace(linreg, 5 / 20, init_loc=(0.0, 0.1), init_scale=(0.1, 0.0))
ssvi = SSVI(linreg, guide, optax.adam(1e-2), every=50 if FAST else 100, alpha=0.3, t_end=0.75)
res = ssvi.run(jax.random.PRNGKey(0), 1000 if FAST else 5000, jnp.asarray(X), jnp.asarray(y))
print("true support   ", S)
print("learned support", np.asarray(res.state.idx["w"]))
print("posterior means", np.round(np.asarray(res.params["w_loc"]), 3))
print("updates:", [(h["step"], int(h["w"]["n_removed"])) for h in res.history][:8])""",
    ),
    (
        "md",
        """The result converts to ArviZ: the posterior holds only the `s` active values per site,
with the indices in `constant_data`.""",
    ),
    (
        "code",
        """idata = to_inference_data(res, num_samples=200, key=jax.random.PRNGKey(1))
print(idata.posterior["w"].dims, idata.posterior["w"].shape)
print(idata.constant_data["w_idx"].values)""",
    ),
    (
        "md",
        """## 3. A Bayesian MLP on digits: dense mean-field VI against SSVI

Both runs use the same model (`ppl.models.bnn.mlp`), tempered ELBO (β = 0.1), Adam and
minibatches of 128; the checkpoint is selected on a validation split. Density 1 is plain
dense mean-field VI with dense matrix products.""",
    ),
    (
        "code",
        """data = bnn.load_digits()
widths = (32,) if FAST else (256, 256)
steps = 100 if FAST else 1500
draws = 8 if FAST else 32
model = partial(bnn.mlp, widths=widths, kl_weight=0.1)
runs = {}
for density in (1.0, 0.1):
    fit, best = bnn.fit(model, data, density=density, steps=steps, lr=3e-3, every=50)
    idata = fit.to_inference_data(
        key=jax.random.PRNGKey(2), num_samples=draws, args=(data["x_test"], data["y_test"])
    )
    probs = bnn.predictive_probs(idata)
    rot = fit.to_inference_data(key=jax.random.PRNGKey(3), num_samples=draws, args=(data["x_rot"],))
    ood = bnn.metrics(bnn.predictive_probs(rot), np.zeros(len(data["x_rot"]), int))["entropy"]
    runs[density] = (fit, probs, bnn.metrics(probs, data["y_test"]), ood)

print("density | stored params | test acc | NLL | top-label ECE | entropy (rotated digits)")
for density, (fit, _probs, m, ood) in runs.items():
    n = sum(int(np.size(v)) for v in fit.params.values())
    acc, nll, ece = m["accuracy"], m["nll"], m["ece"]
    print(f"{density:7g} | {n:13d} | {acc:.4f} | {nll:.4f} | {ece:.4f} | {ood:.3f}")""",
    ),
    (
        "code",
        """fit, probs, m, _ = runs[0.1]
fig = bnn.plot(fit.history, probs, data["y_test"], title="SSVI, density 0.1")
plt.show()""",
    ),
    (
        "md",
        """The replaced fraction follows `cosine_fraction(t, t_end, alpha)`; the density stays
fixed by construction. `ppl fit ssvi-bnn --density 0.1` runs the same from the command
line, and `benchmarks/ssvi.py` compares densities 0.5, 0.2, 0.1 and 0.05 against dense VI
for the MLP and a small CNN (accuracy, NLL, ECE, time per epoch, memory, parameters).""",
    ),
    (
        "code",
        """t = np.arange(0, 3000)
plt.figure(figsize=(5, 2.5))
plt.plot(t, cosine_fraction(t, 2250, 0.3))
plt.xlabel("step")
plt.ylabel("replaced fraction")
plt.show()""",
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


#: ``{notebook file: cells}``: one tutorial per family (+ the tour of the core).
NOTEBOOKS = {
    "01_programmable_vi.ipynb": CELLS_01,
    "02_fbm_sde.ipynb": CELLS_02,
    "03_nngp.ipynb": CELLS_03,
    "04_funbat.ipynb": CELLS_04,
    "05_ssvi.ipynb": CELLS_05,
    "06_krosbl.ipynb": CELLS_06,
}


def _ruff_formatted(nb, path):
    """``nb`` after ``ruff format`` and ``ruff check --fix`` (when ruff is installed), so the
    committed notebooks are lint-clean whatever the layout of the cells above."""
    import shutil
    import subprocess
    import tempfile

    ruff = shutil.which("ruff") or str(pathlib.Path(sys.executable).with_name("ruff"))
    if not pathlib.Path(ruff).exists():
        return nb
    with tempfile.TemporaryDirectory() as tmp:
        scratch = pathlib.Path(tmp) / path.name
        nbformat.write(nb, scratch)
        cfg = ["--config", str(HERE.parent / "pyproject.toml")]
        subprocess.run([ruff, "format", *cfg, str(scratch)], check=False, capture_output=True)
        subprocess.run([ruff, "check", "--fix", *cfg, str(scratch)], check=False,
                       capture_output=True)  # fmt: skip
        return nbformat.read(scratch, as_version=4)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--execute", action="store_true", help="execute and store outputs")
    parser.add_argument("--only", choices=sorted(NOTEBOOKS), help="build this notebook only")
    args = parser.parse_args(argv)
    for name, cells in NOTEBOOKS.items():
        if args.only and name != args.only:
            continue
        path = HERE / name
        nb = _ruff_formatted(build(cells), path)
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
