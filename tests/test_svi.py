"""ppl.inference.SVI: convergence to a closed-form posterior, update/run/chunk agreement,
minibatches (subsample plates and explicit batch iterators), the NaN/inf guard,
checkpoint/resume (bit-identical), corrupt/foreign checkpoints, data parallelism on 4
simulated CPU devices, the progress bar and bad input."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
import pytest

import ppl
from ppl.inference import SVI, SVIRunResult, SVIState
from ppl.inference.checkpoint import CHECKPOINT_FILE, load_checkpoint, save_checkpoint
from ppl.inference.svi import SVINonFiniteError

# --- a conjugate Gaussian model: mu ~ N(0, 1), x_i ~ N(mu, 1) -----------------------------

X = jax.random.normal(jax.random.PRNGKey(3), (20,)) + 1.0
POST_MEAN = float(X.sum() / (X.shape[0] + 1))  # exact posterior N(sum x / (n+1), 1/(n+1))
POST_SD = float(1.0 / np.sqrt(X.shape[0] + 1))


def gauss_model(x):
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
    with numpyro.plate("data", x.shape[0]):
        numpyro.sample("x", dist.Normal(mu, 1.0), obs=x)


def gauss_guide(x):
    m = numpyro.param("m", 0.0)
    s = numpyro.param("s", 1.0, constraint=dist.constraints.positive)
    numpyro.sample("mu", dist.Normal(m, s))


def sub_model(x):
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
    with numpyro.plate("data", x.shape[0], subsample_size=5) as i:
        numpyro.sample("x", dist.Normal(mu, 1.0), obs=x[i])


def elbo8(model, guide, *args, **kwargs):
    with ppl.particles(8):
        return ppl.objectives.elbo(model, guide, *args, **kwargs)


def key(i=0):
    return jax.random.PRNGKey(i)


# --- convergence, update vs run, chunking ---------------------------------------------------


def test_fits_exact_gaussian_posterior_and_loss_decreases():
    opt = optax.adam(optax.exponential_decay(0.05, 1500, 0.02))
    svi = SVI(gauss_model, gauss_guide, opt, objective=elbo8)
    res = svi.run(key(0), 1500, X, progress_bar=False)
    assert isinstance(res, SVIRunResult) and isinstance(res.state, SVIState)
    assert res.losses.shape == (1500,) and np.all(np.isfinite(res.losses))
    assert np.mean(res.losses[-100:]) < np.mean(res.losses[:100]) - 1.0
    # tolerance: 0.15 posterior sd for the mean, 10% for the sd (Monte-Carlo gradients)
    assert abs(float(res.params["m"]) - POST_MEAN) < 0.15 * POST_SD
    assert abs(float(res.params["s"]) - POST_SD) < 0.1 * POST_SD
    # losses are -ELBO (NumPyro convention): at the optimum the ELBO equals log p(x)
    n = X.shape[0]
    log_evidence = float(
        dist.MultivariateNormal(jnp.zeros(n), jnp.eye(n) + jnp.ones((n, n))).log_prob(X)
    )
    assert abs(np.mean(res.losses[-200:]) + log_evidence) < 0.05
    # get_params returns constrained values; state.params are unconstrained
    assert np.allclose(np.log(res.params["s"]), res.state.params["s"], atol=1e-6)


def test_update_run_and_chunking_agree():
    svi = SVI(gauss_model, gauss_guide, optax.adam(0.05))
    ref = svi.run(key(1), 30, X, progress_bar=False, chunk_size=30)
    for chunk in (1, 7):
        res = svi.run(key(1), 30, X, progress_bar=False, chunk_size=chunk)
        assert np.array_equal(res.losses, ref.losses), chunk
        for k in ref.params:
            assert np.array_equal(res.params[k], ref.params[k])
    state = svi.init(key(1), X)
    losses = []
    for _ in range(30):
        state, loss = svi.update(state, X)
        losses.append(loss)
    np.testing.assert_allclose(losses, ref.losses, rtol=1e-6, atol=1e-6)
    assert int(state.step) == 30
    # evaluate: the loss with the key of the next step, without updating
    before = jax.tree_util.tree_map(np.asarray, state.params)
    value = svi.evaluate(state, X)
    _, loss = svi.update(state, X)
    np.testing.assert_allclose(value, loss, rtol=1e-6)
    assert all(np.array_equal(before[k], state.params[k]) for k in before)
    # run(init_state=...) continues the same sequence of steps
    half = svi.run(key(1), 12, X, progress_bar=False, chunk_size=7)  # reuses the 7-step chunk
    rest = svi.run(None, 18, X, progress_bar=False, init_state=half.state, chunk_size=7)
    assert np.array_equal(np.concatenate([half.losses, rest.losses]), ref.losses)


def test_subsample_plate_minibatches_and_typed_keys():
    svi = SVI(sub_model, gauss_guide, optax.adam(0.05))
    res = svi.run(jax.random.key(0), 60, X, progress_bar=False, chunk_size=60)
    res2 = svi.run(jax.random.key(0), 60, X, progress_bar=False, chunk_size=25)
    assert np.array_equal(res.losses, res2.losses)
    assert np.mean(res.losses[-10:]) < np.mean(res.losses[:10])
    other = svi.run(jax.random.key(1), 60, X, progress_bar=False, chunk_size=60)
    assert not np.array_equal(res.losses, other.losses)  # the key drives the subsample


def _batch_model(x, y, scale):
    w = numpyro.param("w", jnp.zeros(2))
    with numpyro.plate("data", x.shape[0]):
        numpyro.sample("y", dist.Normal(x @ w, scale), obs=y)


def _batch_guide(x, y, scale):
    pass


def _batches(n, size=8, seed=0, fail_at=None):
    rng = np.random.default_rng(seed)
    w_true = np.array([1.5, -0.5], np.float32)
    for i in range(n):
        if i == fail_at:
            raise KeyboardInterrupt("simulated kill")
        x = rng.normal(size=(size, 2)).astype(np.float32)
        yield x, (x @ w_true + 0.1 * rng.normal(size=size)).astype(np.float32)


def test_batch_iterator():
    svi = SVI(_batch_model, _batch_guide, optax.adam(0.1))
    res = svi.run(key(0), 120, 0.1, batches=_batches(120), progress_bar=False, chunk_size=50)
    np.testing.assert_allclose(res.params["w"], [1.5, -0.5], atol=0.1)
    # explicit loop with update on the same batches gives the same losses
    state = svi.init(key(0), *next(_batches(1)), 0.1)
    losses = []
    for xb, yb in _batches(120):
        state, loss = svi.update(state, xb, yb, 0.1)
        losses.append(loss)
    np.testing.assert_allclose(losses, res.losses, rtol=1e-5, atol=1e-5)
    # dict batches become keyword arguments
    dict_batches = ({"x": a, "y": b} for a, b in _batches(120))
    res_kw = svi.run(
        key(0), 120, batches=dict_batches, scale=0.1, progress_bar=False, chunk_size=50
    )
    np.testing.assert_allclose(res_kw.losses, res.losses, rtol=1e-6)
    with pytest.raises(ValueError, match="batches ran out at step 30"):
        svi.run(key(0), 40, 0.1, batches=_batches(30), progress_bar=False)
    with pytest.raises(ValueError, match="batches has 3 items but num_steps=5"):
        svi.run(key(0), 5, 0.1, batches=list(_batches(3)), progress_bar=False)
    bad = list(_batches(3))
    bad[2] = (bad[2][0], np.full(8, np.nan, np.float32))
    with pytest.raises(ValueError, match="batch for step 2: argument 1 contains NaN"):
        svi.run(key(0), 3, 0.1, batches=bad, progress_bar=False)


# --- NaN / inf guard ------------------------------------------------------------------------


def cliff_model():
    theta = numpyro.param("theta", 0.0)
    numpyro.sample("z", dist.Normal(0.0, 1.0))
    # pulls theta towards 3, but value and gradient are NaN once theta > 1
    numpyro.factor("cliff", -((theta - 3.0) ** 2) + 0.0 * jnp.sqrt(1.0 - theta))


def cliff_guide():
    numpyro.sample("z", dist.Normal(numpyro.param("m", 0.0), 1.0))


def test_nan_guard_keeps_last_good_state_and_names_the_site(tmp_path):
    svi = SVI(cliff_model, cliff_guide, optax.sgd(0.04))
    with pytest.raises(FloatingPointError, match=r"param sites \['theta'\]") as info:
        svi.run(
            key(0), 200, progress_bar=False, chunk_size=7, max_bad_steps=5,
            checkpoint=tmp_path, checkpoint_every=3,
        )  # fmt: skip
    err = info.value
    assert isinstance(err, SVINonFiniteError) and err.sites == ["theta"]
    good = err.state
    theta = float(good.params["theta"])
    assert 1.0 < theta < 1.3  # the last accepted step crossed the cliff; nothing after it
    last_good = int(good.step)
    assert err.step == last_good + 4 and f"stopped at step {err.step}" in str(err)
    assert err.losses.shape == (last_good,) and np.all(np.isfinite(err.losses))
    assert int(good.num_bad) == 0
    # the last checkpoint is the last good state
    resumed_state, losses = svi._load(tmp_path, _meta(tmp_path), (), {})
    assert int(resumed_state.step) == last_good
    assert np.array_equal(resumed_state.params["theta"], good.params["theta"])
    assert np.array_equal(losses, err.losses)
    # the same run without the cliff's step size: update() rejects, never raises
    state, loss = svi.update(good)
    assert not np.isfinite(loss) and int(state.num_bad) == 1
    assert bool(state.nonfinite_grads["theta"]) and not bool(state.nonfinite_grads["m"])
    assert np.array_equal(state.params["theta"], good.params["theta"])


def spiky_model():
    z = numpyro.sample("z", dist.Normal(0.0, 1.0))
    numpyro.factor("spike", jnp.where(z > 1.5, jnp.nan, 0.0))


def spiky_guide():
    numpyro.sample("z", dist.Normal(numpyro.param("m", 0.0), 1.0))


def test_sporadic_nan_steps_are_rejected_and_run_finishes():
    svi = SVI(spiky_model, spiky_guide, optax.adam(0.01))
    res = svi.run(key(0), 200, progress_bar=False)
    bad = ~np.isfinite(res.losses)
    assert 0 < bad.sum() < 40 and np.isfinite(res.params["m"])
    assert int(res.state.step) == 200


def test_library_objectives_wake_sleep_and_per_site_estimators():
    from ppl.transforms import REINFORCE, estimators

    def model(x):
        loc = numpyro.param("loc", 0.0)
        c = numpyro.sample("c", dist.Bernoulli(0.5))
        mu = numpyro.sample("mu", dist.Normal(loc + c, 1.0))
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("x", dist.Normal(mu, 1.0), obs=x)

    def guide(x):
        p = numpyro.param("p", 0.5, constraint=dist.constraints.unit_interval)
        numpyro.sample("c", dist.Bernoulli(p))
        numpyro.sample("mu", dist.Normal(numpyro.param("m", 0.0), 1.0))

    g = estimators(guide, {"c": REINFORCE(baseline="mean")})
    wake_sleep = {"model": ppl.objectives.wake_theta(3), "guide": ppl.objectives.wake_phi(3)}
    for objective in (ppl.objectives.iwelbo(3), wake_sleep):
        res = SVI(model, g, optax.adam(0.05), objective=objective).run(
            key(0), 30, X, progress_bar=False
        )
        assert np.all(np.isfinite(res.losses))
        assert set(res.params) == {"loc", "p", "m", "c_baseline"}
        assert 0.0 < float(res.params["p"]) < 1.0


# --- checkpoint / resume ------------------------------------------------------------------


def _meta(path):
    from ppl.inference.checkpoint import read_metadata

    return read_metadata(path)


def test_resume_is_bit_identical(tmp_path):
    def make():
        return SVI(sub_model, gauss_guide, optax.adam(0.05))

    full = make().run(
        key(4), 40, X, progress_bar=False, checkpoint=tmp_path / "a", checkpoint_every=10
    )
    first = make().run(
        key(4), 20, X, progress_bar=False, checkpoint=tmp_path / "b", checkpoint_every=10
    )
    assert np.array_equal(first.losses, full.losses[:20])
    assert sorted(os.listdir(tmp_path / "b")) == [CHECKPOINT_FILE]  # no temp files left
    resumed = make().resume(tmp_path / "b", 40, X, progress_bar=False, chunk_size=3)
    assert resumed.losses.shape == (40,)
    assert np.array_equal(resumed.losses, full.losses)
    for k in full.params:
        assert np.array_equal(resumed.params[k], full.params[k])
    flat_a = jax.tree_util.tree_leaves(full.state.opt_state)
    flat_b = jax.tree_util.tree_leaves(resumed.state.opt_state)
    assert all(np.array_equal(a, b) for a, b in zip(flat_a, flat_b, strict=True))
    assert _meta(tmp_path / "b")["step"] == 40
    # resuming a finished run returns it unchanged
    again = make().resume(tmp_path / "b", 40, X, progress_bar=False)
    assert np.array_equal(again.losses, full.losses)
    with pytest.raises(ValueError, match="smaller than the 40 steps"):
        make().resume(tmp_path / "b", 30, X)


def test_resume_after_a_kill_with_batches_and_typed_key(tmp_path):
    def make():
        return SVI(_batch_model, _batch_guide, optax.adam(0.1))

    full = make().run(jax.random.key(2), 40, 0.1, batches=_batches(40), progress_bar=False)
    with pytest.raises(KeyboardInterrupt):
        make().run(
            jax.random.key(2), 40, 0.1, batches=_batches(40, fail_at=27), progress_bar=False,
            checkpoint=tmp_path, checkpoint_every=10, chunk_size=4,
        )  # fmt: skip
    assert _meta(tmp_path)["step"] == 20
    resumed = make().resume(tmp_path, 40, 0.1, batches=_batches(40), progress_bar=False)
    assert np.array_equal(resumed.losses, full.losses)
    assert jax.numpy.issubdtype(resumed.state.rng_key.dtype, jax.dtypes.prng_key)


def test_corrupt_truncated_and_foreign_checkpoints(tmp_path):
    svi = SVI(gauss_model, gauss_guide, optax.adam(0.05))
    good = tmp_path / "good"
    svi.run(key(0), 5, X, progress_bar=False, checkpoint=good)
    data = (good / CHECKPOINT_FILE).read_bytes()

    def write(name, payload):
        d = tmp_path / name
        d.mkdir()
        (d / CHECKPOINT_FILE).write_bytes(payload)
        return d

    cases = {
        "truncated": write("truncated", data[: len(data) // 2]),
        "garbage": write("garbage", b"not a checkpoint at all" * 10),
        "flipped": write("flipped", data[:300] + bytes([data[300] ^ 0xFF]) + data[301:]),
    }
    for d in cases.values():
        with pytest.raises(ValueError, match="corrupt"):
            svi.resume(d, 10, X, progress_bar=False)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    np.savez(foreign / CHECKPOINT_FILE, a=np.ones(3))
    with pytest.raises(ValueError, match="not a ppl checkpoint"):
        svi.resume(foreign, 10, X, progress_bar=False)
    with pytest.raises(FileNotFoundError):
        svi.resume(tmp_path / "missing", 10, X)

    def other_guide(x):
        loc = numpyro.param("loc", jnp.zeros(3))
        numpyro.sample("mu", dist.Normal(loc.sum(), 1.0))

    with pytest.raises(ValueError, match=r"different model: expected params \{'loc'"):
        SVI(gauss_model, other_guide, optax.adam(0.05)).resume(good, 10, X)
    with pytest.raises(ValueError, match="different model/optimizer"):
        SVI(gauss_model, gauss_guide, optax.sgd(0.05)).resume(good, 10, X)


def test_checkpoint_module_roundtrip_and_validation(tmp_path):
    import ml_dtypes

    tree = {"a": jnp.arange(3.0), "b": (jnp.int32(4), np.ones((2, 2), ml_dtypes.bfloat16))}
    save_checkpoint(tmp_path, tree, metadata={"step": 4})
    out, meta = load_checkpoint(tmp_path, like=tree)
    assert meta["step"] == 4 and out["b"][1].dtype == jnp.bfloat16
    assert all(
        np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(
            jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(out), strict=True
        )
    )
    msg = r"expected \[\['a'\]: float32\(4,\)\], found \[\['a'\]: float32\(3,\)\]"
    with pytest.raises(ValueError, match=msg):
        load_checkpoint(tmp_path, like={**tree, "a": jnp.zeros(4)})


# --- data parallelism ---------------------------------------------------------------------

# A Bayesian logistic regression with a subsampled data plate, shared by the scripts below.
_LOGISTIC = textwrap.dedent(
    """
    import jax.numpy as jnp, numpy as np, numpyro, numpyro.distributions as dist, optax
    from ppl.inference import SVI

    def model(x, y):
        w = numpyro.sample("w", dist.Normal(jnp.zeros(3), 1.0).to_event(1))
        b = numpyro.sample("b", dist.Normal(0.0, 1.0))
        with numpyro.plate("data", x.shape[0], subsample_size=32) as i:
            numpyro.sample("y", dist.Bernoulli(logits=x[i] @ w + b), obs=y[i])

    def guide(x, y):
        loc = numpyro.param("loc", jnp.zeros(3))
        scale = numpyro.param("scale", jnp.ones(3), constraint=dist.constraints.positive)
        numpyro.sample("w", dist.Normal(loc, scale).to_event(1))
        numpyro.sample("b", dist.Normal(numpyro.param("b_loc", 0.0), 0.5))

    def flat(res):
        params = [np.asarray(res.params[k]).ravel() for k in sorted(res.params)]
        return np.concatenate([np.asarray(res.losses)] + params)

    rng = np.random.default_rng(0)
    x = rng.normal(size=(128, 3)).astype(np.float32)
    y = (x @ np.array([1.0, -2.0, 0.5]) + 0.3 > rng.normal(size=128)).astype(np.float32)
    """
)

_SHARDED = _LOGISTIC + textwrap.dedent(
    """
    import sys
    import jax
    from jax.sharding import Mesh, PartitionSpec

    assert len(jax.devices()) == 4, jax.devices()
    svi = SVI(model, guide, optax.adam(0.05))
    one = svi.run(jax.random.PRNGKey(0), 50, x, y, progress_bar=False, chunk_size=20)
    mesh = Mesh(np.array(jax.devices()), ("data",))
    four = svi.run(jax.random.PRNGKey(0), 50, x, y, progress_bar=False, chunk_size=20,
                   mesh=mesh)
    np.testing.assert_allclose(four.losses, one.losses, rtol=1e-5, atol=1e-5)
    for k in one.params:
        np.testing.assert_allclose(four.params[k], one.params[k], rtol=1e-5, atol=1e-5)
    loc = four.state.params["loc"]
    assert len(loc.sharding.device_set) == 4 and loc.sharding.is_fully_replicated
    placed = SVI._shard_args([x, y, np.float32(1.0)], mesh, "data")
    assert placed[0].sharding.spec == PartitionSpec("data")
    assert len(placed[0].addressable_shards) == 4
    assert placed[0].addressable_shards[0].data.shape == (32, 3)
    assert placed[2].sharding.is_fully_replicated
    # the 1-device reference for the 2-process test (40 steps; same compiled chunk)
    np.save(sys.argv[1], flat(svi.run(jax.random.PRNGKey(0), 40, x, y, progress_bar=False,
                                      chunk_size=20)))

    def bmodel(xb, yb):
        w = numpyro.param("w", jnp.zeros(3))
        with numpyro.plate("data", xb.shape[0]):
            numpyro.sample("y", dist.Bernoulli(logits=xb @ w), obs=yb)

    def bguide(xb, yb):
        pass

    batches = [(x[i : i + 16], y[i : i + 16]) for i in range(0, 128, 16)] * 7
    bsvi = SVI(bmodel, bguide, optax.adam(0.05))
    b1 = bsvi.run(jax.random.PRNGKey(1), 50, batches=batches, progress_bar=False)
    b4 = bsvi.run(jax.random.PRNGKey(1), 50, batches=batches, progress_bar=False, mesh=mesh)
    np.testing.assert_allclose(b4.losses, b1.losses, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(b4.params["w"], b1.params["w"], rtol=1e-5, atol=1e-5)
    print("SHARDED-OK")
    """
)

_MULTIPROCESS = _LOGISTIC + textwrap.dedent(
    """
    import sys
    import jax
    from jax.sharding import Mesh

    pid, port, ckpt = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=pid)
    assert len(jax.devices()) == 4 and len(jax.local_devices()) == 2
    x, y = x[pid * 64 : (pid + 1) * 64], y[pid * 64 : (pid + 1) * 64]  # this process's rows
    mesh = Mesh(np.array(jax.devices()), ("data",))
    svi = SVI(model, guide, optax.adam(0.05))  # one object: run and resume share a compile
    opts = dict(mesh=mesh, progress_bar=False)
    svi.run(jax.random.PRNGKey(0), 20, x, y, checkpoint=ckpt, checkpoint_every=10, **opts)
    np.save(f"{ckpt}-{pid}.npy", flat(svi.resume(ckpt, 40, x, y, **opts)))
    """
)


@pytest.fixture(scope="module")
def four_devices(tmp_path_factory):
    """Run the 4-simulated-device script once; return (completed process, reference)."""
    tmp = tmp_path_factory.mktemp("sharded")
    script = tmp / "sharded.py"
    script.write_text(_SHARDED)
    env = {
        **os.environ,
        "XLA_FLAGS": os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4",
        "JAX_PLATFORMS": "cpu",
    }
    ref = tmp / "ref40.npy"
    out = subprocess.run(
        [sys.executable, str(script), str(ref)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return out, ref


def test_four_simulated_devices_equal_one_device(four_devices):
    """50 steps on a 4-device mesh (data sharded, params replicated) equal 1 device to 1e-5,
    with a subsample plate and with a batch iterator."""
    out, _ = four_devices
    assert out.returncode == 0, out.stderr[-4000:]
    assert "SHARDED-OK" in out.stdout


@pytest.mark.slow  # two processes; the sharded single-process test stays in the default suite
def test_two_processes_with_jax_distributed_equal_one_process(tmp_path, four_devices):
    """2 processes x 2 CPU devices (jax.distributed, gloo), each feeding half the rows,
    with a checkpoint and a resume, give the single-process result."""
    import socket

    out, ref = four_devices
    assert out.returncode == 0, out.stderr[-4000:]
    script = tmp_path / "mp.py"
    script.write_text(_MULTIPROCESS)
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = str(s.getsockname()[1])
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2",
    }
    ck = str(tmp_path / "ck")
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(i), port, ck],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    if any(p.returncode for p in procs) and any(
        "jax_cpu_collectives_implementation" in log for log in logs
    ):
        pytest.skip("CPU collectives (gloo) unavailable here: " + logs[0][-300:])
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
    expected = np.load(ref)
    for i in range(2):
        np.testing.assert_allclose(np.load(f"{ck}-{i}.npy"), expected, rtol=1e-5, atol=1e-5)


# --- progress bar and bad input -----------------------------------------------------------


def test_progress_bar_updates_per_chunk_only_on_a_tty(monkeypatch, capsys):
    svi = SVI(gauss_model, gauss_guide, optax.adam(0.05))
    svi.run(key(0), 30, X, chunk_size=10)  # stdout is not a TTY under pytest: no bar
    assert "SVI" not in capsys.readouterr().err
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    svi.run(key(0), 30, X, chunk_size=10)
    err = capsys.readouterr().err
    assert "30/30" in err and "loss" in err
    svi.run(key(0), 30, X, chunk_size=10, progress_bar=False)
    assert capsys.readouterr().err == ""


def test_bad_input_is_rejected_before_compiling(tmp_path):
    import numpyro.optim

    svi = SVI(gauss_model, gauss_guide, optax.adam(0.05))
    for steps in (0, -3):
        with pytest.raises(ValueError, match="num_steps must be an integer >= 1"):
            svi.run(key(0), steps, X)
    for steps in (2.5, True, "10"):
        with pytest.raises(TypeError, match="num_steps"):
            svi.run(key(0), steps, X)
    with pytest.raises(ValueError, match="checkpoint_every must be an integer >= 1, got 0"):
        svi.run(key(0), 10, X, checkpoint=tmp_path, checkpoint_every=0)
    with pytest.raises(ValueError, match="checkpoint_every needs checkpoint"):
        svi.run(key(0), 10, X, checkpoint_every=5)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is not a directory"):
        svi.run(key(0), 10, X, checkpoint=tmp_path / "file")
    for name in ("chunk_size", "max_bad_steps"):
        with pytest.raises(ValueError, match=name):
            svi.run(key(0), 10, X, **{name: 0})
    with pytest.raises(ValueError, match="argument 0 contains NaN"):
        svi.run(key(0), 10, X.at[3].set(jnp.nan))
    with pytest.raises(ValueError, match="argument 'x' contains NaN"):
        svi.init(key(0), x=X.at[3].set(jnp.inf))
    with pytest.raises(TypeError, match="rng_key must be a single JAX PRNG key"):
        svi.run(0, 10, X)
    with pytest.raises(ValueError, match="data_axis='batch' is not an axis"):
        svi.run(key(0), 10, X, mesh=jax.sharding.Mesh(jax.devices()[:1], ("data",)),
                data_axis="batch")  # fmt: skip
    with pytest.raises(TypeError, match="batches must be an iterable"):
        svi.run(key(0), 10, X, batches=3)
    assert svi._jit_chunk._cache_size() == 0 and svi._jit_step._cache_size() == 0
    assert not (tmp_path / "file2").exists()
    with pytest.raises(TypeError, match=r"optax.GradientTransformation.*numpyro.optim"):
        SVI(gauss_model, gauss_guide, numpyro.optim.Minimize())  # not gradient-based
    with pytest.raises(TypeError, match="optax.GradientTransformation"):
        SVI(gauss_model, gauss_guide, "adam")
    with pytest.raises(TypeError, match="model must be a callable"):
        SVI(None, gauss_guide, optax.adam(0.1))
