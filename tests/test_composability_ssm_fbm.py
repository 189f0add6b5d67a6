"""Structure transforms composed with the rest of the stack: ``state_space`` keeps the
density of a jittered ``GaussianProcess`` (the jitter is white observation noise, filtered
exactly), and a ``markov_fbm`` model whose times are jitted arguments fits under
``ppl.inference.SVI`` without ``t_end=``, step for step as under NumPyro."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
import pytest
from numpyro import handlers
from numpyro.infer import Trace_ELBO
from numpyro.infer.util import log_density

from ppl.inference import SVI
from ppl.transforms.fbm import fbm_sde, markov_fbm
from ppl.transforms.state_space import GaussianProcess, Matern, StateSpaceGP, state_space

# -- state_space with jitter ------------------------------------------------------------

#: unsorted indexes with one repeat (the dense covariance is regular once jitter > 0)
INDEX = np.array([2.3, 0.4, 1.7, 0.9, 3.1, 0.4, 2.8, 0.05, 1.2, 2.0])
#: the same without the repeat (a noiseless dense GP is singular at a repeat)
INDEX_UNIQUE = np.delete(INDEX, 5)


def _gp_model(nu, index, y):
    def model(lengthscale, variance, jitter):
        k = Matern(nu, lengthscale, variance)
        numpyro.sample("f", GaussianProcess(k, index, jitter=jitter), obs=y)

    return model


@pytest.mark.parametrize("nu", (0.5, 1.5))
def test_state_space_keeps_jittered_density_and_gradient(nu):
    """log p(y) and its gradient in (ℓ, σ², jitter) after state_space = the dense
    GaussianProcess's (float64, 1e-5 relative; they agree to rounding), for jitter 0 (a
    concrete 0: the noiseless filter; indexes without a repeat) and 1e-3, 0.1, 1 (traced;
    indexes with a repeat)."""

    def value_and_grad(model, transform, argnums):
        def f(*theta):
            return log_density(transform(model), theta, {}, {})[0]

        return jax.jit(jax.value_and_grad(f, argnums=argnums))

    def check(model, thetas, argnums):
        dense_fn = value_and_grad(model, lambda m: m, argnums)
        ss_fn = value_and_grad(model, state_space, argnums)
        for theta in thetas:
            dense, g_dense = dense_fn(*theta)
            ss, g_ss = ss_fn(*theta)
            np.testing.assert_allclose(ss, dense, rtol=1e-5)
            for a, b in zip(g_ss, g_dense, strict=True):
                np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)

    rng = np.random.default_rng(0)
    with jax.enable_x64(True):
        # jitter 0 is a concrete Python 0 (closed over), so the noiseless filter runs
        y0 = rng.normal(size=INDEX_UNIQUE.shape)
        noiseless = _gp_model(nu, INDEX_UNIQUE, y0)
        check(lambda ell, var: noiseless(ell, var, 0.0), [(0.8, 1.3)], (0, 1))
        y = rng.normal(size=INDEX.shape)
        model = _gp_model(nu, INDEX, y)
        check(model, [(0.8, 1.3, j) for j in (1e-3, 0.1, 1.0)], (0, 1, 2))
        site = handlers.trace(state_space(model)).get_trace(0.8, 1.3, 0.1)["f"]
        assert isinstance(site["fn"], StateSpaceGP) and site["fn"].noise == 0.1


def test_state_space_jittered_draws_have_noisy_covariance():
    """Draws of a transformed jittered site have covariance K + jitter·I (20000 draws, every
    entry within 4 standard errors; seed 0)."""
    index = np.array([0.3, 2.0, 0.1, 1.1, 0.3])
    k = Matern(1.5, 0.8, 1.3)
    n = 20000

    def model():
        with numpyro.plate("draws", n):
            numpyro.sample("f", GaussianProcess(k, index, jitter=0.4))

    with jax.enable_x64(True):
        draws = handlers.trace(handlers.seed(state_space(model), 0)).get_trace()["f"]["value"]
    C = np.asarray(k(index, index)) + 0.4 * np.eye(index.size)
    se = np.sqrt((C**2 + np.outer(np.diag(C), np.diag(C))) / n)
    assert np.all(np.abs(np.cov(np.asarray(draws).T) - C) < 4 * se)


def test_gaussian_process_rejects_bad_jitter():
    with pytest.raises(ValueError, match="jitter must be finite and >= 0"):
        GaussianProcess(Matern(0.5), INDEX, jitter=-1e-3)
    with pytest.raises(ValueError, match="jitter must be a scalar"):
        GaussianProcess(Matern(0.5), INDEX, jitter=np.ones(3))


# -- markov_fbm under ppl.inference.SVI with jitted times ------------------------------

TIMES = np.linspace(0.1, 1.0, 10)
Y = 0.3 * np.ones((10, 1))


def _drift(t, x):
    return -x


def _diffusion(t, x):
    return 1.0


def _fbm_model(times, y):
    xs = fbm_sde("x", _drift, _diffusion, jnp.zeros(1), hurst=0.7, times=times, dt=0.02)
    numpyro.sample("obs", dist.Normal(xs, 0.1).to_event(2), obs=y)


def _fbm_guide(times, y):
    c = numpyro.param("c", jnp.zeros(1))
    fbm_sde(
        "x", _drift, _diffusion, jnp.zeros(1), hurst=0.7, times=times, dt=0.02,
        control=lambda t, x, yy: c,
    )  # fmt: skip


def test_markov_fbm_svi_with_traced_times_needs_no_t_end():
    """ppl.inference.SVI passes the times as a traced argument of its compiled step; the
    grid comes from SVI.init's concrete run, and the losses and params equal NumPyro's
    Trace_ELBO + optax.adam loop (which closes over the times, as numpyro.infer.SVI.run
    does) with the same per-step keys (1e-5)."""
    model, guide = markov_fbm(_fbm_model, num_ou=3), markov_fbm(_fbm_guide, num_ou=3)
    svi = SVI(model, guide, optax.adam(0.05), Trace_ELBO())
    state = svi.init(jax.random.PRNGKey(0), TIMES, Y)
    params0 = svi.get_params(state)
    losses = []
    for _ in range(4):
        state, loss = svi.update(state, TIMES, Y)
        losses.append(loss)

    ref_model, ref_guide = markov_fbm(_fbm_model, num_ou=3), markov_fbm(_fbm_guide, num_ou=3)
    elbo, opt = Trace_ELBO(), optax.adam(0.05)

    @jax.jit
    def step(params, opt_state, key):
        loss, grads = jax.value_and_grad(
            lambda p: elbo.loss(key, p, ref_model, ref_guide, TIMES, Y)
        )(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    params, opt_state, ref = params0, opt.init(params0), []
    for i in range(4):
        params, opt_state, loss = step(params, opt_state, jax.random.fold_in(state.rng_key, i))
        ref.append(loss)
    np.testing.assert_allclose(np.array(losses), np.array(ref), rtol=1e-5)
    np.testing.assert_allclose(svi.get_params(state)["c"], params["c"], rtol=1e-5, atol=1e-7)

    # the grid of the compiled step is the one set up at init: times that end elsewhere
    # are refused at run time, naming t_end
    with pytest.raises(Exception, match="t_end"):
        jax.block_until_ready(svi.update(state, 1.5 * TIMES, Y))


def test_markov_fbm_traced_times_without_setup_asks_for_t_end():
    model = markov_fbm(_fbm_model, num_ou=3)

    def log_joint(times):
        return log_density(handlers.seed(model, 0), (times, Y), {}, {})[0]

    with pytest.raises(ValueError, match="fbm_sde 'x'.*give t_end="):
        jax.jit(log_joint)(TIMES)
    # with t_end given, no concrete run is needed
    model_t = markov_fbm(
        lambda times, y: numpyro.sample(
            "obs",
            dist.Normal(
                fbm_sde(
                    "x", _drift, _diffusion, jnp.zeros(1), hurst=0.7, times=times, dt=0.02,
                    t_end=1.0,
                ),
                0.1,
            ).to_event(2),
            obs=y,
        ),
        num_ou=3,
    )  # fmt: skip
    value = jax.jit(lambda t: log_density(handlers.seed(model_t, 0), (t, Y), {}, {})[0])(TIMES)
    assert np.isfinite(value)
