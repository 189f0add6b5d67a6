"""ppl.models.krosbl: generators, metrics, the NumPyro models, embedded data and `ppl fit krosbl`.

References are built here with dense NumPy (``np.kron``, explicit loops over IRS patterns), never
with the module's own helpers.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
import pytest
from numpyro import handlers
from numpyro.distributions import constraints
from numpyro.infer.util import log_density
from scipy.stats import invgamma

from ppl.models import krosbl
from ppl.transforms.kronecker import KronOperator, KronSBLMarginal, kron_vector


def dense(factors):
    return functools.reduce(np.kron, [np.asarray(a) for a in factors])


def abstract_trace(model, *args, seed=0, **kwargs):
    """The model's trace with abstract values (``jax.eval_shape``: nothing is compiled)."""
    found = []
    jax.eval_shape(
        lambda: found.append(handlers.trace(handlers.seed(model, seed)).get_trace(*args, **kwargs))
    )
    return found[0]


def site_table(model, *args, **kwargs):
    tr = abstract_trace(model, *args, **kwargs)
    return [(name, s["type"], tuple(jnp.shape(s["value"]))) for name, s in tr.items()]


def site_values(model, *args, **kwargs):
    """``{site: value}`` of one seeded run, compiled as one program."""

    def run():
        tr = handlers.trace(handlers.seed(model, 0)).get_trace(*args, **kwargs)
        return {name: s["value"] for name, s in tr.items()}

    return jax.jit(run)()


def joint_log_density(model, args, kwargs, values):
    """``numpyro.infer.util.log_density`` compiled as one program."""
    return float(jax.jit(lambda v: log_density(model, args, kwargs, v)[0])(values))


# ------------------------------------------------------------------ generate_synthetic


@pytest.mark.parametrize("is_complex", [False, True], ids=["real", "complex"])
def test_generate_synthetic_follows_the_spec_draw_order(is_complex):
    ns, ms, k, snr = (6, 5, 4), (3, 4, 2), 2, 17.0
    data = krosbl.generate_synthetic(11, ns, ms, k, snr, is_complex=is_complex)

    rng = np.random.default_rng(11)

    def draw(shape):
        if not is_complex:
            return rng.standard_normal(shape)
        re = rng.standard_normal(shape)
        return (re + 1j * rng.standard_normal(shape)) / math.sqrt(2)

    factors = [draw((m, n)) for m, n in zip(ms, ns, strict=True)]
    xs, masks = [], []
    for n in ns:
        idx = rng.choice(n, size=k, replace=False)
        v = np.zeros(n, complex if is_complex else float)
        v[idx] = draw(k)
        xs.append(v)
        masks.append(np.isin(np.arange(n), idx))
    x = dense(xs)
    y0 = dense(factors) @ x
    m_tot = math.prod(ms)
    s2 = np.sum(np.abs(y0) ** 2) / m_tot * 10 ** (-snr / 10)
    y = y0 + math.sqrt(s2) * draw(m_tot)

    for a, b in zip(data["factors"], factors, strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(data["x"], x)
    np.testing.assert_allclose(data["y"], y, rtol=0, atol=1e-12)
    assert data["noise_var"] == pytest.approx(s2, rel=1e-13)
    assert isinstance(data["noise_var"], float)
    np.testing.assert_array_equal(data["support"], dense(masks).astype(bool))
    np.testing.assert_array_equal(data["support"], x != 0)
    assert data["support"].dtype == bool and data["support"].sum() == k**3
    want = np.complex128 if is_complex else np.float64
    assert data["x"].dtype == want and data["y"].dtype == want
    assert all(a.dtype == want for a in data["factors"])


def test_generate_synthetic_seeds_and_keys():
    args = ((5, 4), (3, 3), 2, 20.0)
    a, b = krosbl.generate_synthetic(3, *args), krosbl.generate_synthetic(3, *args)
    np.testing.assert_array_equal(a["y"], b["y"])
    c = krosbl.generate_synthetic(4, *args)
    assert not np.array_equal(a["y"], c["y"])
    k1 = krosbl.generate_synthetic(jax.random.PRNGKey(5), *args)
    k2 = krosbl.generate_synthetic(jax.random.PRNGKey(5), *args)
    k3 = krosbl.generate_synthetic(jax.random.key(5), *args)  # typed key, same key data
    k4 = krosbl.generate_synthetic(jax.random.PRNGKey(6), *args)
    np.testing.assert_array_equal(k1["y"], k2["y"])
    np.testing.assert_array_equal(k1["y"], k3["y"])
    assert not np.array_equal(k1["y"], k4["y"])
    per_mode = krosbl.generate_synthetic(0, (5, 4), (3, 3), (1, 3), 20.0)
    supp = per_mode["support"].reshape(5, 4)
    assert supp.any(axis=1).sum() == 1 and supp.any(axis=0).sum() == 3


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(ns=(4, 4), ms=(3,), k=2), ValueError, "one size per mode"),
        (dict(ns=(4, 4), ms=(3, 3), k=5), ValueError, "k must be <= n_i"),
        (dict(ns=(4, 0), ms=(3, 3), k=1), ValueError, "ns"),
        (dict(ns=(4, 4), ms=(3, 3), k=(1, 2, 3)), ValueError, "one per mode"),
        (dict(ns=(4, 4), ms=(3, 3), k=1, snr_db=float("nan")), ValueError, "snr_db"),
        (dict(ns=(4, 4), ms=(3, 3), k=1, key=-1), ValueError, "key"),
        (dict(ns=(4, 4), ms=(3, 3), k=1, key="zero"), TypeError, "key"),
    ],
)
def test_generate_synthetic_bad_input(kwargs, error, match):
    kwargs = {"key": 0, "snr_db": 20.0, **kwargs}
    with pytest.raises(error, match=match):
        krosbl.generate_synthetic(**kwargs)


# ------------------------------------------------------------------------ generate_irs


@pytest.fixture(scope="module")
def irs():
    return krosbl.generate_irs(2, snr_db=14)


def ula(n, grid):
    return np.array(
        [[np.exp(1j * np.pi * (2 * k / grid - 1) * i) / np.sqrt(n) for k in range(grid)]
         for i in range(n)]
    )  # fmt: skip


def test_generate_irs_stacking_matches_the_physical_model(irs):
    """y − noise equals the stack of vec(H2 diag θ_t H1 X) (BS antenna fastest, then pilot,
    then pattern), built with loops from the channels, pilots and patterns."""
    x_pil, theta, h1, h2 = irs["pilots"], irs["patterns"], irs["h1"], irs["h2"]
    n_irs, n_pattern = theta.shape
    stacked = []
    for t in range(n_pattern):
        y_t = h2 @ np.diag(theta[:, t]) @ h1 @ x_pil  # [n_bs, n_pilot]
        stacked.append(y_t.flatten(order="F"))  # vec: column-major
    y0 = np.concatenate(stacked)
    phi = dense(irs["factors"])
    np.testing.assert_allclose(phi @ irs["x"], y0, rtol=0, atol=1e-10 * np.abs(y0).max())
    # the factors are what the spec says: Ψ_I = Θᵀ[a_I(0) ⊙ conj A_I], Ψ_m = Xᵀ conj A_m, A_b
    a_irs, a_ms, a_bs = ula(n_irs, 18), ula(6, 18), ula(16, 18)
    np.testing.assert_allclose(
        irs["factors"][0], theta.T @ (a_irs[:, :1] * a_irs.conj()), atol=1e-12
    )
    np.testing.assert_allclose(irs["factors"][1], x_pil.T @ a_ms.conj(), atol=1e-12)
    np.testing.assert_allclose(irs["factors"][2], a_bs, atol=1e-12)
    # σ² = mean|y_noiseless|² / SNR; the noise has that power (288 CN draws: 5 s.e.)
    s2 = irs["noise_var"]
    assert s2 == pytest.approx(np.mean(np.abs(y0) ** 2) / 10**1.4, rel=1e-10)
    noise = irs["y"] - y0
    assert abs(np.mean(np.abs(noise) ** 2) / s2 - 1) < 5 / math.sqrt(noise.size)
    assert abs(np.mean(noise.real**2) / np.mean(noise.imag**2) - 1) < 0.5  # circular


def test_generate_irs_channels_pilots_patterns(irs):
    h1, h2, x_pil, theta = irs["h1"], irs["h2"], irs["pilots"], irs["patterns"]
    assert h1.shape == (256, 6) and h2.shape == (16, 256) and x_pil.shape == (6, 3)
    np.testing.assert_allclose(np.abs(x_pil), 1 / math.sqrt(6), atol=1e-15)  # QPSK / √N_m
    np.testing.assert_allclose(np.angle(x_pil) % (np.pi / 2), np.pi / 4, atol=1e-12)
    np.testing.assert_allclose(np.abs(theta), 1 / 16, atol=1e-15)  # ±L^{-½}
    assert set(np.unique(np.sign(theta))) == {-1.0, 1.0}
    # rank one: one departure atom, gains on 3 contiguous arrival atoms
    for h, n_tx, n_rx in ((h1, 6, 256), (h2, 256, 16)):
        u, s, vh = np.linalg.svd(h)
        assert s[1] < 1e-10 * s[0]
        match = np.abs(ula(n_tx, 18).conj().T @ vh[0].conj())  # departure atom: |<a_k, v>| = 1
        assert np.sum(match > 1 - 1e-10) == 1
        a_rx = ula(n_rx, 18)
        resid = []
        for start in range(18):
            cols = a_rx[:, (start + np.arange(3)) % 18]
            coef, *_ = np.linalg.lstsq(cols, u[:, 0], rcond=None)
            resid.append(np.linalg.norm(cols @ coef - u[:, 0]))
        assert min(resid) < 1e-10
    for t in range(theta.shape[1]):  # no degenerate pattern
        assert np.linalg.norm(h2 @ np.diag(theta[:, t]) @ h1) >= 1e-5


def test_generate_irs_support_and_channel_metric(irs):
    x, supp = irs["x"], irs["support"]
    assert x.shape == (18**3,) and x.dtype == np.complex128 and supp.dtype == bool
    np.testing.assert_array_equal(supp, x != 0)
    cube = supp.reshape(18, 18, 18)
    per_mode = [
        np.flatnonzero(cube.any(axis=tuple(j for j in range(3) if j != i))) for i in range(3)
    ]
    assert [p.size for p in per_mode] == [3, 1, 3] and cube.sum() == 9
    for i in (0, 2):  # cyclically contiguous blocks
        assert any(set((s + np.arange(3)) % 18) == set(per_mode[i]) for s in range(18))
    assert irs["block_sizes"] == (3, 1, 3) and irs["shape"] == (18, 18, 18)
    # the cascaded channel H_t = vec(H2 diag θ_t H1) (column-major), and its Kronecker form
    theta = irs["patterns"]
    for t in range(theta.shape[1]):
        h_t = (irs["h2"] @ np.diag(theta[:, t]) @ irs["h1"]).flatten(order="F")
        np.testing.assert_allclose(irs["channel"][t], h_t, atol=1e-10 * np.abs(h_t).max())
        row = np.kron(
            np.kron(irs["factors"][0][t : t + 1], irs["cascade_factors"][1]), irs["factors"][2]
        )
        np.testing.assert_allclose(row @ x, h_t, atol=1e-10 * np.abs(h_t).max())
    assert krosbl.irs_nmse(irs, x) < 1e-20
    assert krosbl.irs_nmse(irs, np.zeros_like(x)) == pytest.approx(1.0)
    assert krosbl.irs_nmse(irs, 2 * x) == pytest.approx(1.0)
    x_half = x.copy()
    x_half[np.flatnonzero(supp)[:4]] = 0
    manual = np.mean(
        [
            np.sum(np.abs(np.kron(np.kron(irs["factors"][0][t : t + 1], irs["cascade_factors"][1]),
                                  irs["factors"][2]) @ x_half - irs["channel"][t]) ** 2)
            / np.sum(np.abs(irs["channel"][t]) ** 2)
            for t in range(theta.shape[1])
        ]
    )  # fmt: skip
    assert krosbl.irs_nmse(irs, x_half) == pytest.approx(manual, rel=1e-10)
    with pytest.raises(ValueError, match="x_hat must have shape"):
        krosbl.irs_nmse(irs, x[:10])


def test_generate_irs_reproducible_and_validated():
    a, b = krosbl.generate_irs(7, snr_db=10), krosbl.generate_irs(7, snr_db=10)
    np.testing.assert_array_equal(a["y"], b["y"])
    c = krosbl.generate_irs(8, snr_db=10)
    assert not np.array_equal(a["x"], c["x"])
    small = krosbl.generate_irs(jax.random.PRNGKey(1), n_ms=2, n_bs=4, n_irs=8, grid=6,
                                n_pilot=2, n_pattern=3, spread=2)  # fmt: skip
    assert [f.shape for f in small["factors"]] == [(3, 6), (2, 6), (4, 6)]
    assert small["support"].sum() == 4
    with pytest.raises(ValueError, match="spread"):
        krosbl.generate_irs(0, grid=4, spread=5)
    with pytest.raises(ValueError, match="n_bs"):
        krosbl.generate_irs(0, n_bs=0)


# ----------------------------------------------------------------------------- metrics


def test_nmse_and_support_recovery():
    x = np.array([0.0, 2.0, 0.0, -1.0])
    assert krosbl.nmse(x, x) == 0.0
    assert krosbl.nmse(np.zeros(4), x) == pytest.approx(1.0)
    assert krosbl.nmse(x + np.array([1.0, 0, 0, 0]), x) == pytest.approx(1 / 5)
    supp = x != 0
    assert krosbl.support_recovery(x, supp) == 1.0
    # Ŝ = {1, 2} (|0.01| > 1e-3·2), S = {1, 3}: |∩| = 1, |∪| = 3
    assert krosbl.support_recovery(np.array([0.0, 2.0, 0.01, 1e-4]), supp) == pytest.approx(1 / 3)
    assert krosbl.support_recovery(np.array([0.0, 2.0, 0.01, 1e-4]), supp, rel=0.1) == 0.5
    assert krosbl.support_recovery(np.zeros(4), np.zeros(4, bool)) == 1.0
    with pytest.raises(ValueError, match="shape"):
        krosbl.nmse(x[:3], x)
    with pytest.raises(ValueError, match="undefined"):
        krosbl.nmse(x, np.zeros(4))


# ------------------------------------------------------------------------------ models


@pytest.mark.parametrize("is_complex", [False, True], ids=["real", "complex"])
def test_krosbl_model_sites(is_complex):
    d = krosbl.generate_synthetic(0, (4, 5, 3), (3, 2, 2), 2, 20.0, is_complex=is_complex)
    kw = {"factors": d["factors"], "is_complex": is_complex}
    gammas = [("gamma_1", "param", (4,)), ("gamma_2", "param", (5,)), ("gamma_3", "param", (3,))]
    gammas += [("gamma", "deterministic", (60,))]
    if is_complex:
        latent = [("x_re", "sample", (60,)), ("x_im", "sample", (60,))]
        obs = [("y_re", "sample", (12,)), ("y_im", "sample", (12,))]
    else:
        latent, obs = [("x", "sample", (60,))], [("y", "sample", (12,))]
    table = site_table(krosbl.krosbl_model, d["y"], noise_var=d["noise_var"], **kw)
    assert table == gammas + latent + obs
    table = site_table(krosbl.krosbl_model, d["y"], marginal=True, **kw)
    assert table == gammas + [("noise_var", "param", ()), ("y", "sample", (12,))]
    # y=None samples y; the untransformed program is classic SBL with one flat site
    tr = abstract_trace(krosbl.krosbl_model, noise_var=0.1, **kw)
    for name, _, shape in obs:
        assert not tr[name]["is_observed"] and tr[name]["value"].shape == shape
    table = site_table(krosbl.sbl_model, d["y"], noise_var=0.1, **kw)
    assert table == [("gamma", "param", (60,))] + latent + obs
    # the observed site records the dictionary (ppl.inference.sbl.fit_model reads it)
    tr = abstract_trace(krosbl.krosbl_model, d["y"], noise_var=0.1, **kw)
    assert tr[obs[0][0]]["infer"]["kron_operator"].shape == (12, 60)


def test_krosbl_model_hyperprior_gives_sample_sites():
    d = krosbl.generate_synthetic(0, (4, 5), (3, 4), 2, 20.0)
    prior = dist.InverseGamma(2.0, 1.0)
    table = site_table(krosbl.krosbl_model, d["y"], factors=d["factors"], hyperprior=prior)
    assert table[:4] == [
        ("gamma_1", "sample", (4,)),
        ("gamma_2", "sample", (5,)),
        ("gamma", "deterministic", (20,)),
        ("noise_var", "sample", ()),
    ]
    both = {"gamma": dist.LogNormal(0.0, 1.0), "noise_var": dist.HalfCauchy(1.0)}
    kw = {"factors": d["factors"], "hyperprior": both, "marginal": True}
    tr = abstract_trace(krosbl.krosbl_model, d["y"], **kw)
    assert isinstance(tr["noise_var"]["fn"], dist.HalfCauchy)
    assert isinstance(tr["gamma_1"]["fn"].base_dist.base_dist, dist.LogNormal)
    values = site_values(krosbl.krosbl_model, d["y"], **kw)
    assert np.all(np.asarray(values["gamma_1"]) > 0) and np.ptp(np.asarray(values["gamma_2"])) > 0
    np.testing.assert_allclose(
        values["gamma"], np.kron(values["gamma_1"], values["gamma_2"]), rtol=1e-6
    )


def _hand_written(y, factors, noise_var, is_complex, prior=None):
    """KroSBL written out per mode, without the transform."""
    gs = []
    for i, a in enumerate(factors):
        n = a.shape[1]
        if prior is None:
            gs.append(numpyro.param(f"gamma_{i + 1}", jnp.ones(n), constraint=constraints.positive))
        else:
            gs.append(numpyro.sample(f"gamma_{i + 1}", prior.expand([n]).to_event(1)))
    gamma = functools.reduce(lambda u, v: jnp.outer(u, v).ravel(), gs)
    phi = jnp.asarray(dense(factors))
    if not is_complex:
        x = numpyro.sample("x", dist.Normal(0, jnp.sqrt(gamma)).to_event(1))
        numpyro.sample("y", dist.Normal(phi @ x, math.sqrt(noise_var)).to_event(1), obs=y)
        return
    xr = numpyro.sample("x_re", dist.Normal(0, jnp.sqrt(gamma / 2)).to_event(1))
    xi = numpyro.sample("x_im", dist.Normal(0, jnp.sqrt(gamma / 2)).to_event(1))
    mean = phi @ (xr + 1j * xi)
    sd = math.sqrt(noise_var / 2)
    numpyro.sample("y_re", dist.Normal(mean.real, sd).to_event(1), obs=y.real)
    numpyro.sample("y_im", dist.Normal(mean.imag, sd).to_event(1), obs=y.imag)


@pytest.mark.parametrize("hyper", [False, True], ids=["param", "hyperprior"])
@pytest.mark.parametrize("is_complex", [False, True], ids=["real", "complex"])
def test_kronecker_prior_equals_hand_written_model(is_complex, hyper):
    d = krosbl.generate_synthetic(4, (4, 3), (3, 2), 2, 15.0, is_complex=is_complex)
    rng = np.random.default_rng(0)
    prior = dist.InverseGamma(3.0, 2.0) if hyper else None
    values = {"gamma_1": rng.uniform(0.5, 2, 4), "gamma_2": rng.uniform(0.5, 2, 3)}
    names = ("x_re", "x_im") if is_complex else ("x",)
    values.update({k: rng.normal(size=12) for k in names})
    kw = {"factors": d["factors"], "noise_var": d["noise_var"], "is_complex": is_complex}
    with jax.enable_x64(True):
        lp = joint_log_density(krosbl.krosbl_model, (d["y"],), {**kw, "hyperprior": prior}, values)
        ref = joint_log_density(
            _hand_written, (jnp.asarray(d["y"]), d["factors"], d["noise_var"], is_complex, prior),
            {}, values,
        )  # fmt: skip
    assert float(lp) == pytest.approx(float(ref), rel=1e-10)
    # and the explicit formula: Gaussian prior of x plus the (circular) likelihood of y
    gamma = np.kron(values["gamma_1"], values["gamma_2"])
    x = values["x_re"] + 1j * values["x_im"] if is_complex else values["x"]
    r = d["y"] - dense(d["factors"]) @ x
    s2, m = d["noise_var"], r.size
    if is_complex:
        want = -np.sum(np.log(np.pi * gamma) + np.abs(x) ** 2 / gamma)
        want += -m * np.log(np.pi * s2) - np.sum(np.abs(r) ** 2) / s2
    else:
        want = -0.5 * np.sum(np.log(2 * np.pi * gamma) + x**2 / gamma)
        want += -0.5 * m * np.log(2 * np.pi * s2) - 0.5 * np.sum(r**2) / s2
    if hyper:  # InverseGamma(3, 2) on every γ_i entry
        want += sum(
            invgamma.logpdf(values[k], 3.0, scale=2.0).sum() for k in ("gamma_1", "gamma_2")
        )
    assert float(lp) == pytest.approx(want, rel=1e-10)


@pytest.mark.parametrize("is_complex", [False, True], ids=["real", "complex"])
def test_marginal_log_density_is_kron_sbl_marginal(is_complex):
    d = krosbl.generate_synthetic(5, (5, 4, 3), (3, 3, 2), 2, 20.0, is_complex=is_complex)
    rng = np.random.default_rng(1)
    gs = [rng.uniform(0.2, 2.0, n) for n in (5, 4, 3)]
    params = {f"gamma_{i + 1}": g for i, g in enumerate(gs)} | {"noise_var": 0.3}
    kw = {"factors": d["factors"], "is_complex": is_complex, "marginal": True}
    with jax.enable_x64(True):
        lp = joint_log_density(krosbl.krosbl_model, (d["y"],), kw, params)
        marg = KronSBLMarginal(KronOperator(d["factors"]), gs, 0.3, is_complex=is_complex)
        ref = float(jax.jit(marg.log_prob)(jnp.asarray(d["y"])))
        # the untransformed classic program with γ = ⊗γ_i takes the dense route: same value
        flat = {"gamma": np.asarray(kron_vector(gs)), "noise_var": 0.3}
        lp_flat = joint_log_density(krosbl.sbl_model, (d["y"],), kw, flat)
    assert float(lp) == pytest.approx(ref, rel=1e-10)
    assert float(lp_flat) == pytest.approx(ref, rel=1e-9)
    # the dense Gaussian density as an independent check
    phi = dense(d["factors"])
    c = 0.3 * np.eye(phi.shape[0]) + (phi * np.kron(np.kron(*gs[:2]), gs[2])) @ phi.conj().T
    quad = np.real(d["y"].conj() @ np.linalg.solve(c, d["y"]))
    logdet = np.linalg.slogdet(c)[1]
    m = phi.shape[0]
    want = (
        -logdet - quad - m * np.log(np.pi)
        if is_complex
        else (-0.5 * (logdet + quad) - 0.5 * m * np.log(2 * np.pi))
    )
    assert float(lp) == pytest.approx(want, rel=1e-9)


def test_coupling_acts_on_the_factors():
    from ppl.inference.sbl import coupling_matrix

    d = krosbl.generate_synthetic(0, (6, 5), (3, 3), 2, 20.0)
    rng = np.random.default_rng(2)
    g = {"gamma_1": rng.uniform(0.1, 1, 6), "gamma_2": rng.uniform(0.1, 1, 5)}
    model = handlers.substitute(krosbl.krosbl_model, data=g)
    kw = {"factors": d["factors"], "noise_var": 0.1, "coupling": {0: 0.8, 1: (0.5, 2)}}

    @jax.jit
    def run():
        tr = handlers.trace(handlers.seed(model, 0)).get_trace(d["y"], **kw)
        return tr["gamma_coupled"]["value"], tr["x"]["fn"].base_dist.scale

    coupled, x_scale = run()
    with jax.enable_x64(True):
        c1 = np.asarray(coupling_matrix(6, 0.8)) @ g["gamma_1"]
        c2 = np.asarray(coupling_matrix(5, 0.5, 2)) @ g["gamma_2"]
    np.testing.assert_allclose(coupled, np.kron(c1, c2), rtol=1e-6)
    np.testing.assert_allclose(x_scale**2, np.kron(c1, c2), rtol=1e-5)  # x ~ N(0, ⊗ C_β g_i)
    with pytest.raises(ValueError, match="mode 2"):
        site_table(krosbl.krosbl_model, d["y"], factors=d["factors"], coupling={2: 0.5})
    with pytest.raises(ValueError, match="beta"):
        site_table(krosbl.krosbl_model, d["y"], factors=d["factors"], coupling={0: 1.5})


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(y=np.ones(5)), ValueError, r"y must have shape \(12,\)"),
        (dict(y=np.r_[np.nan, np.ones(11)]), ValueError, "NaN"),
        (dict(noise_var=0.0), ValueError, "noise_var must be"),
        (dict(noise_var=-1.0), ValueError, "noise_var must be"),
        (dict(noise_var=np.ones(2)), ValueError, "noise_var must be a scalar"),
        (dict(y=np.ones(12) + 1j), TypeError, "is_complex=True"),
        (dict(factors=[np.ones((3, 4)) + 1j, np.ones((4, 5))]), TypeError, "factors are complex"),
        (dict(factors=[np.ones(3), np.ones((4, 5))]), ValueError, r"factors\[0\] must be a 2-D"),
        (dict(factors=7), TypeError, "factors must be a list"),
        (dict(is_complex="yes"), TypeError, "is_complex must be a bool"),
        (dict(hyperprior=dist.Normal(0, 1)), ValueError, "positive support"),
        (dict(hyperprior=dist.Gamma(jnp.ones(2), 1.0)), ValueError, "scalar distribution"),
        (dict(hyperprior="gamma"), TypeError, "hyperprior must be"),
        (dict(hyperprior={"noise_var": dist.Gamma(1, 1)}), ValueError, "'gamma'"),
    ],
)
def test_krosbl_model_bad_input(change, error, match):
    d = krosbl.generate_synthetic(0, (4, 5), (3, 4), 2, 20.0)
    kwargs = {"y": d["y"], "factors": d["factors"], "noise_var": 0.1, **change}
    y = kwargs.pop("y")
    with pytest.raises(error, match=match):
        site_table(krosbl.krosbl_model, y, **kwargs)


# --------------------------------------------------------------------------- embedded


def _assert_same_draw(got, want, key):
    """Integers and booleans exactly; floats to 1e-12 relative (per entry, or to the array's
    largest entry): the file was written on another machine, and matrix products of the same
    draw may differ there in the last place (seen: 6.2e-17 in a complex128 factor). Another
    seed or draw order changes entries at O(1)."""
    got, want = np.asarray(got), np.asarray(want)
    assert got.dtype == want.dtype and got.shape == want.shape, key
    if np.issubdtype(want.dtype, np.inexact):
        scale = float(np.abs(want).max(initial=0.0))
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12 * scale, err_msg=key)
    else:
        np.testing.assert_array_equal(got, want, err_msg=key)


def test_embedded_draw_is_generate_irs_seed_0():
    """``models/data/krosbl_irs.npz`` was written by ``krosbl._write_embedded()``, i.e. it is
    ``generate_irs(0, snr_db=20)`` without the rank-one channels h1, h2 (equal up to the
    rounding of another CPU/BLAS: :func:`_assert_same_draw`)."""
    data = krosbl.load_default()
    fresh = krosbl.generate_irs(0, snr_db=20)
    assert set(data) == (set(fresh) - {"h1", "h2"}) | {"seed"}
    assert data["seed"] == 0 and data["snr_db"] == 20.0
    for key, value in data.items():
        if key == "seed":
            continue
        want = fresh[key]
        if isinstance(value, list):
            assert len(value) == len(want)
            for i, (a, b) in enumerate(zip(value, want, strict=True)):
                _assert_same_draw(a, b, f"{key}[{i}]")
        else:
            _assert_same_draw(value, want, key)
    assert data["y"].dtype == np.complex128 and not data["y"].flags.writeable
    assert krosbl.DATA_PATH.stat().st_size < 200_000


# ---------------------------------------------------------------- EM: replay and B4


def test_nmse_trace_is_the_nmse_of_each_iteration():
    """The per-iteration NMSE of `ppl fit krosbl` (a replay of the fit) equals the NMSE of a
    fit stopped after that many iterations (its final E-step is the next iteration's)."""
    from ppl.inference import sbl

    d = krosbl.generate_synthetic(3, (8, 7), (5, 5), 2, 25.0)
    res = sbl.fit(d["factors"], d["y"], noise_var=d["noise_var"], max_iter=10, tol=1e-300)
    trace = krosbl._nmse_trace(d, res, m_step="am", noise_var=d["noise_var"], block_sizes=None)
    assert trace is not None and trace.shape == (10,)
    short = sbl.fit(d["factors"], d["y"], noise_var=d["noise_var"], max_iter=4, tol=1e-300)
    assert trace[4] == pytest.approx(krosbl.nmse(short.mean, d["x"]), rel=1e-8)
    assert trace[-1] < trace[0]
    # a replay with other settings does not reproduce the cost trace: no NMSE curve
    other = krosbl._nmse_trace(d, res, m_step="svd", noise_var=d["noise_var"], block_sizes=None)
    assert other is None


def test_svi_on_the_marginal_reaches_the_em_cost():
    """Spec B4: Adam on log γ_i of ``krosbl_model(marginal=True)`` (empty guide, 2000 steps)
    reaches the EM fixed point's cost L within 1e-3 relative, or lower."""
    from ppl.inference import SVI, sbl

    d = krosbl.generate_synthetic(0, (10, 10), (6, 6), 2, 20.0)
    em = sbl.fit(d["factors"], d["y"], noise_var=d["noise_var"], max_iter=3000, tol=1e-9)

    def no_guide(y=None, **kwargs):
        pass

    with jax.enable_x64(True):
        svi = SVI(krosbl.krosbl_model, no_guide, optax.adam(0.1))
        out = svi.run(
            jax.random.PRNGKey(0), 2000, y=d["y"], factors=d["factors"],
            noise_var=d["noise_var"], marginal=True, progress_bar=False,
        )  # fmt: skip
    gammas = [np.asarray(out.params[f"gamma_{i + 1}"]) for i in range(2)]
    _, _, cost = sbl.estep(d["factors"], gammas, d["noise_var"], d["y"])
    assert float(cost) <= em.cost + 1e-3 * abs(em.cost), (float(cost), em.cost)
    # the SVI loss is −log p(y) = L/2 + (M/2) log 2π at its last step
    # (up to the last Adam step, which moves it by ~1e-5)
    m = d["y"].size
    assert (
        abs(np.asarray(out.losses)[-1] - (0.5 * float(cost) + 0.5 * m * math.log(2 * math.pi)))
        < 1e-3
    )


@pytest.mark.slow
def test_nuts_with_a_weak_hyperprior_matches_em():
    """Spec B4, second half: with a weak hyperprior the NUTS posterior mean of x matches the
    EM mean to NMSE < 0.05 (about 70 s on 2 CPU cores)."""
    from ppl.inference import NUTS, sbl

    d = krosbl.generate_synthetic(0, (6, 5), (4, 4), 2, 20.0)
    nuts = NUTS(krosbl.krosbl_model, num_warmup=300, num_samples=300, num_chains=1)
    idata = nuts.run(
        jax.random.PRNGKey(0), d["y"], factors=d["factors"], noise_var=d["noise_var"],
        hyperprior=dist.InverseGamma(1.0, 1e-2),
    )  # fmt: skip
    assert {"gamma_1", "gamma_2", "gamma", "x"} <= set(idata.posterior.data_vars)
    x_mean = idata.posterior["x"].mean(("chain", "draw")).values
    em = sbl.fit(d["factors"], d["y"], noise_var=d["noise_var"])
    assert krosbl.nmse(x_mean, em.mean) < 0.05


# ------------------------------------------------------------------------- ppl fit krosbl


def test_ppl_fit_krosbl_end_to_end(tmp_path, capsys, monkeypatch):
    import arviz as az

    from ppl import cli

    monkeypatch.setenv("PPL_FAST", "1")
    opts = cli.build_parser().parse_args(["fit", "krosbl"])
    assert opts.steps == 50 and opts.m_step == "svd" and opts.inference == "em"
    opts = cli.build_parser().parse_args(["fit", "krosbl", "--max-iter", "7"])
    assert opts.steps == 7
    out = tmp_path / "krosbl"
    code = cli.main(["fit", "krosbl", "--out", str(out), "--max-iter", "8", "--no-progress"])
    stdout, err = capsys.readouterr()
    assert code == 0, err
    names = {p.name for p in out.iterdir()}
    assert names == {"posterior.nc", "loss.png", "convergence.png", "support.png", "summary.txt"}
    for png in ("loss.png", "convergence.png", "support.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    idata = az.from_netcdf(out / "posterior.nc")
    assert idata.posterior["x_re"].shape == (1, 1, 18**3)
    assert idata.sample_stats["cost"].size == 8
    assert idata.sample_stats["nmse_channel"].size == 8
    x_true = idata.constant_data["x_true_re"].values + 1j * idata.constant_data["x_true_im"].values
    np.testing.assert_array_equal(x_true, krosbl.load_default()["x"])
    x_hat = idata.posterior["x_re"].values.ravel() + 1j * idata.posterior["x_im"].values.ravel()
    nmse = krosbl.irs_nmse(krosbl.load_default(), x_hat)
    summary = (out / "summary.txt").read_text()
    assert f"NMSE (cascaded channel, mean over IRS patterns): {nmse:.4g}" in summary
    assert "iterations: 8 (converged: False)" in summary
    assert "NMSE (cascaded channel)" in summary.split("posterior summary")[1]
    assert "posterior.nc" in stdout


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--block", "--m-step", "svd"], "--block"),
        (["--max-iter", "0"], "--max-iter"),
        (["--snr-db", "inf"], "--snr-db"),
        (["--m-step", "newton"], "invalid choice"),
        (["--inference", "svi"], "does not support"),
    ],
)
def test_ppl_fit_krosbl_bad_options(argv, match, tmp_path, capsys):
    from ppl import cli

    out = tmp_path / "bad"
    code = cli.main(["fit", "krosbl", "--out", str(out), *argv])
    _, err = capsys.readouterr()
    assert code == 2 and match in err
    assert not out.exists()


def test_build_regenerates_at_the_requested_snr():
    from ppl import cli

    opts = cli.build_parser().parse_args(["fit", "krosbl", "--snr-db", "12", "--seed", "4"])
    opts.learn_noise = True
    problem = krosbl._build(opts)
    want = krosbl.generate_irs(4, snr_db=12)
    np.testing.assert_array_equal(problem.data["y"], want["y"])
    assert problem.kwargs["noise_var"] is None and problem.kwargs["is_complex"] is True
    default = krosbl._build(cli.build_parser().parse_args(["fit", "krosbl"]))
    np.testing.assert_array_equal(default.data["y"], krosbl.load_default()["y"])
    assert default.kwargs["noise_var"] == default.data["noise_var"]
