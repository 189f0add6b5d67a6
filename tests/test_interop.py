"""Interop with NumPyro's inference: ppl objectives as ``numpyro.infer.SVI`` losses,
NumPyro ELBOs and ``numpyro.optim`` optimisers in ``ppl.inference.SVI``, and the
``init_params`` / keyword checks of ``ppl.inference.SVI.run``."""

import doctest
import inspect
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import numpyro.optim
import optax
import pytest
from numpyro.contrib.funsor import config_enumerate
from numpyro.infer import SVI as NumPyroSVI
from numpyro.infer import (
    RenyiELBO,
    Trace_ELBO,
    TraceEnum_ELBO,
    TraceGraph_ELBO,
)
from numpyro.infer.svi import _make_loss_fn

import ppl
import ppl.interop
from ppl.inference import SVI
from ppl.transforms.estimators import ENUM, MVD, REINFORCE

key = jax.random.PRNGKey
X = jnp.array([0.9, 1.4, 1.1, 0.6, -0.2, 2.0])


# -- models -------------------------------------------------------------------------


def gauss_model(x):
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
    with numpyro.plate("data", x.shape[0]):
        numpyro.sample("x", dist.Normal(mu, 1.0), obs=x)


def gauss_guide(x):
    m = numpyro.param("m", 0.0)
    s = numpyro.param("s", 1.0, constraint=dist.constraints.positive)
    numpyro.sample("mu", dist.Normal(m, s))


def mixed_model(x):
    """A plate, a reparameterised global and a discrete (REINFORCE) local site."""
    mu = numpyro.sample("mu", dist.Normal(0.0, 2.0))
    with numpyro.plate("data", x.shape[0]):
        c = numpyro.sample("c", dist.Bernoulli(0.5))
        numpyro.sample("x", dist.Normal(mu + 1.5 * c, 1.0), obs=x)


def mixed_guide(x, estimator=None):
    m = numpyro.param("m", 0.3)
    s = numpyro.param("s", 0.8, constraint=dist.constraints.positive)
    numpyro.sample("mu", dist.Normal(m, s))
    logits = numpyro.param("logits", jnp.zeros(x.shape[0]))
    infer = {} if estimator is None else {"estimator": estimator}
    with numpyro.plate("data", x.shape[0]):
        numpyro.sample("c", dist.Bernoulli(logits=logits), infer=infer)


@config_enumerate
def mixture_model(x):
    locs = numpyro.sample("locs", dist.Normal(jnp.array([-1.0, 1.0]), 2.0).to_event(1))
    with numpyro.plate("data", x.shape[0]):
        c = numpyro.sample("c", dist.Categorical(probs=jnp.array([0.4, 0.6])))
        numpyro.sample("x", dist.Normal(locs[c], 1.0), obs=x)


def mixture_guide(x):
    loc = numpyro.param("loc", jnp.array([-0.5, 0.5]))
    scale = numpyro.param("scale", 0.5 * jnp.ones(2), constraint=dist.constraints.positive)
    numpyro.sample("locs", dist.Normal(loc, scale).to_event(1))


# -- reference loops ----------------------------------------------------------------


def numpyro_run(model, guide, optim, loss, rng_key, num_steps, *args):
    """``numpyro.infer.SVI.update`` step by step; returns (losses, step keys, params)."""
    svi = NumPyroSVI(model, guide, optim, loss=loss)
    state = svi.init(rng_key, *args)
    update = jax.jit(svi.update)
    losses, keys = [], []
    for _ in range(num_steps):
        keys.append(jax.random.split(state.rng_key)[1])  # the key SVI.update hands the loss
        state, loss_value = update(state, *args)
        losses.append(loss_value)
    return np.array(losses), keys, svi.optim.get_params(state.optim_state)


def ppl_run(objective, model, guide, optim, keys, *args):
    """``ppl.value_and_grad`` + an optax optimiser with the given per-step keys."""
    params = ppl.init_params(key(0), model, guide, *args)
    f = jax.jit(ppl.value_and_grad(objective, model, guide))
    optim = optax.with_extra_args_support(optim)
    opt_state = optim.init(params)
    losses = []
    for k in keys:
        value, grads = f(params, k, *args)
        loss = -value
        neg = jax.tree_util.tree_map(jnp.negative, grads)
        updates, opt_state = optim.update(neg, opt_state, params, value=loss)
        params = optax.apply_updates(params, updates)
        losses.append(loss)
    return np.array(losses), params


def numpyro_elbo_run(model, guide, optim, elbo, rng_key, keys, *args):
    """NumPyro's SVI step (``_make_loss_fn`` + ``optim.eval_and_update``, exactly what
    ``numpyro.infer.SVI.update`` runs) with the given per-step keys."""
    svi = NumPyroSVI(model, guide, optim, loss=elbo)
    state = svi.init(rng_key, *args)

    @jax.jit
    def step(opt_state, k):
        loss_fn = _make_loss_fn(elbo, k, svi.constrain_fn, model, guide, args, {}, {})
        (loss, _), opt_state = svi.optim.eval_and_update(loss_fn, opt_state)
        return opt_state, loss

    opt_state, losses = state.optim_state, []
    for k in keys:
        opt_state, loss = step(opt_state, k)
        losses.append(loss)
    return np.array(losses), svi.get_params(state._replace(optim_state=opt_state))


def ppl_keys(state, num_steps):
    return [jax.random.fold_in(state.rng_key, i) for i in range(num_steps)]


def close(a, b, tol=1e-5):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol, atol=tol)


# -- (a) a ppl objective as numpyro.infer.SVI's loss ---------------------------------


def test_as_numpyro_loss_elbo_equals_trace_elbo():
    args = (gauss_model, gauss_guide, optax.adam(0.05))
    ours, keys, p1 = numpyro_run(*args, ppl.as_numpyro_loss(ppl.objectives.elbo), key(3), 20, X)
    ref, keys2, p2 = numpyro_run(*args, Trace_ELBO(), key(3), 20, X)
    close(ours, ref)
    assert not np.allclose(ours[0], ours[1:])  # the loss is a fresh estimate each step
    for k in p2:
        close(p1[k], p2[k])


def test_as_numpyro_loss_iwelbo_matches_ppl_trajectory():
    loss = ppl.as_numpyro_loss(ppl.objectives.iwelbo(4))
    ours, keys, params = numpyro_run(
        gauss_model, gauss_guide, optax.adam(0.05), loss, key(4), 20, X
    )
    ref, ref_params = ppl_run(
        ppl.objectives.iwelbo(4), gauss_model, gauss_guide, optax.adam(0.05), keys, X
    )
    close(ours, ref)
    for k in ref_params:
        close(params[k], ref_params[k])


def test_as_numpyro_loss_iwelbo_equals_renyi_alpha0():
    """ppl.particles(K) draws particle k with jax.random.split(rng_key, K)[k], as NumPyro's
    RenyiELBO does, so IWELBO(K) follows RenyiELBO(alpha=0, num_particles=K) exactly."""
    args = (gauss_model, gauss_guide, optax.adam(0.05))
    loss = ppl.as_numpyro_loss(ppl.objectives.iwelbo(3))
    ours, _, _ = numpyro_run(*args, loss, key(5), 10, X)
    ref, _, _ = numpyro_run(*args, RenyiELBO(alpha=0.0, num_particles=3), key(5), 10, X)
    close(ours, ref)


# -- (b) trajectory: numpyro.infer.SVI(loss=as_numpyro_loss) vs ppl ------------------


def test_trajectory_reinforce_model_equals_ppl():
    obj = ppl.objectives.elbo
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # can_infer_discrete: no discrete-site warning
        ours, keys, params = numpyro_run(
            mixed_model, mixed_guide, optax.adam(0.05), ppl.as_numpyro_loss(obj), key(1), 20, X
        )
    ref, ref_params = ppl_run(obj, mixed_model, mixed_guide, optax.adam(0.05), keys, X)
    close(ours, ref)
    assert sorted(params) == ["logits", "m", "s"]
    for k in ref_params:
        close(params[k], ref_params[k])
    # the REINFORCE site did learn: the logits moved away from their init (zeros)
    assert float(jnp.abs(params["logits"]).max()) > 0.05

    # ppl.inference.SVI is exactly this loop with its own keys fold_in(rng_key, i)
    svi = SVI(mixed_model, mixed_guide, optax.adam(0.05), objective=obj)
    res = svi.run(key(1), 20, X, progress_bar=False, chunk_size=8)
    ref2, ref2_params = ppl_run(
        obj, mixed_model, mixed_guide, optax.adam(0.05), ppl_keys(svi.init(key(1), X), 20), X
    )
    close(res.losses, ref2, 1e-6)
    for k in ref2_params:
        close(res.state.params[k], ref2_params[k], 1e-6)


def _elbo_particles3(model, guide, *args, **kwargs):
    with ppl.particles(3):
        return ppl.objectives.elbo(model, guide, *args, **kwargs)


@pytest.mark.parametrize(
    "objective, estimator",
    [
        (ppl.objectives.elbo, None),
        (ppl.objectives.elbo, ENUM()),
        (ppl.objectives.elbo, MVD()),
        (ppl.objectives.iwelbo(3), None),
        (_elbo_particles3, REINFORCE(baseline="loo")),
        ({"model": ppl.objectives.wake_theta(3), "guide": ppl.objectives.wake_phi(3)}, None),
    ],
    ids=["reinforce", "enum", "mvd", "iwelbo", "elbo3-loo", "wake-sleep"],
)
def test_numpyro_loss_gradient_is_the_ppl_estimator(objective, estimator):
    """jax.grad of the loss through NumPyro's constrain_fn is minus ppl's gradient."""

    def guide(x):
        mixed_guide(x, estimator)

    loss = ppl.as_numpyro_loss(objective)
    svi = NumPyroSVI(mixed_model, guide, optax.adam(0.1), loss=loss)
    state = svi.init(key(0), X)
    unc = svi.optim.get_params(state.optim_state)
    unc = {k: v + 0.1 * jnp.arange(jnp.size(v)).reshape(jnp.shape(v)) for k, v in unc.items()}
    k = key(7)
    value, grads = jax.value_and_grad(
        lambda p: loss.loss(k, svi.constrain_fn(p), mixed_model, guide, X)
    )(unc)
    ref_value, ref_grads = ppl.value_and_grad(objective, mixed_model, guide)(unc, k, X)
    close(value, -ref_value)
    for name in ref_grads:
        close(grads[name], -ref_grads[name], 1e-4)
        assert float(jnp.abs(ref_grads[name]).max()) > 0  # every param gets a gradient


def test_as_numpyro_loss_errors():
    with pytest.raises(TypeError, match="expects a ppl objective, got the NumPyro loss"):
        ppl.as_numpyro_loss(Trace_ELBO())
    with pytest.raises(TypeError, match="expects a ppl objective"):
        ppl.as_numpyro_loss("elbo")
    with pytest.raises(ValueError, match="exactly the keys 'model' and 'guide'"):
        ppl.as_numpyro_loss({"model": ppl.objectives.elbo})

    def guide(x):
        mixed_guide(x, REINFORCE(baseline="mean"))

    svi = NumPyroSVI(
        mixed_model, guide, optax.adam(0.1), loss=ppl.as_numpyro_loss(ppl.objectives.elbo)
    )
    state = svi.init(key(0), X)
    with pytest.raises(ValueError, match=r"needs param\(s\) \['c_baseline'\]"):
        svi.update(state, X)


# -- (c) NumPyro ELBOs and optimisers in ppl.inference.SVI ---------------------------

ELBO_CASES = [  # (id, model, guide, ELBO factory, optimizer kind)
    ("trace-optax", gauss_model, gauss_guide, Trace_ELBO, "optax"),
    ("trace-numpyro", gauss_model, gauss_guide, Trace_ELBO, "numpyro"),
    ("tracegraph-optax", mixed_model, mixed_guide, TraceGraph_ELBO, "optax"),
    ("tracegraph-numpyro", mixed_model, mixed_guide, TraceGraph_ELBO, "numpyro"),
    ("traceenum-numpyro", mixture_model, mixture_guide, TraceEnum_ELBO, "numpyro"),
    (
        "renyi-optax",
        gauss_model,
        gauss_guide,
        lambda: RenyiELBO(alpha=0.5, num_particles=3),
        "optax",
    ),
    ("trace-k2-optax", mixed_model, mixed_guide, lambda: Trace_ELBO(num_particles=2), "optax"),
]


@pytest.mark.parametrize(
    "name, model, guide, make_elbo, optimizer", ELBO_CASES, ids=[c[0] for c in ELBO_CASES]
)
def test_ppl_svi_with_numpyro_elbo_equals_numpyro(name, model, guide, make_elbo, optimizer):
    """Same loss sequence and params as NumPyro's SVI step under the same per-step keys."""

    def make_optim():
        return optax.adam(0.05) if optimizer == "optax" else numpyro.optim.Adam(0.05)

    svi = SVI(model, guide, make_optim(), objective=make_elbo())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Trace_ELBO warns about the discrete site
        res = svi.run(key(2), 15, X, progress_bar=False, chunk_size=6)
        keys = ppl_keys(svi.init(key(2), X), 15)
        ref, ref_params = numpyro_elbo_run(model, guide, make_optim(), make_elbo(), key(0), keys, X)
    assert np.all(np.isfinite(res.losses))
    close(res.losses, ref)
    assert sorted(res.params) == sorted(ref_params)
    for k in ref_params:
        close(res.params[k], ref_params[k])


def test_numpyro_optimizers_equal_numpyro_svi():
    """ppl.inference.SVI(optimizer=numpyro.optim.X) follows numpyro.infer.SVI exactly when
    the loss is deterministic (a Delta guide: MAP)."""

    def guide(x):
        numpyro.sample("mu", dist.Delta(numpyro.param("m", 0.3)))

    for optim in (
        lambda: numpyro.optim.Adam(0.05),
        lambda: numpyro.optim.ClippedAdam(0.05, clip_norm=0.5),
        lambda: numpyro.optim.SGD(0.01),
        lambda: numpyro.optim.Momentum(0.01, 0.9),
    ):
        res = SVI(gauss_model, guide, optim(), objective=Trace_ELBO()).run(
            key(0), 25, X, progress_bar=False
        )
        ref = NumPyroSVI(gauss_model, guide, optim(), Trace_ELBO()).run(
            key(0), 25, X, progress_bar=False
        )
        close(res.losses, ref.losses, 1e-6)
        close(res.params["m"], ref.params["m"], 1e-6)


def test_numpyro_optimizer_checkpoint_resume_is_bit_identical(tmp_path):
    def make():
        return SVI(gauss_model, gauss_guide, numpyro.optim.Adam(0.05))

    full = make().run(key(0), 20, X, progress_bar=False, chunk_size=5)
    make().run(key(0), 10, X, progress_bar=False, checkpoint=tmp_path, checkpoint_every=5)
    resumed = make().resume(tmp_path, 20, X, progress_bar=False, chunk_size=5)
    np.testing.assert_array_equal(np.asarray(resumed.losses), np.asarray(full.losses))
    for k in full.params:
        np.testing.assert_array_equal(np.asarray(resumed.params[k]), np.asarray(full.params[k]))
    with pytest.raises(ValueError, match="different model/optimizer"):  # optax state != Adam
        SVI(gauss_model, gauss_guide, optax.adam(0.05)).resume(tmp_path, 20, X)


def test_ppl_svi_accepts_as_numpyro_loss_and_rejects_bad_optimizers():
    a = SVI(gauss_model, gauss_guide, optax.adam(0.05), ppl.as_numpyro_loss(ppl.objectives.elbo))
    b = SVI(gauss_model, gauss_guide, optax.adam(0.05), ppl.objectives.elbo)
    ra = a.run(key(0), 5, X, progress_bar=False)
    rb = b.run(key(0), 5, X, progress_bar=False)
    np.testing.assert_array_equal(np.asarray(ra.losses), np.asarray(rb.losses))
    with pytest.raises(TypeError, match="numpyro.optim.Minimize.*not supported"):
        SVI(gauss_model, gauss_guide, numpyro.optim.Minimize())
    with pytest.raises(TypeError, match="optax.GradientTransformation.*numpyro.optim"):
        SVI(gauss_model, gauss_guide, "adam")


# -- (d) run(init_params=...) and keyword checks -------------------------------------


def test_run_init_params_starts_there():
    svi = SVI(gauss_model, gauss_guide, optax.adam(0.05))
    start = {"m": 1.25, "s": 0.4}
    res = svi.run(key(0), 5, X, progress_bar=False, init_params=start)
    state0 = svi.init(key(0), X, init_params=start)
    got = svi.get_params(state0)
    close(got["m"], 1.25, 1e-7)
    close(got["s"], 0.4, 1e-6)
    # the loss at those params with step 0's key, computed independently
    unc = {"m": jnp.float32(1.25), "s": jnp.log(jnp.float32(0.4))}
    k0 = jax.random.fold_in(jax.random.split(key(0))[0], 0)
    value, _ = ppl.value_and_grad(ppl.objectives.elbo, gauss_model, gauss_guide)(unc, k0, X)
    close(res.losses[0], -value, 1e-6)
    default = svi.run(key(0), 5, X, progress_bar=False)
    assert abs(float(default.losses[0]) - float(res.losses[0])) > 1e-3
    # only some params given: the others keep their init values
    half = svi.get_params(svi.init(key(0), X, init_params={"s": 2.0}))
    close(half["m"], 0.0, 0)
    close(half["s"], 2.0, 1e-6)


def test_run_init_params_errors_before_compiling():
    svi = SVI(gauss_model, gauss_guide, numpyro.optim.Adam(0.05))
    with pytest.raises(ValueError, match=r"unknown param name\(s\) \['loc'\].*\['m', 's'\]"):
        svi.run(key(0), 5, X, progress_bar=False, init_params={"loc": 1.0})
    with pytest.raises(ValueError, match=r"init_params\['s'\] is outside the support"):
        svi.run(key(0), 5, X, progress_bar=False, init_params={"s": -1.0})
    with pytest.raises(ValueError, match=r"init_params\['m'\] has shape \(3,\)"):
        svi.run(key(0), 5, X, progress_bar=False, init_params={"m": jnp.ones(3)})
    with pytest.raises(TypeError, match="init_params must be a dict"):
        svi.run(key(0), 5, X, progress_bar=False, init_params=[1.0])
    state = svi.init(key(0), X)
    with pytest.raises(ValueError, match="both init_state and init_params"):
        svi.run(None, 5, X, progress_bar=False, init_state=state, init_params={"m": 1.0})
    assert svi._jit_chunk._cache_size() == 0


def test_run_rejects_unknown_keywords():
    svi = SVI(gauss_model, gauss_guide, optax.adam(0.05))
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['lr'\].*chunk_size"):
        svi.run(key(0), 5, X, progress_bar=False, lr=0.1)
    with pytest.raises(TypeError, match="forward_mode_differentiation"):
        svi.run(key(0), 5, X, progress_bar=False, forward_mode_differentiation=True)
    with pytest.raises(ValueError, match="stable_update=False is not supported"):
        svi.run(key(0), 5, X, progress_bar=False, stable_update=False)
    with pytest.raises(TypeError, match="stable_update must be True or False"):
        svi.run(key(0), 5, X, progress_bar=False, stable_update="yes")
    with pytest.raises(TypeError, match=r"\['lr'\]"):
        svi.resume("nowhere", 5, X, lr=0.1)
    assert svi._jit_chunk._cache_size() == 0
    res = svi.run(key(0), 5, X, progress_bar=False, stable_update=True)
    assert res.losses.shape == (5,)

    # keywords of the model and guide still pass through; one the guide lacks is refused
    def model(x, shift=0.0):
        gauss_model(x - shift)

    def guide(x, shift=0.0):
        gauss_guide(x)

    def guide_no_shift(x):
        gauss_guide(x)

    def guide_any(x, **kw):
        gauss_guide(x)

    r0 = SVI(model, guide, optax.adam(0.05)).run(key(0), 5, X, progress_bar=False)
    r1 = SVI(model, guide, optax.adam(0.05)).run(key(0), 5, X, progress_bar=False, shift=1.0)
    assert not np.allclose(r0.losses, r1.losses)
    r2 = SVI(model, guide_any, optax.adam(0.05)).run(key(0), 5, X, progress_bar=False, shift=1.0)
    close(r1.losses, r2.losses, 0)
    with pytest.raises(TypeError, match=r"'shift' \(not a parameter of the guide\)"):
        SVI(model, guide_no_shift, optax.adam(0.05)).run(key(0), 5, X, shift=1.0)


def test_run_signature_matches_numpyro_options():
    """Every keyword of numpyro.infer.SVI.run is an option of ours or refused by name."""
    ours = inspect.signature(SVI.run).parameters
    theirs = inspect.signature(NumPyroSVI.run).parameters
    svi = SVI(gauss_model, gauss_guide, optax.adam(0.05))
    for name, p in theirs.items():
        if p.kind is not inspect.Parameter.KEYWORD_ONLY and p.default is inspect.Parameter.empty:
            continue
        if name in ours or name in ("self", "args", "kwargs"):
            continue
        with pytest.raises(TypeError, match=name):
            svi.run(key(0), 5, X, **{name: p.default})


def test_interop_docstring_examples():
    result = doctest.testmod(ppl.interop, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
