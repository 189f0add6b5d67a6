"""FunBaT CEP and KroSBL EM either use every site of the user's model or refuse it.

CEP (:func:`ppl.inference.funbat.fit`) and EM (:func:`ppl.inference.sbl.fit_model`) update
a fixed set of sites; a model with more (an offset, another likelihood) must not come back
with those sites silently left at their prior.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.distributions import constraints

from ppl.inference import funbat, sbl
from ppl.models import funbat as fm
from ppl.models.krosbl import generate_synthetic, krosbl_model, nmse
from ppl.transforms.kronecker import KronOperator, kron_vector
from ppl.transforms.state_space import GaussianProcess, Matern

KERNEL = Matern(0.5, 0.2, 1.0)


def _funbat_data(n=200):
    d = fm.load_default("synthetic2")
    return d["train_indexes"][:n], d["train_y"][:n]


def _tucker_with(indexes, y=None, *, offset=None, lik="normal", jitter=0.0):
    """``fm.model`` (ranks 2) written out, plus an optional extra site."""
    idx = np.asarray(indexes)
    us = []
    for k in range(idx.shape[1]):
        grid, pos = np.unique(idx[:, k], return_inverse=True)
        with numpyro.plate(f"rank_{k}", 2):
            u = numpyro.sample(f"u_{k}", GaussianProcess(KERNEL, grid, jitter=jitter))
        us.append(u[:, pos].T)
    W = numpyro.sample("W", dist.Normal(0.0, 1.0).expand((2, 2)).to_event(2))
    tau = numpyro.sample("tau", dist.Gamma(1.0, 1.0))
    mean = fm.tucker_mean(W, us)
    if offset == "latent":
        mean = mean + numpyro.sample("b", dist.Normal(0.0, 3.0))
    elif offset == "fixed":
        mean = mean + 2.0
    with numpyro.plate("data", idx.shape[0]):
        if lik == "normal":
            numpyro.sample("y", dist.Normal(mean, 1.0 / jnp.sqrt(tau)), obs=y)
        else:
            numpyro.sample("y", dist.StudentT(3.0, mean, 1.0 / jnp.sqrt(tau)), obs=y)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"offset": "latent"}, r"\['b'\].*state_space\(model\)"),
        ({"offset": "fixed"}, r"mean of site 'y' is not the Tucker mean"),
        ({"lik": "student"}, r"StudentT likelihood.*NUTS"),
        ({"jitter": 1e-3}, r"'u_0' is a GaussianProcess with jitter.*state_space\(model\)"),
    ],
)
def test_funbat_cep_refuses_sites_it_cannot_update(kwargs, match):
    idx, y = _funbat_data()
    model = functools.partial(_tucker_with, **kwargs)
    with pytest.raises(ValueError, match=match):
        funbat.fit(jax.random.PRNGKey(0), model, idx, y, funbat.FunBaTConfig(num_iters=2))


def test_funbat_cep_plain_model_still_fits():
    """The same program without the extra site fits, and agrees with ``fm.model``."""
    idx, y = _funbat_data()
    cfg = funbat.FunBaTConfig(num_iters=20)
    key = jax.random.PRNGKey(0)
    mine = funbat.fit(key, _tucker_with, idx, y, cfg)
    ref = funbat.fit(key, functools.partial(fm.model, ranks=2, kernels=KERNEL), idx, y, cfg)
    np.testing.assert_allclose(mine.state.pred, ref.state.pred, rtol=1e-8, atol=1e-10)
    # a real fit: train RMSE near the noise sd 0.1 (sd(y) ≈ 0.36)
    assert float(mine.history["train_rmse"][-1]) < 0.15


# ------------------------------------------------------------------------ KroSBL EM


def _sbl_with(y=None, *, factors, noise_var=None, offset=None, lik="normal", extra=None):
    """KroSBL written out by hand (γ_i params, ``x ~ N(0, √γ)``), plus optional extras."""
    op = KronOperator(factors)
    gs = [
        numpyro.param(f"gamma_{i + 1}", np.ones(n), constraint=constraints.positive)
        for i, n in enumerate(op.in_shape)
    ]
    x = numpyro.sample("x", dist.Normal(0.0, jnp.sqrt(kron_vector(gs))).to_event(1))
    if noise_var is None:
        noise_var = numpyro.param("noise_var", 1.0, constraint=constraints.positive)
    mean = op.matvec(x)
    if offset == "latent":
        mean = mean + numpyro.sample("b", dist.Normal(0.0, 10.0))
    elif offset == "fixed":
        mean = mean + 1.0
    scale = jnp.sqrt(noise_var)
    if extra == "noise_scale":
        scale = scale * numpyro.sample("s", dist.HalfNormal(1.0))
    if lik == "normal":
        lik = dist.Normal(mean, scale)
    else:
        lik = dist.StudentT(4.0, mean, scale)
    numpyro.sample("y", lik.to_event(1), obs=y, infer={"kron_operator": op})


@pytest.mark.parametrize(
    "model, kwargs, match",
    [
        (_sbl_with, {"lik": "student"}, r"site 'y' has a StudentT likelihood.*NUTS"),
        (_sbl_with, {"extra": "noise_scale"}, r"sites EM cannot update: \['s'\].*SVI"),
        (_sbl_with, {"offset": "fixed"}, r"mean of site 'y' is not Φx"),
        (krosbl_model, {"hyperprior": dist.InverseGamma(1.0, 1.0)}, r"'gamma_1'.*hyperprior"),
    ],
)
def test_sbl_em_refuses_what_it_cannot_fit(model, kwargs, match):
    d = generate_synthetic(0, ns=(4, 5), ms=(3, 4), k=2, snr_db=20)
    kwargs = {"factors": d["factors"], "noise_var": d["noise_var"], **kwargs}
    with pytest.raises(ValueError, match=match):
        sbl.fit_model(model, d["y"], model_kwargs=kwargs, max_iter=2)


def test_sbl_em_plain_model_unchanged():
    """Without extras, ``fit_model`` is :func:`sbl.fit` on the model's dictionary."""
    d = generate_synthetic(0, ns=(6, 6), ms=(5, 5), k=2, snr_db=20)
    kw = {"factors": d["factors"], "noise_var": d["noise_var"]}
    for model in (krosbl_model, _sbl_with):
        res = sbl.fit_model(model, d["y"], model_kwargs=kw, max_iter=20)
        ref = sbl.fit(d["factors"], d["y"], noise_var=d["noise_var"], max_iter=20)
        np.testing.assert_allclose(res.mean, ref.mean, rtol=1e-12, atol=1e-14)
        assert res.offset_mean is None


def test_sbl_em_recovers_offset():
    """``y = Φx + 1.5 + n`` (M = 100, N = 144, 9 non-zeros, 20 dB, known σ²): the offset is
    integrated out exactly; its estimate is within 0.05 of 1.5 (posterior sd ≈ 0.02) and x's
    NMSE is below 0.02, against > 1 when EM ignores the offset."""
    d = generate_synthetic(0, ns=(12, 12), ms=(10, 10), k=3, snr_db=20)
    y = d["y"] + 1.5
    kw = {"factors": d["factors"], "noise_var": d["noise_var"], "offset": "latent"}
    res = sbl.fit_model(_sbl_with, y, model_kwargs=kw)
    ignored = sbl.fit(d["factors"], y, noise_var=d["noise_var"])
    assert abs(res.offset_mean - 1.5) < 0.05
    assert 0 < res.offset_var < 0.05**2
    assert nmse(res.mean, d["x"]) < 0.02
    assert nmse(ignored.mean, d["x"]) > 1.0
    post = res.to_inference_data().posterior
    assert float(post["b"].values.squeeze()) == pytest.approx(res.offset_mean)


def test_sbl_em_learns_noise_variance_with_offset():
    """σ² learned by the EM update (no ``noise_var`` keyword) on ``y = Φx + 1.5 + n``
    (M = 256, 15 dB): within 30% of the true σ² (seed 0 gives 0.85×; EM's estimate is
    biased low by the fitted coefficients) though it starts at 0.1·var(y) ≈ 3σ²."""
    d = generate_synthetic(0, ns=(16, 16), ms=(16, 16), k=3, snr_db=15)
    y = d["y"] + 1.5
    kw = {"factors": d["factors"], "offset": "latent"}
    res = sbl.fit_model(_sbl_with, y, model_kwargs=kw)
    assert 0.1 * np.var(y) > 2.5 * d["noise_var"]
    assert 0.7 < res.noise_var / d["noise_var"] < 1.3
    assert abs(res.offset_mean - 1.5) < 0.1


def test_sbl_offset_prior_bad_input():
    d = generate_synthetic(0, ns=(4, 5), ms=(3, 4), k=2, snr_db=20)
    with pytest.raises(ValueError, match="offset_prior must be"):
        sbl.fit(d["factors"], d["y"], offset_prior=(0.0, -1.0))
    with pytest.raises(TypeError, match="offset_prior must be a pair"):
        sbl.fit(d["factors"], d["y"], offset_prior=1.0)
    with pytest.raises(ValueError, match=r"real observations y \[M\]"):
        sbl.fit(d["factors"], np.stack([d["y"], d["y"]]), offset_prior=(0.0, 1.0))
