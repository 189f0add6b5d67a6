"""ppl.models.nngp: the regression/classification programs, the data, and ``ppl fit nngp``.

Targets are the spec's (``nngp.md`` §4 T3, §5 B1), computed there independently in float64.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.infer.util import log_density

from ppl.models import nngp
from ppl.transforms.nngp import marginalize_scale

# T3 data (spec §4): ReLU depth 2, σ_w² = 2, σ_b² = 0.1, τ² = 0.01
T3_BETA = 130.894281
T3_LOGDET = -19.072440
T3_EVIDENCE_IG22 = -16.9095675
T3_MEAN_SCALE_IG22 = 13.4894281


def _t3():
    x = np.linspace(-2.0, 2.0, 8)[:, None]
    y = np.sin(2 * x[:, 0]) + 0.1 * (-1.0) ** np.arange(8)
    return x, y, nngp.make_net(2, "relu", 2.0, 0.1)


def _loglik(scale, n=8):
    """ℓ(σ²) of spec §1.4 from the spec's β and ln|C|."""
    return -0.5 * (n * math.log(2 * math.pi) + n * math.log(scale) + T3_LOGDET + T3_BETA / scale)


# ------------------------------------------------------------------------- regression


def test_regression_log_density_is_the_closed_form_at_a_scale():
    x, y, net = _t3()
    with jax.enable_x64(True):
        lp, tr = log_density(nngp.regression, (x, y), {"net": net, "noise": 0.01}, {"scale": 3.0})
        prior = float(dist.InverseGamma(2.0, 2.0).log_prob(3.0))
        assert float(lp) == pytest.approx(prior + _loglik(3.0), abs=1e-6)
        assert np.shape(tr["scale"]["value"]) == () and tr["y"]["value"].shape == (8,)
        # a point mass is the plain NNGP: an observed scale, the log-likelihood only
        lp0, tr0 = log_density(
            nngp.regression, (x, y), {"net": net, "noise": 0.01, "scale_prior": dist.Delta(3.0)}, {}
        )
        assert tr0["scale"]["is_observed"]
        assert float(lp0) == pytest.approx(_loglik(3.0), abs=1e-6)


def test_regression_unscaled_noise_and_latent_sites():
    from scipy.stats import multivariate_normal

    from ppl.transforms.nngp import kernel_fn, unit_scale

    x, y, net = _t3()
    with jax.enable_x64(True):
        kw = {"net": net, "noise": 0.01, "noise_scaled": False}
        lp, _ = log_density(nngp.regression, (x, y), kw, {"scale": 3.0})
        K = np.asarray(kernel_fn(unit_scale(net))(jnp.asarray(x)))
        want = multivariate_normal(np.zeros(8), 3.0 * K + 0.01 * np.eye(8)).logpdf(y)
        want += float(dist.InverseGamma(2.0, 2.0).log_prob(3.0))
        assert float(lp) == pytest.approx(want, abs=1e-6)
        tr = numpyro.handlers.trace(numpyro.handlers.seed(nngp.regression, 0)).get_trace(
            x, np.stack([y, -y], 1), net=net, latent=True
        )
        assert tr["f"]["value"].shape == (2, 8) and tr["y"]["value"].shape == (2, 8)  # [k, n]
        assert numpyro.handlers.seed(nngp.regression, 1)(x, net=net).shape == (8,)


@pytest.mark.parametrize("latent", [False, True])
def test_marginalize_scale_gives_the_student_t_evidence(latent):
    x, y, net = _t3()
    with jax.enable_x64(True):
        tp = marginalize_scale(nngp.regression, site="scale")
        kw = {"net": net, "noise": 0.01, "latent": latent}
        lp, tr = log_density(tp, (x, y), kw, {})
        assert float(lp) == pytest.approx(T3_EVIDENCE_IG22, abs=1e-6)
        assert isinstance(tr["y"]["fn"], dist.MultivariateStudentT)


def test_marginalize_scale_two_outputs_match_the_general_fit():
    from ppl.inference import nngp as inf

    x, y, net = _t3()
    y2 = np.stack([y, np.cos(x[:, 0])], 1)
    prior = dist.InverseGamma(1.0, 1.0)
    with jax.enable_x64(True):
        tp = marginalize_scale(nngp.regression)
        lp, _ = log_density(tp, (x, y2), {"net": net, "noise": 0.01, "scale_prior": prior}, {})
    post = inf.fit(net, x, y2, prior=prior, noise=0.01, method="closed")
    assert float(lp) == pytest.approx(float(post.log_evidence), abs=1e-6)


def test_marginalize_scale_rejects_non_conjugate_models():
    x, y, net = _t3()
    with jax.enable_x64(True), pytest.raises(ValueError, match="not proportional"):
        marginalize_scale(nngp.regression)(x, y, net=net, noise=0.01, noise_scaled=False)
    with jax.enable_x64(True), pytest.raises(ValueError, match="not InverseGamma"):
        prior = dist.LogNormal(0.0, 1.0)
        marginalize_scale(nngp.regression)(x, y, net=net, noise=0.01, scale_prior=prior)


def test_nuts_on_the_scale_matches_the_closed_form_mean():
    from numpyro.infer import MCMC, NUTS

    x, y, net = _t3()
    with jax.enable_x64(True):
        mcmc = MCMC(NUTS(nngp.regression), num_warmup=300, num_samples=1000, progress_bar=False)
        mcmc.run(jax.random.PRNGKey(0), x, y, net=net, noise=0.01)
        s = np.asarray(mcmc.get_samples()["scale"])
    ess = float(numpyro.diagnostics.effective_sample_size(s[None]))
    # σ² | y ~ IG(6, 2 + β/2): sd = mean / 2
    se = (T3_MEAN_SCALE_IG22 / 2) / math.sqrt(ess)
    assert abs(s.mean() - T3_MEAN_SCALE_IG22) < 4 * se


def test_student_t_predict_is_the_inference_one():
    from ppl.inference import nngp as inf

    x, y, net = _t3()
    from ppl.transforms.nngp import kernel_fn, unit_scale

    k = kernel_fn(unit_scale(net))
    xs = np.array([[-3.0], [0.3]])
    got = nngp.student_t_predict(k, x, y, xs, 2.0, 2.0, 0.01)
    want = inf.student_t_predict(k, x, y, xs, 2.0, 2.0, 0.01)
    assert got[0] == want[0] == 12.0
    np.testing.assert_allclose(got[1], want[1])
    np.testing.assert_allclose(got[2], want[2])


@pytest.mark.parametrize(
    "change, error, match",
    [
        ({"y": np.zeros(7)}, ValueError, "y must be"),
        ({"y": np.zeros((8, 2, 1))}, ValueError, "y must be"),
        ({"x": np.full((8, 1), np.nan)}, ValueError, "NaN"),
        ({"y": np.full(8, np.inf)}, ValueError, "NaN"),
        ({"x": np.zeros(8)}, ValueError, r"\[n, d\]"),
        ({"noise": 0.0}, ValueError, "noise"),
        ({"noise": -1.0}, ValueError, "noise"),
        ({"noise": float("nan")}, ValueError, "noise"),
        ({"scale_prior": 2.0}, TypeError, "Distribution"),
        ({"scale_prior": dist.InverseGamma(jnp.ones(2), 1.0)}, ValueError, "scalar"),
    ],
)
def test_regression_bad_input(change, error, match):
    x, y, net = _t3()
    kw = {"x": x, "y": y, "net": net, "noise": 0.01, **change}
    with pytest.raises(error, match=match):
        numpyro.handlers.seed(nngp.regression, 0)(kw.pop("x"), kw.pop("y"), **kw)


# ------------------------------------------------------------------------------- data


def test_load_default_variants():
    clean = nngp.load_default("clean")
    assert clean["x_train"].shape == (353, 10) and clean["x_test"].shape == (89, 10)
    x_all = np.concatenate([clean["x_train"], clean["x_test"]])
    np.testing.assert_allclose(x_all.mean(0), 0.0, atol=1e-12)  # standardised before the split
    out = nngp.load_default("outliers")
    np.testing.assert_array_equal(out["x_train"], clean["x_train"])
    np.testing.assert_array_equal(out["y_test"], clean["y_test"])
    moved = np.flatnonzero(out["y_train"] != clean["y_train"])
    np.testing.assert_array_equal(moved, out["outliers"])
    shift = np.abs(out["y_train"] - clean["y_train"])[moved]
    assert len(moved) == 18 and shift.min() >= 4 and shift.max() <= 8
    ood = nngp.load_default("ood")
    bmi = ood["feature_names"].index("bmi")
    assert ood["x_train"].shape == (354, 10) and ood["x_test"].shape == (88, 10)
    assert ood["x_train"][:, bmi].max() < ood["x_test"][:, bmi].min()
    both = nngp.load_default()  # the command's default
    assert both["variant"] == "outliers-ood" and len(both["outliers"]) == 18
    np.testing.assert_array_equal(both["x_test"], ood["x_test"])
    assert np.sum(both["y_train"] != ood["y_train"]) == 18
    syn = nngp.load_default("outliers", source="synthetic")
    assert syn["x_train"].shape == (100, 1) and len(syn["outliers"]) == 5
    with pytest.raises(ValueError, match="variant"):
        nngp.load_default("noisy")


# (RMSE, NNGP NLL, TP IG(2,2) NLL, Burr(2,2) NLL), spec §5 B1 [NUM]
B1 = {
    "clean": (0.7497, 1.1309, 1.1306, 1.1315),
    "outliers": (0.9650, 1.5726, 1.5699, 1.5660),
    "ood": (0.8063, 1.2317, 1.2319, 1.2322),
}


@pytest.mark.parametrize(
    "variant", ["clean", "outliers", pytest.param("ood", marks=pytest.mark.slow)]
)
def test_b1_diabetes_numbers(variant):
    res = nngp.compare(nngp.load_default(variant), net=nngp.make_net(), noise=0.1)
    rmse, *nlls = B1[variant]
    for name, want in zip(("nngp", "ig", "burr"), nlls, strict=True):
        assert res[name]["rmse"] == pytest.approx(rmse, abs=1e-3)
        assert res[name]["nll"] == pytest.approx(want, abs=1e-3), name
    assert res["ig"]["method"] == "closed" and res["burr"]["method"] == "gh"


def test_load_digits_split():
    d = nngp.load_digits_split()
    assert d["x_train"].shape == (1438, 64) and d["x_test"].shape == (359, 64)
    assert d["x_train"].max() <= 1 and d["num_classes"] == 10
    ood = nngp.load_digits_split("ood", images=True)
    assert ood["x_train"].shape[1:] == (8, 8, 1)
    assert not np.isin(ood["y_train"], (1, 4, 8)).any()
    np.testing.assert_array_equal(ood["ood_mask"], np.isin(ood["y_test"], (1, 4, 8)))
    noisy = nngp.load_digits_split("noise")
    changed = np.mean(noisy["x_test"] != d["x_test"])
    assert 0.03 < changed < 0.1
    np.testing.assert_array_equal(noisy["x_train"], d["x_train"])


# --------------------------------------------------------------------- classification


def _digits_small(n=300, m=20):
    d = nngp.load_digits_split()
    return d, jnp.asarray(d["x_train"][:n]), jnp.asarray(d["y_train"][:n]), m


def test_classification_sites_and_svgp_baseline():
    d, x, y, m = _digits_small(40, 6)
    kw = dict(net=nngp.make_net(1), num_classes=10, inducing=x[:m], batch_size=16)
    prior = dist.InverseGamma(2.0, 2.0)

    @jax.jit  # one compilation instead of op-by-op dispatch
    def run(x, y, z):
        kw["inducing"] = z
        seeded = numpyro.handlers.seed(nngp.classification_guide, 0)
        g = numpyro.handlers.trace(seeded).get_trace(x, y, scale_prior=prior, **kw)
        model = numpyro.handlers.replay(nngp.classification, g)
        tr = numpyro.handlers.trace(numpyro.handlers.seed(model, 1)).get_trace(
            x, y, scale_prior=prior, **kw
        )
        return {k: v["value"] for k, v in g.items()}, {k: v["value"] for k, v in tr.items()}

    g, tr = run(x, y, x[:m])
    assert set(g) == {"scale_a", "scale_b", "scale", "u_loc", "u_var", "u", "data", "f_noise"}
    assert tr["u"].shape == (10, m) and tr["f"].shape == (16, 10)
    assert tr["y"].shape == (16,) and tr["inducing"].shape == (m, 64)
    np.testing.assert_array_equal(tr["f_noise"], g["f_noise"])
    np.testing.assert_array_equal(tr["y"], np.asarray(y)[np.asarray(tr["data"])])
    # SVGP baseline: no scale site, no q(σ²) params
    kw["inducing"] = x[:m]
    g0 = numpyro.handlers.trace(numpyro.handlers.seed(nngp.classification_guide, 0)).get_trace(
        x, y, scale_prior=None, **kw
    )
    assert "scale" not in g0 and "scale_a" not in g0


@pytest.mark.slow
def test_classification_svi_beats_chance():
    import optax

    import ppl
    from ppl.inference import SVI

    d, x, y, m = _digits_small()
    net = nngp.make_net(2)
    prior = dist.InverseGamma(2.0, 2.0)
    svi = SVI(nngp.classification, nngp.classification_guide, optax.adam(2e-2), ppl.objectives.elbo)
    kw = dict(net=net, num_classes=10, inducing=x[:m], scale_prior=prior, batch_size=100)
    res = svi.run(jax.random.PRNGKey(0), 300, x, y, progress_bar=False, **kw)
    losses = np.asarray(res.losses)
    assert losses[-20:].mean() < losses[:20].mean()
    assert set(res.params) >= {"inducing", "u_loc", "u_var", "scale_a", "scale_b"}
    probs = nngp.classification_predict(
        res.params, d["x_test"][:200], net=net, scale_prior=prior, num_samples=32
    )
    np.testing.assert_allclose(np.asarray(probs).sum(1), 1.0, rtol=1e-5)
    metrics = nngp.classification_metrics(probs, d["y_test"][:200])
    assert metrics["accuracy"] > 0.5  # chance: 0.1


@pytest.mark.parametrize(
    "change, match",
    [
        ({"inducing": np.zeros((5, 3))}, "feature shape"),
        ({"y": np.full(60, 10)}, "labels"),
        ({"y": np.zeros(59, int)}, "y must be"),
        ({"num_classes": 1}, "num_classes"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
def test_classification_bad_input(change, match):
    d, x, y, m = _digits_small(60, 8)
    kw = {"y": y, "net": nngp.make_net(1), "num_classes": 10, "inducing": x[:m], **change}
    with pytest.raises(ValueError, match=match):
        numpyro.handlers.seed(nngp.classification_guide, 0)(x, **kw)


def test_classification_metrics():
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    m = nngp.classification_metrics(probs, np.array([0, 1, 1]))
    assert m["accuracy"] == pytest.approx(2 / 3)
    assert m["nll"] == pytest.approx(-np.mean(np.log([0.9, 0.8, 0.4])))
    # bins (0.8, 0.867], (0.867, 0.933]: |1 − 0.8|/3 + ... ; the 0.6 bin: |0 − 0.6|/3
    assert m["ece"] == pytest.approx((0.1 + 0.2 + 0.6) / 3)


# ---------------------------------------------------------------------- ppl fit nngp


def test_ppl_fit_nngp_end_to_end(tmp_path, capsys, monkeypatch):
    import arviz as az

    from ppl import cli

    monkeypatch.setenv("PPL_FAST", "1")
    opts = cli.build_parser().parse_args(["fit", "nngp"])
    assert opts.inference == "gh" and opts.prior == "ig" and opts.variant == "outliers-ood"
    assert opts.num_samples == 50
    out = tmp_path / "nngp"
    code = cli.main(["fit", "nngp", "--out", str(out), "--no-progress"])
    stdout, err = capsys.readouterr()
    assert code == 0, err
    names = {p.name for p in out.iterdir()}
    assert names == {"posterior.nc", "loss.png", "predictive.png", "scale.png", "summary.txt"}
    for png in ("loss.png", "predictive.png", "scale.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    idata = az.from_netcdf(out / "posterior.nc")
    assert idata.posterior["scale"].shape == (1, 50)
    assert idata.posterior_predictive["y"].shape == (1, 50, 88)
    assert idata.observed_data["y"].shape == (88,)
    np.testing.assert_array_equal(idata.observed_data["y"].values, nngp.load_default()["y_test"])
    attrs = idata.posterior.attrs
    assert attrs["prior"] == "ig" and attrs["variant"] == "outliers-ood"
    res = nngp.compare(nngp.load_default(), net=nngp.make_net(), noise=0.1)
    assert attrs["rmse_ig"] == pytest.approx(res["ig"]["rmse"], abs=1e-9)
    assert attrs["nll_burr"] == pytest.approx(res["burr"]["nll"], abs=1e-6)
    summary = (out / "summary.txt").read_text()
    for label in ("NNGP (σ² = β/N)", "Student-t (IG) IG(2, 2)", "Burr XII (2, 2)", "half-Cauchy"):
        assert label in summary
    assert f"NLL {res['ig']['nll']:.4f}" in summary
    assert "scale" in summary.split("posterior summary")[1]
    assert "posterior.nc" in stdout


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--inference", "closed", "--prior", "burr"], "--inference closed"),
        (["--noise", "0"], "--noise"),
        (["--a", "-1"], "--a"),
        (["--depth", "0"], "--depth"),
        (["--prior", "gamma"], "invalid choice"),
        (["--inference", "svi"], "does not support"),
    ],
)
def test_ppl_fit_nngp_bad_options(argv, match, tmp_path, capsys):
    from ppl import cli

    out = tmp_path / "bad"
    code = cli.main(["fit", "nngp", "--out", str(out), *argv])
    _, err = capsys.readouterr()
    assert code == 2 and match in err
    assert not out.exists()
