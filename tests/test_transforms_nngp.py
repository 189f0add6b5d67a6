"""ppl.transforms.nngp: kernels against closed forms and finite networks; the handlers."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro import handlers
from numpyro.infer.util import log_density

from ppl.transforms.nngp import (
    Abs,
    Conv,
    Dense,
    Erf,
    FanInSum,
    FanOut,
    Flatten,
    Identity,
    LeakyRelu,
    Relu,
    infinite_width,
    kernel_fn,
    marginalize_scale,
    network,
    parallel,
    scale_mixture,
    serial,
    unit_scale,
)

X = np.array([[1.0, 0.5, -0.3], [-0.2, 0.8, 0.4], [0.6, -1.0, 0.9]])


def mlp(act, depth, w2, b2=0.1, readout=1.0):
    layers = []
    for _ in range(depth):
        layers += [Dense(W_std=w2**0.5, b_std=b2**0.5), act]
    return serial(*layers, Dense(W_std=readout))


def test_relu_depth3_row_of_the_spec():
    with jax.enable_x64(True):
        K = np.asarray(kernel_fn(mlp(Relu(), 3, 2.0))(jnp.asarray(X)))
    want = [0.596667, 0.356082, 0.465919, 0.430000, 0.374626, 0.873333]
    np.testing.assert_allclose(K[np.triu_indices(3)], want, atol=1e-6)


def _kinked_expectation(phi_fn, alpha, k1, k12, k2):
    """E[φ(u)φ(v)] for φ = (1-α)·relu + α·id by 1-D quadrature over u, with the exact
    conditional mean of φ(v) given u (v | u ~ N(ρu, s²))."""
    from scipy import integrate, stats

    rho, s = k12 / k1, np.sqrt(k2 - k12**2 / k1)

    def integrand(u):
        m = rho * u
        e_relu = m * stats.norm.cdf(m / s) + s * stats.norm.pdf(m / s)
        return phi_fn(u) * ((1 - alpha) * e_relu + alpha * m) * stats.norm.pdf(u, 0, np.sqrt(k1))

    return integrate.quad(integrand, -np.inf, np.inf, points=None, epsabs=1e-12)[0]


@pytest.mark.parametrize("alpha", [0.2, -1.0])  # α = -1 is |u|
def test_leaky_relu_and_abs_closed_forms_match_quadrature(alpha):
    k1, k12, k2 = 1.0, 0.6, 1.5
    layer = Abs() if alpha == -1.0 else LeakyRelu(alpha)
    # Inputs whose Dense(W_std=1) covariances are (k1, k12, k2), then φ, then a unit readout.
    x = np.array([[1.0, 0.0], [0.6, np.sqrt(1.5 - 0.36)]]) * np.sqrt(2)
    with jax.enable_x64(True):
        K = kernel_fn(serial(Dense(), layer, Dense()))(x)

    def phi(u):
        return (1 - alpha) * max(u, 0.0) + alpha * u

    want = _kinked_expectation(phi, alpha, k1, k12, k2)
    assert abs(float(K[0, 1]) - want) < 1e-8


def test_layers_of_different_kinds_have_different_tree_structures():
    """jit caches kernels by tree structure: equal structures would share a compiled kernel.

    Regression: with ``register_dataclass`` (jax 0.10) ``Abs()`` and ``Erf()`` had equal
    structures, and CI once computed the ``Abs`` network's kernel with the ``Erf`` one.
    """
    layers = [Relu(), Erf(), Abs(), LeakyRelu(0.2), Identity(), Flatten(), FanInSum()]
    structures = [jax.tree_util.tree_structure(layer) for layer in layers]
    for i, a in enumerate(structures):
        for j, b in enumerate(structures):
            assert (a == b) == (i == j), (layers[i], layers[j])
    nets = [serial(Dense(), layer, Dense()) for layer in (Relu(), Erf(), Abs())]
    Ks = [np.asarray(kernel_fn(net)(X)) for net in nets]
    assert min(np.abs(Ks[i] - Ks[j]).max() for i in range(3) for j in range(i)) > 1e-2
    leaves, treedef = jax.tree_util.tree_flatten(serial(Dense(W_std=2.0), LeakyRelu(0.3)))
    assert leaves == [2.0, 0.0, 0.3]
    assert jax.tree_util.tree_unflatten(treedef, leaves) == serial(Dense(W_std=2.0), LeakyRelu(0.3))


def test_diag_batch_and_blocks_agree_with_the_full_kernel():
    key = jax.random.key(0)
    x1 = jax.random.normal(key, (7, 3))
    x2 = jax.random.normal(jax.random.key(1), (4, 3))
    k = kernel_fn(mlp(Erf(), 2, 2.25, readout=1.3))
    full = k(jnp.concatenate([x1, x2]))
    np.testing.assert_allclose(k(x1, x2), full[:7, 7:], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(k(x1, x2, batch_size=3), full[:7, 7:], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(k(x1, diag=True), jnp.diag(full)[:7], rtol=1e-5)
    np.testing.assert_allclose(k(x1, diag=True, batch_size=2), jnp.diag(full)[:7], rtol=1e-5)


def test_gradients_are_finite_at_coincident_and_zero_inputs():
    x = jnp.asarray(np.array([X[0], X[0], np.zeros(3)]))

    def total(w, b):
        net = serial(Dense(W_std=w, b_std=b), Relu(), Dense(W_std=w, b_std=b), Abs(), Dense())
        return kernel_fn(net)(x).sum()

    grads = jax.grad(total, argnums=(0, 1))(1.3, 0.0)
    assert all(np.isfinite(g) for g in grads)


def _mc_cov(model_fn, x, draws, key):
    fs = jax.lax.map(lambda k: handlers.seed(model_fn, k)(x), jax.random.split(key, draws))
    fs = np.asarray(fs, np.float64)  # [draws, n]
    prod = fs[:, :, None] * fs[:, None, :]
    return prod.mean(0), prod.std(0) / np.sqrt(draws)


@pytest.mark.slow  # tests/test_spec_nngp.py checks T1-MC in the default suite
def test_finite_mlp_network_matches_its_kernel():
    net = mlp(Relu(), 2, 2.0, readout=1.2)
    x = jnp.asarray(X)
    mean, se = _mc_cov(lambda x: network("f", net, x, width=512), x, 3000, jax.random.key(3))
    K = np.asarray(kernel_fn(net)(x))
    # 4 Monte Carlo standard errors plus an O(1/width) finite-width allowance.
    ratio = np.abs(mean - K) / (4 * se + 2 / 512 * np.abs(K).max())
    assert np.all(ratio <= 1)


@pytest.mark.slow  # 2000 Monte Carlo CNN draws, ~45 s on 2 cores
def test_finite_cnn_network_matches_its_kernel():
    net = serial(Conv(W_std=1.5, b_std=0.2), Relu(), Conv(W_std=1.5), Relu(), Flatten(), Dense())
    x = jax.random.normal(jax.random.key(0), (3, 4, 4, 2))
    mean, se = _mc_cov(lambda x: network("f", net, x, width=128), x, 2000, jax.random.key(4))
    K = np.asarray(kernel_fn(net)(x))
    ratio = np.abs(mean - K) / (4 * se + 4 / 128 * np.abs(K).max())
    assert np.all(ratio <= 1)
    np.testing.assert_allclose(kernel_fn(net)(x, diag=True), np.diag(K), rtol=1e-5)


def test_residual_branches_add():
    branch = serial(Relu(), Dense(W_std=1.4))
    res = serial(Dense(W_std=1.4), FanOut(2), parallel(branch, Identity()), FanInSum(), Dense())
    x = jnp.asarray(X)
    k_res = kernel_fn(res)(x)
    k_lin = kernel_fn(serial(Dense(W_std=1.4), Dense()))(x)
    k_branch = kernel_fn(serial(Dense(W_std=1.4), Relu(), Dense(W_std=1.4), Dense()))(x)
    np.testing.assert_allclose(k_res, k_lin + k_branch, rtol=1e-6)


@pytest.mark.parametrize(
    "net, x, match",
    [
        (serial(Dense(), Relu()), X, "readout"),
        (serial(Conv(), Relu(), Flatten(), Dense()), X, "needs images"),
        (serial(Dense(), Relu(), Dense()), np.zeros((2, 4, 4, 1)), "needs features"),
        (serial(Dense(), FanOut(2), Dense()), X, "after FanOut"),
    ],
)
def test_bad_structure_is_rejected_before_tracing(net, x, match):
    with pytest.raises(ValueError, match=match):
        kernel_fn(net)(x)


def test_bad_inputs_name_the_argument():
    k = kernel_fn(mlp(Relu(), 1, 2.0))
    with pytest.raises(ValueError, match="same feature shape"):
        k(X, np.zeros((2, 4)))
    with pytest.raises(ValueError, match="x1 contains NaN"):
        k(np.array([[np.nan, 0.0, 1.0]]))
    with pytest.raises(ValueError, match="batch_size"):
        k(X, batch_size=0)


def test_unit_scale_resets_the_readout():
    net = unit_scale(mlp(Relu(), 1, 2.0, readout=3.0))
    assert float(net.layers[-1].W_std) == 1.0 and float(net.layers[-1].b_std) == 0.0


# ------------------------------------------------------------------------ handlers

XS = np.linspace(-2, 2, 8)[:, None]
YS = np.sin(2 * XS[:, 0]) + 0.1 * (-1.0) ** np.arange(8)
NET = mlp(Relu(), 2, 2.0)
TAU2 = 0.01


def _gp_model(x, y=None, latent=False, scaled=True, prior=None):
    s = numpyro.sample("scale", prior or dist.InverseGamma(2.0, 2.0))
    K = kernel_fn(NET)(x)
    n = K.shape[0]
    if latent:
        f = numpyro.sample("f", dist.MultivariateNormal(jnp.zeros(n), s * K))
        noise = jnp.sqrt((s if scaled else 1.0) * TAU2)
        numpyro.sample("y", dist.Normal(f, noise).to_event(1), obs=y)
    else:
        cov = s * (K + TAU2 * jnp.eye(n))
        numpyro.sample("y", dist.MultivariateNormal(jnp.zeros(n), cov), obs=y)


@pytest.mark.parametrize("latent", [False, True])
def test_marginalize_scale_gives_the_student_t_evidence(latent):
    # Spec T3: log p(y) = -16.9095675 under IG(2, 2) (given to 7 decimals).
    with jax.enable_x64(True):
        lp, tr = log_density(marginalize_scale(_gp_model), (XS, YS), {"latent": latent}, {})
    assert abs(float(lp) + 16.9095675) < 1e-6
    assert [n for n, s in tr.items() if s["type"] == "sample"] == ["y"]


def test_marginalize_scale_rejects_what_it_cannot_integrate():
    with jax.enable_x64(True):
        with pytest.raises(ValueError, match="not proportional"):
            log_density(
                marginalize_scale(_gp_model), (XS, YS), {"latent": True, "scaled": False}, {}
            )
        with pytest.raises(ValueError, match="'scale'.*HalfCauchy"):
            kw = {"prior": dist.HalfCauchy(1.0)}
            log_density(marginalize_scale(_gp_model), (XS, YS), kw, {})


def _net_model(x):
    f = network("f", NET, x)
    numpyro.sample("y", dist.Normal(f, 0.1).to_event(1))


def test_handlers_compose_in_either_order():
    prior = dist.InverseGamma(2.0, 2.0)

    for model in (
        infinite_width(scale_mixture(_net_model, prior)),
        scale_mixture(infinite_width(_net_model), prior),
    ):
        tr = handlers.trace(handlers.seed(model, 0)).get_trace(XS)
        assert list(tr) == ["scale", "f", "y"]
        cov = tr["f"]["fn"].covariance_matrix
        np.testing.assert_allclose(cov, tr["scale"]["value"] * kernel_fn(NET)(XS), rtol=1e-4)
    tr = handlers.trace(handlers.seed(infinite_width(_net_model, width=16), 0)).get_trace(XS)
    assert tr["f.0.W"]["value"].shape == (1, 16)
