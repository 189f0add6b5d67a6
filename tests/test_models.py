"""ppl.models: the registry, the embedded data and the VAE / eight-schools programs."""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro import handlers

import ppl.models
from ppl.models import ModelSpec, Problem, registry, vae
from ppl.models import eight_schools as es

# ------------------------------------------------------------------------------ registry


def test_families_register_and_load():
    assert ppl.models.failed() == {} or set(ppl.models.failed()).isdisjoint(
        {"vae", "eight_schools"}
    )
    names = ppl.models.available()
    assert names[:2] == ["vae", "eight-schools"]
    spec = ppl.models.get("vae")
    assert isinstance(spec, ModelSpec) and spec.inference == ("svi",)
    assert ppl.models.get("eight-schools").uses("nuts")
    assert ppl.models.vae is vae  # lazy attribute access to a family module


def test_get_unknown_names_choices():
    with pytest.raises(KeyError, match="available: .*vae"):
        ppl.models.get("no-such-model")


def _build(opts):
    return Problem(model=lambda: None)


def test_register_validates_and_rejects_duplicates():
    spec = ModelSpec(name="tmp-model", description="temporary", build=_build)
    try:
        ppl.models.register(spec)
        assert "tmp-model" in ppl.models.available()
        ppl.models.register(spec)  # the same module re-registering is harmless
        other = ModelSpec(name="tmp-model", description="x", build=lambda o: None)
        with pytest.raises(ValueError, match="already registered"):
            ppl.models.register(other)
        ppl.models.register(other, replace=True)
    finally:
        ppl.models.unregister("tmp-model")
    assert "tmp-model" not in ppl.models.available()
    with pytest.raises(TypeError):
        ppl.models.register("vae")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"name": "a b"}, "name"),
        ({"description": "two\nlines"}, "one line"),
        ({"inference": ("em",)}, "neither built in"),
        ({"objectives": ("nope",)}, "unknown objective"),
        ({"objectives": ("iwelbo",)}, "default_objective"),
        ({"default_steps": 0}, "default_steps"),
        ({"default_lr": 0.0}, "default_lr"),
    ],
)
def test_modelspec_rejects_bad_fields(kwargs, match):
    base = {"name": "m", "description": "d", "build": _build}
    with pytest.raises(ValueError, match=match):
        ModelSpec(**{**base, **kwargs})


def test_custom_driver_and_inference_names():
    def em(spec, problem, opts, key):
        raise NotImplementedError

    spec = ModelSpec(
        name="m", description="d", build=_build, inference=("em", "svi"), drivers={"em": em}
    )
    assert spec.driver("em") is em
    assert spec.driver("svi") is registry.fit_svi
    with pytest.raises(ValueError, match="does not support"):
        spec.driver("nuts")


def test_objective_table():
    opts = argparse.Namespace(particles=3, alpha=0.5)
    assert set(ppl.models.OBJECTIVES) >= {"elbo", "iwelbo", "renyi", "rws"}
    one = argparse.Namespace(particles=1, alpha=0.5)
    assert ppl.models.make_objective("elbo", one) is ppl.objectives.elbo
    for name in ("elbo", "iwelbo", "renyi"):
        assert callable(ppl.models.make_objective(name, opts))
    rws = ppl.models.make_objective("rws", opts)
    assert set(rws) == {"model", "guide"}
    with pytest.raises(ValueError, match="unknown objective"):
        ppl.models.make_objective("nope", opts)


def test_elbo_with_particles_matches_elbo_in_expectation():
    def model():
        numpyro.sample("z", dist.Normal(0.0, 1.0))

    def guide():
        numpyro.sample("z", dist.Normal(0.5, 0.8))

    exact = -(0.5**2 + 0.8**2) / 2 + 0.5 + np.log(0.8)  # E_q log p − log q (up to consts)
    f1 = ppl.value_and_grad(ppl.objectives.elbo, model, guide)
    fk = ppl.value_and_grad(
        ppl.models.make_objective("elbo", argparse.Namespace(particles=64, alpha=0.5)),
        model,
        guide,
    )
    keys = jax.random.split(jax.random.PRNGKey(0), 64)
    v1 = float(jnp.mean(jax.jit(jax.vmap(lambda k: f1({}, k)[0]))(keys)))
    vk = float(jax.jit(fk)({}, keys[0])[0])
    assert abs(vk - exact) < 0.2 and abs(v1 - exact) < 0.2


# ----------------------------------------------------------------------------- VAE data


def test_digits_shapes_binarised_and_split():
    train = vae.load_digits_binarised("train")
    test = vae.load_digits_binarised("test")
    assert train.shape == (1500, 64) and test.shape == (297, 64)
    assert train.dtype == np.float32 and test.dtype == np.float32
    assert set(np.unique(train)) == {0.0, 1.0}
    from sklearn.datasets import load_digits

    raw = load_digits().data
    perm = np.random.default_rng(0).permutation(1797)
    np.testing.assert_array_equal(train, (raw[perm[:1500]] > 7).astype(np.float32))
    np.testing.assert_array_equal(test, (raw[perm[1500:]] > 7).astype(np.float32))
    all_ = vae.load_digits_binarised("all")
    assert all_.shape == (1797, 64)
    # deterministic and independent of callers mutating a returned copy
    train[:] = 7
    np.testing.assert_array_equal(vae.load_digits_binarised("train"), all_[:1500])
    with pytest.raises(ValueError, match="split"):
        vae.load_digits_binarised("valid")


def test_init_params_deterministic_glorot():
    p, q = vae.init_params(), vae.init_params()
    assert set(p) == set(vae.ENCODER_PARAMS) | set(vae.DECODER_PARAMS)
    for k in p:
        np.testing.assert_array_equal(p[k], q[k])
    assert p["enc_w1"].shape == (64, 128) and p["dec_w2"].shape == (128, 64)
    limit = np.sqrt(6 / (64 + 128))
    assert np.abs(p["enc_w1"]).max() <= limit and p["enc_w1"].std() > limit / 3
    assert not np.array_equal(vae.init_params(seed=1)["enc_w1"], p["enc_w1"])


def test_encoder_decoder_shapes():
    p = vae.init_params()
    x = jnp.asarray(vae.load_digits_binarised("test")[:5])
    loc, scale = vae.encoder(p, x)
    assert loc.shape == scale.shape == (5, 8) and bool(jnp.all(scale > 0))
    logits = vae.decoder(p, loc)
    assert logits.shape == (5, 64)
    assert float(logits.min()) < 0 < float(logits.max())  # logits, not probabilities


# ------------------------------------------------------------------------ VAE programs


def _trace(fn, *args, **kwargs):
    return handlers.trace(handlers.seed(fn, jax.random.PRNGKey(1))).get_trace(*args, **kwargs)


def test_vae_model_and_guide_traces():
    x = jnp.asarray(vae.load_digits_binarised("train"))
    for batch, n in ((None, 1500), (32, 32)):
        mt = _trace(vae.vae_model, x, batch)
        gt = _trace(vae.vae_guide, x, batch)
        assert mt["z"]["value"].shape == (n, 8) and gt["z"]["value"].shape == (n, 8)
        assert mt["x"]["is_observed"] and mt["x"]["value"].shape == (n, 64)
        assert mt["x"]["fn"].event_shape == (64,) and mt["z"]["fn"].event_shape == (8,)
        assert isinstance(mt["x"]["fn"].base_dist, dist.BernoulliLogits)
        assert mt["data"]["args"][0] == 1500 and mt["data"]["value"].shape == (n,)
        params_m = {k for k, s in mt.items() if s["type"] == "param"}
        params_g = {k for k, s in gt.items() if s["type"] == "param"}
        assert params_m == set(vae.DECODER_PARAMS) and params_g == set(vae.ENCODER_PARAMS)
    # the observed minibatch is the rows the plate subsampled
    idx = mt["data"]["value"]
    np.testing.assert_array_equal(mt["x"]["value"], x[idx])


def test_vae_model_log_density_matches_hand_written():
    x = jnp.asarray(vae.load_digits_binarised("test")[:10])
    p = vae.init_params()
    gt = _trace(vae.vae_guide, x)
    z = gt["z"]["value"]
    model = handlers.substitute(handlers.condition(vae.vae_model, {"z": z}), p)
    log_joint, _ = numpyro.infer.util.log_density(model, (x,), {}, {})
    logits = vae.decoder(p, z)
    expected = dist.Normal(0, 1).log_prob(z).sum() + dist.Bernoulli(logits=logits).log_prob(x).sum()
    np.testing.assert_allclose(log_joint, expected, rtol=1e-5)


def test_vae_options_change_sizes():
    x = jnp.asarray(vae.load_digits_binarised("test"))
    mt = _trace(vae.vae_model, x, 4, latent_dim=3, hidden_dim=16)
    assert mt["z"]["value"].shape == (4, 3) and mt["dec_w1"]["value"].shape == (3, 16)


# ------------------------------------------------------------------------ eight schools


def test_eight_schools_data_and_trace():
    d = es.load_data()
    np.testing.assert_array_equal(d["y"], [28, 8, -3, 7, -1, 1, 18, 12])
    np.testing.assert_array_equal(d["sigma"], [15, 10, 16, 11, 9, 11, 10, 18])
    sigma, y = jnp.asarray(d["sigma"]), jnp.asarray(d["y"])
    mt = _trace(es.eight_schools, sigma, y=y)
    gt = _trace(es.eight_schools_guide, sigma, y=y)
    assert mt["theta_tilde"]["value"].shape == (8,) and mt["theta"]["value"].shape == (8,)
    assert mt["school"]["type"] == "plate"
    assert mt["y"]["is_observed"]
    latents = {k for k, s in mt.items() if s["type"] == "sample" and not s["is_observed"]}
    assert latents == {k for k, s in gt.items() if s["type"] == "sample"}
    assert float(gt["tau"]["value"]) > 0
    np.testing.assert_allclose(
        mt["theta"]["value"],
        mt["mu"]["value"] + mt["tau"]["value"] * mt["theta_tilde"]["value"],
        rtol=1e-6,
    )
