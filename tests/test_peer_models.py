"""Peer corpus: model/guide pairs rewritten from Pyro and NumPyro, checked against NumPyro.

The cases are rewritten in NumPyro syntax (not copied) from Pyro's
``tests/infer/test_valid_models.py`` and ``tests/infer/test_enum.py``, NumPyro's
``test/infer/test_svi.py`` and ``test/contrib/test_enum_elbo.py``, and NumPyro's
``examples/``. Every case runs under ``ppl.objectives.elbo``, ``iwelbo(3)`` and
``renyi(0.5, 3)``; the reference depends on the case's ``kind``:

``exact`` (reparameterised latents only)
    elbo: ``-Trace_ELBO().loss(key, ...)``; iwelbo/renyi: ``-RenyiELBO(alpha, 3).loss(key,
    ...)`` (alpha = 0 for iwelbo), value and gradient under the same key to 1e-5. Where
    RenyiELBO refuses the case (a subsampled plate that does not enclose every site),
    :func:`hand_renyi` does the same computation without the refusal.
``enum`` (discrete sites enumerated in the model, absent from the guide)
    elbo: ``-TraceEnum_ELBO().loss(key, ...)`` (for the scan HMM, which TraceEnum_ELBO sums
    wrongly, ``-Trace_ELBO().loss`` on the hand model); iwelbo/renyi: RenyiELBO on the case's
    ``hand_model``, the model with the enumerated sites summed out by hand (each particle's
    weight uses the marginal model density), same key, to 1e-5.
``reinforce`` (discrete guide sites, ppl's default score-function estimator)
    The value under one key equals Trace_ELBO / RenyiELBO's; the gradient is checked in
    expectation (2000 keys, within 4 standard errors) against the exact gradient of the
    exact objective, computed by brute force over the guide's discrete values
    (:func:`brute_objective`).
``guide_enum`` (``infer={"enumerate": "parallel"}`` on guide sites)
    elbo: ``-TraceEnum_ELBO().loss`` to 1e-5; iwelbo/renyi: value and gradient in
    expectation against the brute-force objective.
``brute`` (model and guide enumeration mixed with sampled discrete sites)
    value and gradient in expectation against the brute-force objective, all objectives.

``test_reference_selfcheck`` checks the references themselves: :func:`hand_renyi` against
RenyiELBO (on cases that RenyiELBO accepts), each hand model against a brute-force sum over
the enumerated sites and (where it is right) TraceEnum_ELBO, and the brute-force objective
against the mean over 2000 keys of TraceEnum_ELBO's ELBO values and gradients and of
RenyiELBO's values. (TraceGraph_ELBO is not used: it rejects guide enumeration, and on
plate_bernoulli_subsample its mean gradient was twice the exact one.)

Params are the unconstrained values of every ``numpyro.param`` (NumPyro's ``biject_to``),
found by tracing the programs here (``test_init_params_agree`` compares them with
``ppl.init_params``) and then moved off their initial values by a fixed perturbation (so no
Bernoulli logit sits exactly at 0, where NumPyro's log_prob has a wrong derivative).
"""

from __future__ import annotations

import itertools
import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from jax.scipy.special import logsumexp
from numpyro import handlers
from numpyro.contrib.control_flow import scan
from numpyro.contrib.funsor import config_enumerate, markov
from numpyro.distributions import biject_to, constraints
from numpyro.distributions.transforms import AffineTransform, SigmoidTransform
from numpyro.infer import RenyiELBO, Trace_ELBO, TraceEnum_ELBO
from numpyro.infer.util import log_density

import ppl

C = constraints


def INF():
    """A fresh ``infer`` dict per site: NumPyro writes into it (``name_to_dim``)."""
    return {"enumerate": "parallel"}


NUM_KEYS = 2000  # keys for the statistical checks
K = 3  # particles of iwelbo / renyi
OBJECTIVES = {"elbo": None, "iwelbo3": 0.0, "renyi05_3": 0.5}  # id -> alpha


def _rng(seed):
    return np.random.RandomState(seed)


def _arr(x, dtype=jnp.float32):
    return jnp.asarray(np.asarray(x), dtype=dtype)


# ---------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------

Y3 = _arr([0.5, 1.2, -0.3])
Y4 = _arr([0.9, -0.2, 1.4, 0.3])
Y6 = _arr(_rng(1).normal(0.4, 1.0, size=6))
Y20 = _arr(_rng(2).normal(0.0, 1.2, size=20))
Y34 = _arr(_rng(3).normal(0.3, 1.0, size=(3, 4)))
Y_SEQ = _arr(1.5)
BERN10 = _arr([1.0] * 8 + [0.0] * 2)
CAT12 = _arr(_rng(4).choice(3, size=12, p=[0.2, 0.5, 0.3]), jnp.int32)
COUNTS5 = _arr([2.0, 0.0, 3.0, 1.0, 4.0])
MASK6 = jnp.array([True, True, False, True, False, True])
X_LIN = _arr(_rng(5).normal(size=(8, 3)))
Y_LIN = _arr(X_LIN @ np.array([0.5, -1.0, 0.3]) + 0.2 + 0.3 * _rng(6).normal(size=8))
X_LOG = _arr(_rng(7).normal(size=(10, 2)))
Y_LOG = _arr((np.asarray(X_LOG) @ np.array([1.2, -0.7]) + 0.3 * _rng(8).normal(size=10)) > 0)
X_POIS = _arr(_rng(9).normal(size=(7, 2)) * 0.5)
Y_POIS = _arr([1.0, 0.0, 2.0, 1.0, 3.0, 0.0, 1.0])
SCHOOLS_Y = _arr([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0])
SCHOOLS_SIGMA = _arr([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0])
VAE_X = _arr(_rng(10).rand(6, 5) > 0.5)
PHI = _arr(_rng(11).normal(size=(6, 4)))
Y_PHI = _arr(_rng(12).normal(size=6))
PHI3 = _arr(_rng(13).normal(size=(5, 3)))
Y_PHI3 = _arr(_rng(14).normal(size=5))
Y_RW = _arr([0.3, 0.8, 0.2, -0.4, 0.1])
Y_HMM = _arr([-1.1, -0.8, 1.3, 1.0, -0.9])
Y23 = _arr(_rng(15).normal(size=(2, 3)))
GMM_X = _arr([-1.8, -0.4, 1.1, 2.3])
GMM_X6 = _arr([-2.0, -1.5, 0.2, 1.4, 1.9, 2.5])


def _param_init(seed, shape, scale=0.3):
    return _arr(_rng(seed).normal(size=shape) * scale)


# ---------------------------------------------------------------------------
# cases rewritten from Pyro's tests/infer/test_valid_models.py
# ---------------------------------------------------------------------------


def m_observed_only(x):
    loc = numpyro.param("loc", _arr([0.3, -0.2]))
    numpyro.sample("x", dist.Normal(loc, 1.0).to_event(1), obs=x)


def g_empty(*args):
    pass


def m_seq_bernoulli(y):
    total = 0.0
    for i in range(3):
        total = total + numpyro.sample(f"x_{i}", dist.Bernoulli(0.3))
    numpyro.sample("y", dist.Normal(total, 1.0), obs=y)


def g_seq_bernoulli(y):
    p = numpyro.param("p", 0.6, constraint=C.unit_interval)
    for i in range(3):
        numpyro.sample(f"x_{i}", dist.Bernoulli(p))


def m_plate_bernoulli(y):
    with numpyro.plate("plate", 4):
        x = numpyro.sample("x", dist.Bernoulli(0.4))
        numpyro.sample("y", dist.Normal(x, 0.8), obs=y)


def g_plate_bernoulli(y):
    logits = numpyro.param("logits", _arr([0.3, -0.4, 0.8, -0.1]))
    with numpyro.plate("plate", 4):
        numpyro.sample("x", dist.Bernoulli(logits=logits))


def m_plate_bernoulli_sub():
    with numpyro.plate("plate", 10, subsample_size=5):
        x = numpyro.sample("x", dist.Bernoulli(0.4))
        numpyro.sample("y", dist.Normal(x, 0.8), obs=1.0)


def g_plate_bernoulli_sub():
    p = numpyro.param("p", 0.45, constraint=C.unit_interval)
    with numpyro.plate("plate", 10, subsample_size=5):
        numpyro.sample("x", dist.Bernoulli(p))


def m_nested_plates(y):
    with numpyro.plate("outer", 4, dim=-1):
        x = numpyro.sample("x", dist.Normal(0.0, 1.0))
        with numpyro.plate("inner", 3, dim=-2):
            z = numpyro.sample("z", dist.Normal(x, 1.0))
            numpyro.sample("y", dist.Normal(z, 0.5), obs=y)


def g_nested_plates(y):
    xl = numpyro.param("x_loc", _param_init(20, (4,)))
    xs = numpyro.param("x_scale", jnp.full((4,), 0.8), constraint=C.positive)
    zl = numpyro.param("z_loc", _param_init(21, (3, 4)))
    with numpyro.plate("outer", 4, dim=-1):
        x = numpyro.sample("x", dist.Normal(xl, xs))
        with numpyro.plate("inner", 3, dim=-2):
            numpyro.sample("z", dist.Normal(zl + 0.5 * x, 0.7))


def m_nested_plates_sub():
    with numpyro.plate("outer", 10, subsample_size=5, dim=-1):
        x = numpyro.sample("x", dist.Normal(0.0, 1.0))
        with numpyro.plate("inner", 11, subsample_size=6, dim=-2):
            z = numpyro.sample("z", dist.Normal(x, 1.0))
            numpyro.sample("y", dist.Normal(z, 0.5), obs=0.7)


def g_nested_plates_sub():
    a = numpyro.param("a", 0.2)
    s = numpyro.param("s", 0.9, constraint=C.positive)
    b = numpyro.param("b", 0.5)
    with numpyro.plate("outer", 10, subsample_size=5, dim=-1):
        x = numpyro.sample("x", dist.Normal(a, s))
        with numpyro.plate("inner", 11, subsample_size=6, dim=-2):
            numpyro.sample("z", dist.Normal(b * x, s))


def m_plate_reuse(y):
    outer = numpyro.plate("outer", 4, dim=-1)
    inner = numpyro.plate("inner", 3, dim=-2)
    with outer:
        x = numpyro.sample("x", dist.Normal(0.0, 1.0))
    with inner:
        u = numpyro.sample("u", dist.Normal(0.0, 1.0))
    with outer, inner:
        z = numpyro.sample("z", dist.Normal(x + u, 1.0))
        numpyro.sample("y", dist.Normal(z, 0.5), obs=y)


def g_plate_reuse(y):
    outer = numpyro.plate("outer", 4, dim=-1)
    inner = numpyro.plate("inner", 3, dim=-2)
    s = numpyro.param("s", 0.7, constraint=C.positive)
    with outer:
        x = numpyro.sample("x", dist.Normal(numpyro.param("x_loc", _param_init(22, (4,))), s))
    with inner:
        u = numpyro.sample("u", dist.Normal(numpyro.param("u_loc", _param_init(23, (3, 1))), s))
    with outer, inner:
        numpyro.sample("z", dist.Normal(0.3 * (x + u) + numpyro.param("z_loc", 0.1), s))


def m_nonnested_plates(y):
    with numpyro.plate("a", 3):
        x = numpyro.sample("x", dist.Normal(0.0, 1.0))
        numpyro.sample("yx", dist.Normal(x, 1.0), obs=y)
    with numpyro.plate("b", 2):
        z = numpyro.sample("z", dist.Normal(0.0, 1.0))
        numpyro.sample("yz", dist.Normal(z, 1.0), obs=y[:2])


def g_nonnested_plates(y):
    with numpyro.plate("a", 3):
        numpyro.sample("x", dist.Normal(numpyro.param("x_loc", _param_init(24, (3,))), 0.8))
    with numpyro.plate("b", 2):
        scale = numpyro.param("z_scale", jnp.full((2,), 0.6), constraint=C.positive)
        numpyro.sample("z", dist.Normal(numpyro.param("z_loc", _param_init(25, (2,))), scale))


def m_loop_of_plates(y):
    for i in range(3):
        with numpyro.plate("data", 4):
            x = numpyro.sample(f"x_{i}", dist.Normal(0.0, 1.0))
            numpyro.sample(f"y_{i}", dist.Normal(x, 1.0), obs=y * (i + 1))


def g_loop_of_plates(y):
    for i in range(3):
        loc = numpyro.param(f"loc_{i}", _param_init(30 + i, (4,)))
        with numpyro.plate("data", 4):
            numpyro.sample(f"x_{i}", dist.Normal(loc, 0.7))


def m_plate_of_loop_gamma(counts):
    with numpyro.plate("data", 4):
        for i in range(2):
            rate = numpyro.sample(f"r_{i}", dist.Gamma(2.0, 2.0))
            numpyro.sample(f"c_{i}", dist.Poisson(rate), obs=counts + i)


def g_plate_of_loop_gamma(counts):
    with numpyro.plate("data", 4):
        for i in range(2):
            conc = numpyro.param(f"conc_{i}", jnp.full((4,), 2.0 + i), constraint=C.positive)
            rate = numpyro.param(f"rate_{i}", jnp.full((4,), 1.5), constraint=C.positive)
            numpyro.sample(f"r_{i}", dist.Gamma(conc, rate))


def m_three_plates(y):
    inner = numpyro.plate("p1", 5)
    for i in range(2):
        x = numpyro.sample(f"x_{i}", dist.Normal(0.0, 1.0))
        if i == 0:
            for j in range(2):
                with inner:
                    numpyro.sample(f"y_{j}", dist.Normal(x, 1.0))
        else:
            with inner:
                z = numpyro.sample("z", dist.Normal(x, 1.0))
                numpyro.sample("w", dist.Normal(z, 0.5), obs=y)


def g_three_plates(y):
    inner = numpyro.plate("p1", 5)
    s = numpyro.param("s", 0.8, constraint=C.positive)
    for i in range(2):
        x = numpyro.sample(f"x_{i}", dist.Normal(numpyro.param(f"x_loc_{i}", 0.1 * (i + 1)), s))
        if i == 0:
            for j in range(2):
                with inner:
                    numpyro.sample(f"y_{j}", dist.Normal(0.5 * x, s))
        else:
            with inner:
                numpyro.sample("z", dist.Normal(numpyro.param("z_loc", _param_init(35, (5,))), s))


def m_chain(g_obs):
    p = numpyro.param("p", 0.25, constraint=C.interval(0.0, 0.5))
    a = numpyro.sample("a", dist.Bernoulli(p))
    b = numpyro.sample("b", dist.Bernoulli(p + a / 2))
    c = numpyro.sample("c", dist.Bernoulli(p + b / 2), infer=INF())
    d = numpyro.sample("d", dist.Bernoulli(p + c / 2))
    e = numpyro.sample("e", dist.Bernoulli(p + d / 2))
    f = numpyro.sample("f", dist.Bernoulli(p + e / 2), infer=INF())
    numpyro.sample("g", dist.Bernoulli(p + f / 2), obs=g_obs)


def g_chain(g_obs):
    p = numpyro.param("p", 0.25, constraint=C.interval(0.0, 0.5))
    a = numpyro.sample("a", dist.Bernoulli(p))
    b = numpyro.sample("b", dist.Bernoulli(p + a / 2), infer=INF())
    d = numpyro.sample("d", dist.Bernoulli(p + b / 2))
    numpyro.sample("e", dist.Bernoulli(p + d / 2), infer=INF())


def h_chain(g_obs):
    """m_chain with c and f summed out: P(d=1|b) = p + P(c=1|b)/2, P(g=1|e) likewise."""
    p = numpyro.param("p", 0.25, constraint=C.interval(0.0, 0.5))
    a = numpyro.sample("a", dist.Bernoulli(p))
    b = numpyro.sample("b", dist.Bernoulli(p + a / 2))
    d = numpyro.sample("d", dist.Bernoulli(p + (p + b / 2) / 2))
    e = numpyro.sample("e", dist.Bernoulli(p + d / 2))
    numpyro.sample("g", dist.Bernoulli(p + (p + e / 2) / 2), obs=g_obs)


def m_chain_plate(g_obs):
    p = numpyro.param("p", 0.25, constraint=C.interval(0.0, 0.5))
    a = numpyro.sample("a", dist.Bernoulli(p))
    b = numpyro.sample("b", dist.Bernoulli(p + a / 2))
    with numpyro.plate("data", 2):
        c = numpyro.sample("c", dist.Bernoulli(p + b / 2), infer=INF())
        d = numpyro.sample("d", dist.Bernoulli(p + c / 2))
        e = numpyro.sample("e", dist.Bernoulli(p + d / 2))
        f = numpyro.sample("f", dist.Bernoulli(p + e / 2), infer=INF())
        numpyro.sample("g", dist.Bernoulli(p + f / 2), obs=g_obs)


def h_chain_plate(g_obs):
    p = numpyro.param("p", 0.25, constraint=C.interval(0.0, 0.5))
    a = numpyro.sample("a", dist.Bernoulli(p))
    b = numpyro.sample("b", dist.Bernoulli(p + a / 2))
    with numpyro.plate("data", 2):
        d = numpyro.sample("d", dist.Bernoulli(p + (p + b / 2) / 2))
        e = numpyro.sample("e", dist.Bernoulli(p + d / 2))
        numpyro.sample("g", dist.Bernoulli(p + (p + e / 2) / 2), obs=g_obs)


def g_chain_plate(g_obs):
    p = numpyro.param("p", 0.25, constraint=C.interval(0.0, 0.5))
    a = numpyro.sample("a", dist.Bernoulli(p))
    b = numpyro.sample("b", dist.Bernoulli(p + a / 2), infer=INF())
    with numpyro.plate("data", 2):
        d = numpyro.sample("d", dist.Bernoulli(p + b / 2))
        numpyro.sample("e", dist.Bernoulli(p + d / 2), infer=INF())


@config_enumerate
def m_enum_plate_reuse():
    p = numpyro.param("p", _arr([0.2, 0.8]), constraint=C.unit_interval)
    a = numpyro.sample("a", dist.Bernoulli(0.3)).astype(jnp.int32)
    with numpyro.plate("b_axis", 2):
        numpyro.sample("b", dist.Bernoulli(p[a]), obs=_arr([0.0, 1.0]))
    c = numpyro.sample("c", dist.Bernoulli(0.3)).astype(jnp.int32)
    with numpyro.plate("c_axis", 2):
        numpyro.sample("d", dist.Bernoulli(p[c]), obs=_arr([0.0, 0.0]))


def h_enum_plate_reuse():
    p = numpyro.param("p", _arr([0.2, 0.8]), constraint=C.unit_interval)

    def pair(data):
        terms = [
            math.log(0.7) + dist.Bernoulli(p[0]).log_prob(data).sum(),
            math.log(0.3) + dist.Bernoulli(p[1]).log_prob(data).sum(),
        ]
        return logsumexp(jnp.stack(terms))

    numpyro.factor("ab", pair(_arr([0.0, 1.0])))
    numpyro.factor("cd", pair(_arr([0.0, 0.0])))


# ---------------------------------------------------------------------------
# cases rewritten from Pyro's tests/infer/test_enum.py and NumPyro's test_enum_elbo.py
# ---------------------------------------------------------------------------

GMM_W = _arr([0.4, 0.6])


@config_enumerate
def m_gmm_enum(x):
    scale = numpyro.param("scale", 0.8, constraint=C.positive)
    with numpyro.plate("components", 2):
        locs = numpyro.sample("locs", dist.Normal(0.0, 3.0))
    with numpyro.plate("data", x.shape[0]):
        c = numpyro.sample("c", dist.Categorical(GMM_W))
        numpyro.sample("x", dist.Normal(locs[c], scale), obs=x)


def h_gmm_enum(x):
    scale = numpyro.param("scale", 0.8, constraint=C.positive)
    with numpyro.plate("components", 2):
        locs = numpyro.sample("locs", dist.Normal(0.0, 3.0))
    with numpyro.plate("data", x.shape[0]):
        mix = dist.MixtureSameFamily(dist.Categorical(GMM_W), dist.Normal(locs, scale))
        numpyro.sample("x", mix, obs=x)


def g_gmm_enum(x):
    loc = numpyro.param("locs_loc", _arr([-1.0, 1.0]))
    scale = numpyro.param("locs_scale", _arr([0.5, 0.6]), constraint=C.positive)
    with numpyro.plate("components", 2):
        numpyro.sample("locs", dist.Normal(loc, scale))


def m_gmm_local(x):
    locs = numpyro.param("locs", _arr([-1.0, 1.2]))
    scale = numpyro.param("scale", 0.9, constraint=C.positive)
    with numpyro.plate("data", 4):
        c = numpyro.sample("c", dist.Categorical(GMM_W))
        numpyro.sample("x", dist.Normal(locs[c], scale), obs=x)


GMM_LOGITS = _arr([[0.3, -0.2], [0.1, 0.4], [-0.5, 0.2], [0.2, 0.6]])


def g_gmm_local(x):
    logits = numpyro.param("c_logits", GMM_LOGITS)
    with numpyro.plate("data", 4):
        numpyro.sample("c", dist.Categorical(logits=logits))


def g_gmm_local_enum(x):
    logits = numpyro.param("c_logits", GMM_LOGITS)
    with numpyro.plate("data", 4):
        numpyro.sample("c", dist.Categorical(logits=logits), infer=INF())


HMM_TRANS = _arr([[0.8, 0.2], [0.3, 0.7]])


def m_hmm_scan(y):
    trans = numpyro.param("trans", HMM_TRANS, constraint=C.simplex)
    locs = numpyro.sample("locs", dist.Normal(0.0, 2.0).expand([2]).to_event(1))

    def step(x_prev, y_t):
        x = numpyro.sample("x", dist.Categorical(trans[x_prev]), infer=INF())
        numpyro.sample("y", dist.Normal(locs[x], 0.6), obs=y_t)
        return x, None

    scan(step, 0, y)


def m_hmm_markov(y):
    trans = numpyro.param("trans", HMM_TRANS, constraint=C.simplex)
    locs = numpyro.sample("locs", dist.Normal(0.0, 2.0).expand([2]).to_event(1))
    x = 0
    for t in markov(range(y.shape[0])):
        x = numpyro.sample(f"x_{t}", dist.Categorical(trans[x]), infer=INF())
        numpyro.sample(f"y_{t}", dist.Normal(locs[x], 0.6), obs=y[t])


def h_hmm(y):
    trans = numpyro.param("trans", HMM_TRANS, constraint=C.simplex)
    locs = numpyro.sample("locs", dist.Normal(0.0, 2.0).expand([2]).to_event(1))
    emit = dist.Normal(locs, 0.6)
    log_alpha = jnp.log(trans[0]) + emit.log_prob(y[0])
    for t in range(1, y.shape[0]):
        log_alpha = logsumexp(log_alpha[:, None] + jnp.log(trans), axis=0) + emit.log_prob(y[t])
    numpyro.factor("hmm", logsumexp(log_alpha))


def g_hmm(y):
    loc = numpyro.param("locs_loc", _arr([-0.8, 0.9]))
    scale = numpyro.param("locs_scale", _arr([0.4, 0.5]), constraint=C.positive)
    numpyro.sample("locs", dist.Normal(loc, scale).to_event(1))


@config_enumerate
def m_enum_local(y):
    with numpyro.plate("data", y.shape[0]):
        u = numpyro.sample("u", dist.Normal(0.0, 1.0))
        c = numpyro.sample("c", dist.Bernoulli(0.3))
        numpyro.sample("y", dist.Normal(u + 2.0 * c, 0.7), obs=y)


def h_enum_local(y):
    with numpyro.plate("data", y.shape[0]):
        u = numpyro.sample("u", dist.Normal(0.0, 1.0))
        terms = jnp.stack(
            [
                math.log(0.7) + dist.Normal(u, 0.7).log_prob(y),
                math.log(0.3) + dist.Normal(u + 2.0, 0.7).log_prob(y),
            ]
        )
        numpyro.factor("c_marginal", logsumexp(terms, axis=0))


def g_enum_local(y):
    loc = numpyro.param("u_loc", _param_init(40, (y.shape[0],)))
    scale = numpyro.param("u_scale", 0.6, constraint=C.positive)
    with numpyro.plate("data", y.shape[0]):
        numpyro.sample("u", dist.Normal(loc, scale))


@config_enumerate
def m_enum_switch(y):
    mu = numpyro.sample("mu", dist.Normal(0.0, 2.0))
    s = numpyro.sample("s", dist.Bernoulli(0.35))
    with numpyro.plate("data", y.shape[0]):
        numpyro.sample("y", dist.Normal(mu * (2.0 * s - 1.0), 1.0), obs=y)


def h_enum_switch(y):
    mu = numpyro.sample("mu", dist.Normal(0.0, 2.0))
    off = math.log(0.65) + dist.Normal(-mu, 1.0).log_prob(y).sum()
    on = math.log(0.35) + dist.Normal(mu, 1.0).log_prob(y).sum()
    numpyro.factor("s_marginal", logsumexp(jnp.stack([off, on])))


def g_enum_switch(y):
    loc = numpyro.param("mu_loc", 0.4)
    scale = numpyro.param("mu_scale", 0.5, constraint=C.positive)
    numpyro.sample("mu", dist.Normal(loc, scale))


KL_P = _arr([0.2693204236205713, 1 - 0.2693204236205713])


def m_plate_plate_kl():
    d = dist.Categorical(KL_P)
    numpyro.sample("w", d)
    with numpyro.plate("outer", 2, dim=-1):
        numpyro.sample("x", d)
        with numpyro.plate("inner", 2, dim=-2):
            numpyro.sample("z", d)


def g_plate_plate_kl():
    q = numpyro.param("q", _arr([0.75, 0.25]), constraint=C.simplex)
    d = dist.Categorical(q)
    numpyro.sample("w", d, infer=INF())
    with numpyro.plate("outer", 2, dim=-1):
        numpyro.sample("x", d, infer=INF())
        with numpyro.plate("inner", 2, dim=-2):
            numpyro.sample("z", d, infer=INF())


def m_bernoulli_switch(y):
    x = numpyro.sample("x", dist.Bernoulli(0.5))
    with numpyro.plate("data", y.shape[0]):
        numpyro.sample("y", dist.Normal(2.0 * x - 1.0, 1.0), obs=y)


def g_bernoulli_switch_enum(y):
    p = numpyro.param("p", 0.3, constraint=C.unit_interval)
    numpyro.sample("x", dist.Bernoulli(p), infer=INF())


CAT_LOCS = _arr([-1.0, 0.5, 2.0])


def m_categorical(y):
    c = numpyro.sample("c", dist.Categorical(_arr([0.2, 0.5, 0.3])))
    with numpyro.plate("data", y.shape[0]):
        numpyro.sample("y", dist.Normal(CAT_LOCS[c], 1.0), obs=y)


def g_categorical(y):
    probs = numpyro.param("c_probs", _arr([0.3, 0.3, 0.4]), constraint=C.simplex)
    numpyro.sample("c", dist.Categorical(probs))


def m_poisson_latent(y):
    n = numpyro.sample("n", dist.Poisson(1.5))
    with numpyro.plate("data", y.shape[0]):
        numpyro.sample("y", dist.Normal(n, 1.0), obs=y)


def g_poisson_latent(y):
    rate = numpyro.param("n_rate", 1.2, constraint=C.positive)
    numpyro.sample("n", dist.Poisson(rate))


# ---------------------------------------------------------------------------
# cases rewritten from NumPyro's test/infer/test_svi.py
# ---------------------------------------------------------------------------


def m_normal_normal(x):
    z = numpyro.sample("z", dist.Normal(0.0, 1.0))
    with numpyro.plate("data", x.shape[0]):
        numpyro.sample("x", dist.Normal(z, 1.0), obs=x)


def g_normal_normal(x):
    m = numpyro.param("m", 0.2)
    s = numpyro.param("s", 0.6, constraint=C.positive)
    numpyro.sample("z", dist.Normal(m, s))


def m_beta_bernoulli(data):
    f = numpyro.sample("beta", dist.Beta(1.0, 1.0))
    with numpyro.plate("N", data.shape[0]):
        numpyro.sample("obs", dist.Bernoulli(f), obs=data)


def g_beta_bernoulli(data):
    a = numpyro.param("alpha_q", 1.5, constraint=C.positive)
    b = numpyro.param("beta_q", 1.2, constraint=C.positive)
    numpyro.sample("beta", dist.Beta(a, b))


def m_param_constraints(obs):
    a = numpyro.param("a", 1.8, constraint=C.greater_than(1.0))
    b = numpyro.param("b", 0.7, constraint=C.positive)
    z = numpyro.sample("z", dist.Normal(0.0, 1.0))
    numpyro.sample("x", dist.Normal(a + z, b), obs=obs)


def g_param_constraints(obs):
    c = numpyro.param("c", -1.4, constraint=C.interval(-2.0, -1.0))
    d = numpyro.param("d", 0.4, constraint=C.unit_interval)
    numpyro.sample("z", dist.Normal(c, d))


def m_sub_local_invariant():
    with numpyro.plate("N", 100, subsample_size=4):
        x = numpyro.sample("x", dist.Normal(0.0, 1.0))
        numpyro.sample("obs", dist.Bernoulli(logits=x), obs=1.0)


def g_sub_local_invariant():
    loc = numpyro.param("loc", 0.3)
    scale = numpyro.param("scale", 0.8, constraint=C.positive)
    with numpyro.plate("N", 100, subsample_size=4):
        numpyro.sample("x", dist.Normal(loc, scale))


def m_sub_local_indexed(y):
    with numpyro.plate("N", 20, subsample_size=5):
        x = numpyro.sample("x", dist.Normal(0.0, 1.0))
        numpyro.sample("y", dist.Normal(x, 0.5), obs=numpyro.subsample(y, event_dim=0))


def g_sub_local_indexed(y):
    loc = numpyro.param("x_loc", _param_init(41, (20,)))
    scale = numpyro.param("x_scale", 0.6, constraint=C.positive)
    with numpyro.plate("N", 20, subsample_size=5) as idx:
        numpyro.sample("x", dist.Normal(loc[idx], scale))


def m_global_sub():
    z = numpyro.sample("z", dist.Normal(0.0, 1.0))
    with numpyro.plate("data", 50, subsample_size=5):
        numpyro.sample("x", dist.Normal(z, 1.0), obs=0.8)


def g_global_sub():
    scale = numpyro.param("s", 0.4, constraint=C.positive)
    numpyro.sample("z", dist.Normal(numpyro.param("m", 0.1), scale))


def m_shared_param():
    shared = numpyro.param("shared")
    numpyro.sample("z", dist.Normal(shared, 1.0))
    numpyro.factor("neg_loss", -((shared - 5.0) ** 2))


def g_shared_param():
    numpyro.param("shared", 1.0)
    numpyro.sample("z", dist.Normal(numpyro.param("z_loc", 0.5), 1.0))


_DYN = [AffineTransform(0.0, 2.0), SigmoidTransform(), AffineTransform(0.0, 3.0)]


def m_dynamic_support(y):
    x = numpyro.sample("x", dist.TransformedDistribution(dist.Normal(0.0, 1.0), _DYN))
    numpyro.sample("y", dist.Normal(x, 0.5), obs=y)


def g_dynamic_support(y):
    m = numpyro.param("m", 0.2)
    s = numpyro.param("s", 0.5, constraint=C.positive)
    numpyro.sample("x", dist.TransformedDistribution(dist.Normal(m, s), _DYN))


def m_dirichlet(c):
    theta = numpyro.sample("theta", dist.Dirichlet(jnp.ones(3)))
    with numpyro.plate("data", c.shape[0]):
        numpyro.sample("c", dist.Categorical(theta), obs=c)


def g_dirichlet(c):
    conc = numpyro.param("conc", _arr([1.5, 2.0, 1.2]), constraint=C.positive)
    numpyro.sample("theta", dist.Dirichlet(conc))


# ---------------------------------------------------------------------------
# small versions of NumPyro's examples/
# ---------------------------------------------------------------------------


def m_linreg(x, y):
    w = numpyro.sample("w", dist.Normal(0.0, 1.0).expand([3]).to_event(1))
    b = numpyro.sample("b", dist.Normal(0.0, 5.0))
    sigma = numpyro.sample("sigma", dist.HalfNormal(1.0))
    with numpyro.plate("data", x.shape[0]):
        numpyro.sample("y", dist.Normal(x @ w + b, sigma), obs=y)


def g_linreg(x, y):
    wl = numpyro.param("w_loc", _param_init(50, (3,)))
    ws = numpyro.param("w_scale", jnp.full((3,), 0.3), constraint=C.positive)
    numpyro.sample("w", dist.Normal(wl, ws).to_event(1))
    numpyro.sample("b", dist.Normal(numpyro.param("b_loc", 0.1), 0.3))
    sl = numpyro.param("sigma_loc", -0.5)
    ss = numpyro.param("sigma_scale", 0.2, constraint=C.positive)
    numpyro.sample("sigma", dist.LogNormal(sl, ss))


def m_logreg(x, y):
    w = numpyro.sample("w", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
    b = numpyro.sample("b", dist.Normal(0.0, 1.0))
    with numpyro.plate("data", x.shape[0]):
        numpyro.sample("y", dist.Bernoulli(logits=x @ w + b), obs=y)


def g_logreg(x, y):
    wl = numpyro.param("w_loc", _param_init(51, (2,)))
    ws = numpyro.param("w_scale", jnp.full((2,), 0.4), constraint=C.positive)
    numpyro.sample("w", dist.Normal(wl, ws).to_event(1))
    numpyro.sample("b", dist.Normal(numpyro.param("b_loc", 0.2), 0.3))


def m_poisson_reg(x, y):
    w = numpyro.sample("w", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
    b = numpyro.sample("b", dist.Normal(0.0, 1.0))
    with numpyro.plate("data", x.shape[0]):
        numpyro.sample("y", dist.Poisson(jnp.exp(x @ w + b)), obs=y)


def g_poisson_reg(x, y):
    wl = numpyro.param("w_loc", _param_init(52, (2,)))
    numpyro.sample("w", dist.Normal(wl, 0.3).to_event(1))
    numpyro.sample("b", dist.Normal(numpyro.param("b_loc", -0.1), 0.3))


def m_schools(y, sigma):
    mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = numpyro.sample("tau", dist.HalfCauchy(5.0))
    with numpyro.plate("schools", y.shape[0]):
        theta_tilde = numpyro.sample("theta_tilde", dist.Normal(0.0, 1.0))
        theta = numpyro.deterministic("theta", mu + tau * theta_tilde)
        numpyro.sample("obs", dist.Normal(theta, sigma), obs=y)


def g_schools(y, sigma):
    numpyro.sample("mu", dist.Normal(numpyro.param("mu_loc", 4.0), 1.5))
    tl = numpyro.param("tau_loc", 1.0)
    ts = numpyro.param("tau_scale", 0.5, constraint=C.positive)
    numpyro.sample("tau", dist.LogNormal(tl, ts))
    loc = numpyro.param("tt_loc", _param_init(53, (8,)))
    scale = numpyro.param("tt_scale", jnp.full((8,), 0.8), constraint=C.positive)
    with numpyro.plate("schools", y.shape[0]):
        numpyro.sample("theta_tilde", dist.Normal(loc, scale))


def _mlp(x, w1, b1, w2, b2):
    return jnp.tanh(x @ w1 + b1) @ w2 + b2


def m_vae(x):
    w1 = numpyro.param("dec_w1", _param_init(60, (2, 4), 0.5))
    b1 = numpyro.param("dec_b1", _param_init(61, (4,), 0.1))
    w2 = numpyro.param("dec_w2", _param_init(62, (4, 5), 0.5))
    b2 = numpyro.param("dec_b2", _param_init(63, (5,), 0.1))
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
        logits = _mlp(z, w1, b1, w2, b2)
        numpyro.sample("x", dist.Bernoulli(logits=logits).to_event(1), obs=x)


def g_vae(x):
    w1 = numpyro.param("enc_w1", _param_init(64, (5, 4), 0.5))
    b1 = numpyro.param("enc_b1", _param_init(65, (4,), 0.1))
    w2 = numpyro.param("enc_w2", _param_init(66, (4, 4), 0.5))
    b2 = numpyro.param("enc_b2", _param_init(67, (4,), 0.1))
    out = _mlp(x, w1, b1, w2, b2)
    loc, scale = out[..., :2], jax.nn.softplus(out[..., 2:]) + 0.1
    with numpyro.plate("data", x.shape[0]):
        numpyro.sample("z", dist.Normal(loc, scale).to_event(1))


def m_phi_x(phi, y):
    x = numpyro.sample("x", dist.Normal(0.0, 1.0).expand([phi.shape[1]]).to_event(1))
    numpyro.sample("y", dist.Normal(phi @ x, 0.5).to_event(1), obs=y)


def g_phi_x(phi, y):
    loc = numpyro.param("x_loc", _param_init(70, (phi.shape[1],)))
    scale = numpyro.param("x_scale", jnp.full((phi.shape[1],), 0.4), constraint=C.positive)
    numpyro.sample("x", dist.Normal(loc, scale).to_event(1))


def m_mvn_phi(phi, y):
    x = numpyro.sample("x", dist.MultivariateNormal(jnp.zeros(3), jnp.eye(3)))
    numpyro.sample("y", dist.Normal(phi @ x, 0.3).to_event(1), obs=y)


def g_mvn_phi(phi, y):
    loc = numpyro.param("x_loc", _param_init(71, (3,)))
    tril = jnp.eye(3) * 0.6 + jnp.tril(_param_init(72, (3, 3), 0.1), -1)
    L = numpyro.param("x_tril", tril, constraint=C.lower_cholesky)
    numpyro.sample("x", dist.MultivariateNormal(loc, scale_tril=L))


def m_random_walk(y):
    def step(z_prev, y_t):
        z = numpyro.sample("z", dist.Normal(z_prev, 0.5))
        numpyro.sample("y", dist.Normal(z, 1.0), obs=y_t)
        return z, None

    scan(step, 0.0, y)


def g_random_walk(y):
    loc = numpyro.param("z_loc", _param_init(73, (y.shape[0],)))
    scale = numpyro.param("z_scale", jnp.full((y.shape[0],), 0.5), constraint=C.positive)

    def step(carry, loc_scale):
        numpyro.sample("z", dist.Normal(loc_scale[0], loc_scale[1]))
        return carry, None

    scan(step, None, (loc, scale))


def m_masked(y):
    z = numpyro.sample("z", dist.Normal(0.0, 2.0))
    with numpyro.plate("data", y.shape[0]), handlers.mask(mask=MASK6):
        u = numpyro.sample("u", dist.Normal(z, 1.0))
        numpyro.sample("y", dist.Normal(u, 0.5), obs=y)


def g_masked(y):
    numpyro.sample("z", dist.Normal(numpyro.param("z_loc", 0.3), 0.5))
    loc = numpyro.param("u_loc", _param_init(74, (6,)))
    with numpyro.plate("data", y.shape[0]), handlers.mask(mask=MASK6):
        numpyro.sample("u", dist.Normal(loc, 0.6))


def m_scaled(y):
    z = numpyro.sample("z", dist.Normal(0.0, 1.0))
    with handlers.scale(scale=0.5):
        u = numpyro.sample("u", dist.Normal(z, 1.0))
    with numpyro.plate("data", y.shape[0]), handlers.scale(scale=2.5):
        numpyro.sample("y", dist.Normal(z + u, 1.0), obs=y)


def g_scaled(y):
    s = numpyro.param("s", 0.6, constraint=C.positive)
    numpyro.sample("z", dist.Normal(numpyro.param("z_loc", 0.2), s))
    with handlers.scale(scale=0.5):
        numpyro.sample("u", dist.Normal(numpyro.param("u_loc", -0.1), s))


def m_deterministic(y):
    z = numpyro.sample("z", dist.Normal(0.0, 1.0))
    d = numpyro.deterministic("d", 2.0 * z + 1.0)
    with numpyro.plate("data", y.shape[0]):
        numpyro.sample("y", dist.Normal(d, 1.0), obs=y)


def g_deterministic(y):
    z = numpyro.sample("z", dist.Normal(numpyro.param("m", 0.1), 0.5))
    numpyro.deterministic("z_twice", 2.0 * z)


def m_factor_plate(y):
    with numpyro.plate("data", y.shape[0]):
        u = numpyro.sample("u", dist.Normal(0.0, 1.0))
        numpyro.factor("f", -0.5 * ((u - y) / 0.3) ** 2)


def g_factor_plate(y):
    loc = numpyro.param("u_loc", _param_init(75, (y.shape[0],)))
    scale = numpyro.param("u_scale", 0.4, constraint=C.positive)
    with numpyro.plate("data", y.shape[0]):
        numpyro.sample("u", dist.Normal(loc, scale))


def m_shape_2x3(y):
    a = numpyro.sample("a", dist.Normal(0.0, 1.0).expand([2, 3]).to_event(2))
    b = numpyro.sample("b", dist.Normal(a, 1.0))  # batch shape (2, 3), no plate
    numpyro.sample("y", dist.Normal(b, 0.5).to_event(2), obs=y)


def g_shape_2x3(y):
    la = numpyro.param("a_loc", _param_init(76, (2, 3)))
    numpyro.sample("a", dist.Normal(la, 0.5).to_event(2))
    lb = numpyro.param("b_loc", _param_init(77, (2, 3)))
    sb = numpyro.param("b_scale", jnp.full((2, 3), 0.6), constraint=C.positive)
    numpyro.sample("b", dist.Normal(lb, sb))


def m_gamma_poisson(counts):
    rate = numpyro.sample("rate", dist.Gamma(2.0, 1.0))
    with numpyro.plate("data", counts.shape[0]):
        numpyro.sample("counts", dist.Poisson(rate), obs=counts)


def g_gamma_poisson(counts):
    conc = numpyro.param("q_conc", 3.0, constraint=C.positive)
    rate = numpyro.param("q_rate", 1.5, constraint=C.positive)
    numpyro.sample("rate", dist.Gamma(conc, rate))


# ---------------------------------------------------------------------------
# the corpus
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    name: str
    model: Callable
    guide: Callable
    args: tuple = ()
    kind: str = "exact"  # exact | enum | reinforce | guide_enum | brute
    hand_model: Callable | None = None  # enumerated sites summed out by hand
    renyi_refuses: bool = False  # RenyiELBO rejects it: iwelbo/renyi use hand_renyi
    trace_enum_ok: bool = True  # TraceEnum_ELBO gets this model right (not scan: see below)
    brute: dict | None = None  # {"guide": {site: support}, "model": {...}, "local": plate}
    origin: str = ""

    def __repr__(self):
        return self.name


B01 = np.array([0.0, 1.0], np.float32)
C2 = np.array([0, 1], np.int32)
C3 = np.array([0, 1, 2], np.int32)

CASES = [
    # --- Pyro tests/infer/test_valid_models.py
    Case(
        "nonempty_model_empty_guide",
        m_observed_only,
        g_empty,
        (_arr([0.5, -1.0]),),
        origin="pyro test_valid_models: test_nonempty_model_empty_guide_ok",
    ),
    Case(
        "sequential_bernoulli",
        m_seq_bernoulli,
        g_seq_bernoulli,
        (Y_SEQ,),
        kind="reinforce",
        brute={"guide": {f"x_{i}": B01 for i in range(3)}},
        origin="pyro test_valid_models: test_irange_ok (full)",
    ),
    Case(
        "plate_bernoulli",
        m_plate_bernoulli,
        g_plate_bernoulli,
        (Y4,),
        kind="reinforce",
        brute={"guide": {"x": B01}, "local": "plate"},
        origin="pyro test_valid_models: test_plate_ok (full)",
    ),
    Case(
        "plate_bernoulli_subsample",
        m_plate_bernoulli_sub,
        g_plate_bernoulli_sub,
        kind="reinforce",
        brute={"guide": {"x": B01}, "local": "plate"},
        origin="pyro test_valid_models: test_plate_ok (subsample)",
    ),
    Case(
        "nested_plates",
        m_nested_plates,
        g_nested_plates,
        (Y34,),
        origin="pyro test_valid_models: test_nested_plate_plate_ok",
    ),
    Case(
        "nested_plates_subsampled",
        m_nested_plates_sub,
        g_nested_plates_sub,
        renyi_refuses=True,
        origin="pyro test_valid_models: test_nested_plate_plate_ok (subsampled)",
    ),
    Case(
        "plate_reuse",
        m_plate_reuse,
        g_plate_reuse,
        (Y34,),
        origin="pyro test_valid_models: test_plate_reuse_ok",
    ),
    Case(
        "nonnested_plates",
        m_nonnested_plates,
        g_nonnested_plates,
        (Y3,),
        origin="pyro test_valid_models: test_nonnested_plate_plate_ok",
    ),
    Case(
        "loop_of_plates",
        m_loop_of_plates,
        g_loop_of_plates,
        (Y4,),
        origin="pyro test_valid_models: test_irange_plate_ok",
    ),
    Case(
        "plate_of_loop_gamma",
        m_plate_of_loop_gamma,
        g_plate_of_loop_gamma,
        (COUNTS5[:4],),
        origin="pyro test_valid_models: test_plate_irange_ok",
    ),
    Case(
        "three_plates_at_depths",
        m_three_plates,
        g_three_plates,
        (Y6[:5],),
        origin="pyro test_valid_models: test_three_indep_plate_at_different_depths_ok",
    ),
    Case(
        "enum_chain_model_and_guide",
        m_chain,
        g_chain,
        (_arr(0.0),),
        kind="brute",
        hand_model=h_chain,
        brute={"guide": {"a": B01, "b": B01, "d": B01, "e": B01}, "model": {"c": B01, "f": B01}},
        origin="pyro test_valid_models: test_enum_in_model_ok",
    ),
    Case(
        "enum_chain_in_plate",
        m_chain_plate,
        g_chain_plate,
        (jnp.zeros(2),),
        kind="brute",
        hand_model=h_chain_plate,
        brute={"guide": {"a": B01, "b": B01, "d": B01, "e": B01}, "model": {"c": B01, "f": B01}},
        origin="pyro test_valid_models: test_enum_in_model_plate_ok",
    ),
    Case(
        "enum_model_plate_reuse",
        m_enum_plate_reuse,
        g_empty,
        kind="enum",
        hand_model=h_enum_plate_reuse,
        brute={"model": {"a": B01, "c": B01}},
        origin="pyro test_valid_models: test_enum_in_model_plate_reuse_ok",
    ),
    # --- Pyro tests/infer/test_enum.py, NumPyro test/contrib/test_enum_elbo.py
    Case(
        "gmm_model_enum",
        m_gmm_enum,
        g_gmm_enum,
        (GMM_X6,),
        kind="enum",
        hand_model=h_gmm_enum,
        brute={"model": {"c": C2}},
        origin="pyro test_enum: gmm (model enumeration)",
    ),
    Case(
        "gmm_guide_reinforce",
        m_gmm_local,
        g_gmm_local,
        (GMM_X,),
        kind="reinforce",
        brute={"guide": {"c": C2}, "local": "data"},
        origin="pyro test_enum: mixture with the assignment sampled in the guide",
    ),
    Case(
        "gmm_guide_enum",
        m_gmm_local,
        g_gmm_local_enum,
        (GMM_X,),
        kind="guide_enum",
        brute={"guide": {"c": C2}, "local": "data"},
        origin="numpyro test_enum_elbo: test_elbo_enumerate_plate_* (guide enumeration)",
    ),
    # NumPyro's TraceEnum_ELBO does not sum scan's states correctly (-8.63 against the
    # forward algorithm's -5.97 in a check made while writing this file): the reference for
    # the scan HMM is the forward algorithm (h_hmm), itself checked by brute force.
    Case(
        "hmm_scan_model_enum",
        m_hmm_scan,
        g_hmm,
        (Y_HMM,),
        kind="enum",
        hand_model=h_hmm,
        trace_enum_ok=False,
        brute={"model": {"x": C2}},
        origin="pyro test_enum: hmm (scan, model enumeration)",
    ),
    Case(
        "hmm_markov_loop_model_enum",
        m_hmm_markov,
        g_hmm,
        (Y_HMM,),
        kind="enum",
        hand_model=h_hmm,
        brute={"model": {f"x_{t}": C2 for t in range(5)}},
        origin="pyro test_enum: hmm (markov python loop)",
    ),
    Case(
        "enum_model_local_plate",
        m_enum_local,
        g_enum_local,
        (Y4,),
        kind="enum",
        hand_model=h_enum_local,
        brute={"model": {"c": B01}},
        origin="pyro test_enum: local enumeration in a data plate",
    ),
    Case(
        "enum_model_global_switch",
        m_enum_switch,
        g_enum_switch,
        (Y4,),
        kind="enum",
        hand_model=h_enum_switch,
        brute={"model": {"s": B01}},
        origin="pyro test_enum: global enumerated switch",
    ),
    Case(
        "guide_enum_plate_plate_kl",
        m_plate_plate_kl,
        g_plate_plate_kl,
        kind="guide_enum",
        brute={"guide": {"w": C2, "x": C2, "z": C2}},
        origin="numpyro test_enum_elbo: test_elbo_plate_plate",
    ),
    Case(
        "guide_enum_bernoulli",
        m_bernoulli_switch,
        g_bernoulli_switch_enum,
        (Y3,),
        kind="guide_enum",
        brute={"guide": {"x": B01}},
        origin="pyro test_valid_models: test_enum_discrete_single_ok",
    ),
    Case(
        "categorical_guide_reinforce",
        m_categorical,
        g_categorical,
        (Y4,),
        kind="reinforce",
        brute={"guide": {"c": C3}},
        origin="pyro test_enum: categorical latent",
    ),
    # Poisson support truncated at 16: the tail (about 1e-11 here) is below every tolerance
    Case(
        "poisson_guide_reinforce",
        m_poisson_latent,
        g_poisson_latent,
        (Y3 + 1.0,),
        kind="reinforce",
        brute={"guide": {"n": np.arange(16, dtype=np.int32)}},
        origin="pyro test_valid_models: non-reparameterised Poisson site",
    ),
    # --- NumPyro test/infer/test_svi.py
    Case(
        "normal_normal",
        m_normal_normal,
        g_normal_normal,
        (Y3,),
        origin="numpyro test_svi: basic normal-normal",
    ),
    Case(
        "beta_bernoulli",
        m_beta_bernoulli,
        g_beta_bernoulli,
        (BERN10,),
        origin="numpyro test_svi: test_beta_bernoulli",
    ),
    Case(
        "param_constraints",
        m_param_constraints,
        g_param_constraints,
        (_arr(0.4),),
        origin="numpyro test_svi: test_param",
    ),
    Case(
        "subsample_local_invariant",
        m_sub_local_invariant,
        g_sub_local_invariant,
        origin="numpyro test_svi: test_renyi_local",
    ),
    Case(
        "subsample_local_indexed",
        m_sub_local_indexed,
        g_sub_local_indexed,
        (Y20,),
        origin="numpyro test_svi: test_renyi_create_plates (random subsample)",
    ),
    Case(
        "global_latent_subsampled_data",
        m_global_sub,
        g_global_sub,
        renyi_refuses=True,
        origin="numpyro test_svi: plate subsampling with a global latent",
    ),
    Case(
        "shared_param_factor",
        m_shared_param,
        g_shared_param,
        origin="numpyro test_svi: test_shared_param",
    ),
    Case(
        "dynamic_support",
        m_dynamic_support,
        g_dynamic_support,
        (_arr(1.2),),
        origin="numpyro test_svi: test_elbo_dynamic_support",
    ),
    Case(
        "dirichlet_categorical",
        m_dirichlet,
        g_dirichlet,
        (CAT12,),
        origin="numpyro test_svi: dirichlet",
    ),
    Case(
        "gamma_poisson",
        m_gamma_poisson,
        g_gamma_poisson,
        (COUNTS5,),
        origin="numpyro test_svi: conjugate gamma-poisson",
    ),
    # --- NumPyro examples/
    Case(
        "linear_regression",
        m_linreg,
        g_linreg,
        (X_LIN, Y_LIN),
        origin="numpyro examples: bayesian regression",
    ),
    Case(
        "logistic_regression",
        m_logreg,
        g_logreg,
        (X_LOG, Y_LOG),
        origin="numpyro examples: logistic regression",
    ),
    Case(
        "poisson_regression",
        m_poisson_reg,
        g_poisson_reg,
        (X_POIS, Y_POIS),
        origin="numpyro examples: count regression",
    ),
    Case(
        "eight_schools_noncentered",
        m_schools,
        g_schools,
        (SCHOOLS_Y, SCHOOLS_SIGMA),
        origin="numpyro examples: eight schools, non-centred",
    ),
    Case("vae_mlp", m_vae, g_vae, (VAE_X,), origin="numpyro examples: vae (jnp MLP)"),
    Case(
        "phi_times_latent_vector",
        m_phi_x,
        g_phi_x,
        (PHI, Y_PHI),
        origin="pyro test_valid_models: latent vector times a matrix",
    ),
    Case(
        "mvn_lower_cholesky",
        m_mvn_phi,
        g_mvn_phi,
        (PHI3, Y_PHI3),
        origin="numpyro examples: full-rank guide",
    ),
    Case(
        "random_walk_scan",
        m_random_walk,
        g_random_walk,
        (Y_RW,),
        origin="numpyro examples: time series with scan",
    ),
    Case("mask_handler", m_masked, g_masked, (Y6,), origin="pyro test_valid_models: mask"),
    Case("scale_handler", m_scaled, g_scaled, (Y3,), origin="pyro test_valid_models: scale"),
    Case(
        "deterministic_sites",
        m_deterministic,
        g_deterministic,
        (Y3,),
        origin="numpyro examples: deterministic sites",
    ),
    Case(
        "factor_in_plate",
        m_factor_plate,
        g_factor_plate,
        (Y4,),
        origin="numpyro test_svi: numpyro.factor",
    ),
    Case(
        "sites_shaped_2x3",
        m_shape_2x3,
        g_shape_2x3,
        (Y23,),
        origin="pyro test_valid_models: batch-shaped sites without plates",
    ),
]

CASE_BY_NAME = {c.name: c for c in CASES}
assert len(CASE_BY_NAME) == len(CASES)


# ---------------------------------------------------------------------------
# params: traced here, independently of ppl
# ---------------------------------------------------------------------------


def _param_sites(case):
    """``{name: (constrained init, constraint)}`` of every param, guide first."""
    found = {}
    gtr = handlers.trace(handlers.seed(case.guide, 0)).get_trace(*case.args)
    values = {}
    for name, site in gtr.items():
        if site["type"] == "param":
            found[name] = (site["value"], site["kwargs"].get("constraint", C.real))
            values[name] = site["value"]
    model = handlers.replay(handlers.seed(case.model, 1), gtr)
    mtr = handlers.trace(handlers.substitute(model, data=values)).get_trace(*case.args)
    for name, site in mtr.items():
        if site["type"] == "param" and name not in found:
            found[name] = (site["value"], site["kwargs"].get("constraint", C.real))
    return found


_CACHE: dict = {}


def _cached(key, fn):
    if key not in _CACHE:
        _CACHE[key] = fn()
    return _CACHE[key]


def constraints_of(case):
    return _cached(
        ("constraints", case.name), lambda: {k: c for k, (_, c) in _param_sites(case).items()}
    )


def initial_params(case):
    """Unconstrained initial values (``biject_to(c).inv``), before the perturbation."""
    return _cached(
        ("init", case.name),
        lambda: {k: biject_to(c).inv(jnp.asarray(v)) for k, (v, c) in _param_sites(case).items()},
    )


def params_of(case):
    def make():
        out = {}
        for i, (k, v) in enumerate(sorted(initial_params(case).items())):
            noise = jax.random.normal(jax.random.PRNGKey(100 + i), jnp.shape(v))
            out[k] = jnp.asarray(v + 0.15 * noise, jnp.float32)
        return out

    return _cached(("params", case.name), make)


def constrain(case, params):
    cons = constraints_of(case)
    return {k: biject_to(cons[k])(v) for k, v in params.items()}


def case_key(case, salt=0):
    return jax.random.PRNGKey(zlib.crc32(case.name.encode()) % 100003 + 7919 * salt)


# ---------------------------------------------------------------------------
# references
# ---------------------------------------------------------------------------


def _site_log_prob(site):
    lp = site["fn"].log_prob(site["value"])
    if site.get("scale") is not None:
        lp = lp * site["scale"]
    return lp


def _reduce(tr, keep):
    """Sum of the sample sites' scaled log densities; ``keep``: plate kept per element."""
    total = 0.0
    for site in tr.values():
        if site["type"] != "sample":
            continue
        lp = _site_log_prob(site)
        if keep is None:
            total = total + jnp.sum(lp)
        else:
            dim = {f.name: f.dim for f in site["cond_indep_stack"]}[keep]
            axes = tuple(i for i in range(jnp.ndim(lp)) if i != jnp.ndim(lp) + dim)
            total = total + jnp.sum(lp, axis=axes)
    return total


def common_plate(case, params_c):
    """The plate (name, size/subsample scale) enclosing every model sample site, or None."""
    tr = handlers.trace(
        handlers.seed(handlers.substitute(case.hand_model or case.model, data=params_c), 0)
    ).get_trace(*case.args)
    stacks = [{f.name for f in s["cond_indep_stack"]} for s in tr.values() if s["type"] == "sample"]
    common = set.intersection(*stacks) if stacks else set()
    assert len(common) <= 1, "the references here handle at most one common plate"
    if not common:
        return None, 1.0
    name = next(iter(common))
    size, sub = tr[name]["args"][0], tr[name]["args"][1]
    return name, float(size) / float(sub if sub is not None else size)


def hand_renyi(case, params_c, key, alpha, num):
    """RenyiELBO's computation (same keys, same plate seeding) without its refusal of
    subsampled plates that do not enclose every site: per-particle log weights kept per
    element of the common plate (without its subsample scale), then the Rényi bound per
    element, summed and scaled."""
    model = case.hand_model or case.model
    keep, scale = common_plate(case, params_c)
    plate_key, rng_key = jax.random.split(key)
    hide = ["sample", "prng_key", "control_flow"]
    model = handlers.seed(handlers.substitute(model, data=params_c), plate_key, hide_types=hide)
    guide = handlers.seed(
        handlers.substitute(case.guide, data=params_c), plate_key, hide_types=hide
    )

    def one(pk):
        model_seed, guide_seed = jax.random.split(pk)
        gtr = handlers.trace(handlers.seed(guide, guide_seed)).get_trace(*case.args)
        mtr = handlers.trace(handlers.replay(handlers.seed(model, model_seed), gtr)).get_trace(
            *case.args
        )
        return (_reduce(mtr, keep) - _reduce(gtr, keep)) / scale

    log_w = jax.vmap(one)(jax.random.split(rng_key, num))
    bound = (logsumexp((1.0 - alpha) * log_w, axis=0) - math.log(num)) / (1.0 - alpha)
    return jnp.sum(bound) * scale


def numpyro_objective(case, obj, params_c, key):
    """The NumPyro objective (maximised) that ppl's ``obj`` must equal under ``key``."""
    alpha = OBJECTIVES[obj]
    if alpha is None:
        if case.kind == "enum" and not case.trace_enum_ok:
            return -Trace_ELBO().loss(key, params_c, case.hand_model, case.guide, *case.args)
        loss = TraceEnum_ELBO() if case.kind in ("enum", "guide_enum") else Trace_ELBO()
        return -loss.loss(key, params_c, case.model, case.guide, *case.args)
    if case.renyi_refuses:
        return hand_renyi(case, params_c, key, alpha, K)
    model = case.hand_model or case.model
    return -RenyiELBO(alpha=alpha, num_particles=K).loss(
        key, params_c, model, case.guide, *case.args
    )


def _exact_reference(case, obj):
    return case.kind in ("exact", "enum") or (case.kind == "guide_enum" and obj == "elbo")


def references(case):
    """NumPyro's value and gradient (exact references) or value (``reinforce``) for every
    objective of ``case`` under ``case_key(case)``, in one compiled function per case."""

    def make():
        params, key = params_of(case), case_key(case)

        def one(obj, p):
            return numpyro_objective(case, obj, constrain(case, p), key)

        def all_refs(p):
            out = {}
            for obj in OBJECTIVES:
                if _exact_reference(case, obj):
                    out[obj] = jax.value_and_grad(lambda q, o=obj: one(o, q))(p)
                elif case.kind == "reinforce":
                    out[obj] = (one(obj, p), None)
            return out

        return jax.jit(all_refs)(params)

    return _cached(("refs", case.name), make)


def _all_values(support, shape):
    n = int(np.prod(shape, dtype=int))
    combos = np.array(list(itertools.product(list(support), repeat=n)), dtype=support.dtype)
    return jnp.asarray(combos.reshape((-1,) + tuple(shape)))


def _joint(sites, shapes):
    """Every joint assignment of ``sites``: ``{name: [M, *shape]}`` (M = 1 if no site)."""
    if not sites:
        return {}, 1
    grids = [_all_values(sup, shapes[name]) for name, sup in sites.items()]
    sizes = [g.shape[0] for g in grids]
    idx = np.indices(sizes).reshape(len(sizes), -1)
    return {n: g[i] for n, g, i in zip(sites, grids, idx, strict=True)}, idx.shape[1]


def _site_shapes(case, params_c):
    gtr = handlers.trace(
        handlers.seed(handlers.substitute(case.guide, data=params_c), 0)
    ).get_trace(*case.args)
    mtr = handlers.trace(
        handlers.replay(handlers.seed(handlers.substitute(case.model, data=params_c), 0), gtr)
    ).get_trace(*case.args)
    return {
        n: tuple(jnp.shape(s["value"]))
        for tr in (gtr, mtr)
        for n, s in tr.items()
        if s["type"] == "sample"
    }


def brute_objective(case, params_c, alpha, num, model=None):
    """The exact objective, summing over the guide's discrete values (and the model-only
    enumerated sites): E over ``num`` iid guide draws of the Rényi bound of their weights.

    ``brute["local"]``: every site lies in that plate and each element's values are
    independent, so the bound is summed per element (an element's assignment is broadcast
    over the plate; the subsample scale is applied at the end)."""
    spec = case.brute
    model = model or case.model
    keep = spec.get("local")
    shapes = _site_shapes(case, params_c)
    if keep is not None:  # one value per element, broadcast over the plate
        g_sites, m_sites = spec["guide"], spec.get("model", {})
        g_vals, m = _joint(g_sites, {n: () for n in g_sites})
        g_vals = {
            n: jnp.broadcast_to(v.reshape((-1,) + (1,) * len(shapes[n])), (m,) + shapes[n])
            for n, v in g_vals.items()
        }
        m_vals, _ = _joint(m_sites, {n: () for n in m_sites})
        m_vals = {
            n: jnp.broadcast_to(v.reshape((-1,) + (1,) * len(shapes[n])), (v.shape[0],) + shapes[n])
            for n, v in m_vals.items()
        }
        _, scale = common_plate(case, params_c)
    else:
        g_vals, m = _joint(spec["guide"], shapes)
        m_vals, _ = _joint(spec.get("model", {}), shapes)
        scale = 1.0

    def log_q(a):
        fn = handlers.substitute(handlers.seed(case.guide, 0), data={**params_c, **a})
        return _reduce(handlers.trace(fn).get_trace(*case.args), keep)

    def log_p(a, b):
        fn = handlers.substitute(handlers.seed(model, 0), data={**params_c, **a, **b})
        return _reduce(handlers.trace(fn).get_trace(*case.args), keep)

    lq = jax.vmap(log_q)(g_vals) / scale  # [M] or [M, N]
    if m_vals and model is case.model:
        lp = jax.vmap(lambda a: logsumexp(jax.vmap(lambda b: log_p(a, b))(m_vals), 0))(g_vals)
    else:
        lp = jax.vmap(lambda a: log_p(a, {}))(g_vals)
    lw = lp / scale - lq
    if alpha is None or num == 1:
        per = jnp.sum(jnp.exp(lq) * lw, axis=0)
    else:
        idx = jnp.asarray(np.indices((m,) * num).reshape(num, -1).T)  # [M^num, num]
        w = jnp.exp(jnp.sum(lq[idx], axis=1))
        val = (logsumexp((1.0 - alpha) * lw[idx], axis=1) - math.log(num)) / (1.0 - alpha)
        per = jnp.sum(w * val, axis=0)
    return jnp.sum(per) * scale


def brute_value_and_grad(case, obj, params):
    alpha = OBJECTIVES[obj]
    num = 1 if alpha is None else K

    def f(p):
        return brute_objective(case, constrain(case, p), alpha, num)

    return _cached(("brute", case.name, obj), lambda: jax.jit(jax.value_and_grad(f))(params))


# ---------------------------------------------------------------------------
# ppl under test
# ---------------------------------------------------------------------------


def ppl_objective(obj):
    if obj == "elbo":
        return ppl.objectives.elbo
    if obj == "iwelbo3":
        return ppl.objectives.iwelbo(K)
    return ppl.objectives.renyi(0.5, K)


def ppl_value_and_grad(case, obj, params, key):
    f = ppl.value_and_grad(ppl_objective(obj), case.model, case.guide)
    return jax.jit(f)(params, key, *case.args)


def ppl_many(case, obj, params, first_key=None, seed=0):
    """``NUM_KEYS`` independent ppl estimates at once: ``(values [n], grads {k: [n, ...]})``;
    the first one under ``first_key`` when given."""
    f = ppl.value_and_grad(ppl_objective(obj), case.model, case.guide)
    keys = jax.random.split(jax.random.PRNGKey(seed), NUM_KEYS)
    if first_key is not None:
        keys = keys.at[0].set(first_key)
    # lax.map, not vmap: vmapping ppl's surrogate over 10 keys of enum_chain_in_plate
    # (iwelbo) crashed XLA's CPU runtime with a segfault, which ends the whole session.
    return jax.jit(lambda ks: jax.lax.map(lambda k: f(params, k, *case.args), ks))(keys)


# ---------------------------------------------------------------------------
# assertions
# ---------------------------------------------------------------------------


def assert_close(actual, expected, what, tol=1e-5):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    scale = max(1.0, float(np.max(np.abs(expected))) if expected.size else 1.0)
    np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol * scale, err_msg=what)


def assert_grads_close(actual, expected, what):
    assert set(actual) == set(expected), f"{what}: grads keys {set(actual)} != {set(expected)}"
    for k in expected:
        assert_close(actual[k], expected[k], f"{what}: d/d{k}")


def assert_mean_matches(samples, exact, what):
    """The mean of ``samples`` (leading axis) is within 4 standard errors of ``exact``."""
    x = np.asarray(samples, np.float64)
    exact = np.asarray(exact, np.float64)
    assert np.all(np.isfinite(x)), f"{what}: non-finite estimates"
    mean = x.mean(0)
    se = x.std(0, ddof=1) / math.sqrt(x.shape[0])
    tol = 4.0 * se + 1e-4 * (1.0 + np.abs(exact))
    bad = np.abs(mean - exact) > tol
    assert not np.any(bad), (
        f"{what}: mean {mean} vs exact {exact} (4 s.e. + 1e-4: {tol}; {x.shape[0]} keys)"
    )


# ---------------------------------------------------------------------------
# the tests
# ---------------------------------------------------------------------------


def check_peer(case, obj):
    """One case under one objective against its reference (see the module docstring)."""
    params = params_of(case)
    key = case_key(case)
    if _exact_reference(case, obj):
        value, grads = ppl_value_and_grad(case, obj, params, key)
        ref_value, ref_grads = references(case)[obj]
        assert_close(value, ref_value, f"{case.name}/{obj}: value")
        assert_grads_close(grads, ref_grads, f"{case.name}/{obj}")
        return
    exact_value, exact_grads = brute_value_and_grad(case, obj, params)
    values, grads = ppl_many(case, obj, params, first_key=key)
    if case.kind == "reinforce":
        # the value is an ordinary estimate: NumPyro's under the same key
        assert_close(values[0], references(case)[obj][0], f"{case.name}/{obj}: value")
    assert set(grads) == set(exact_grads), f"grads keys {set(grads)} != {set(exact_grads)}"
    if case.kind != "reinforce":
        assert_mean_matches(values, exact_value, f"{case.name}/{obj}: value")
    for k in exact_grads:
        assert_mean_matches(grads[k], exact_grads[k], f"{case.name}/{obj}: d/d{k}")


# One class per objective: pytest-xdist's loadscope sends each class to a worker of its own,
# so the corpus (about 6 minutes of one core) does not run on a single worker.
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
class TestPeerElbo:
    def test_peer(self, case):
        check_peer(case, "elbo")


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
class TestPeerIwelbo3:
    def test_peer(self, case):
        check_peer(case, "iwelbo3")


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
class TestPeerRenyi05_3:
    def test_peer(self, case):
        check_peer(case, "renyi05_3")


def test_every_objective_has_its_class():
    classes = {TestPeerElbo: "elbo", TestPeerIwelbo3: "iwelbo3", TestPeerRenyi05_3: "renyi05_3"}
    assert sorted(classes.values()) == sorted(OBJECTIVES)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_init_params_agree(case):
    """ppl.init_params returns the unconstrained initial value of every param."""
    got = ppl.init_params(jax.random.PRNGKey(0), case.model, case.guide, *case.args)
    want = initial_params(case)
    assert set(got) == set(want)
    for k in want:
        assert_close(got[k], want[k], f"{case.name}: init {k}")


def _numpyro_many(loss, case, params, model=None, seed=1):
    """NumPyro ``-loss`` values and gradients (w.r.t. unconstrained params) over many keys."""
    model = model or case.model

    def f(p, k):
        return -loss.loss(k, constrain(case, p), model, case.guide, *case.args)

    keys = jax.random.split(jax.random.PRNGKey(seed), NUM_KEYS)
    return jax.jit(jax.vmap(jax.value_and_grad(f), in_axes=(None, 0)))(params, keys)


def _enum_sum_matches_hand_model(case, params_c, key):
    """Summing the model's enumerated sites by brute force at a guide draw gives the hand
    model's log density there."""
    gtr = handlers.trace(
        handlers.seed(handlers.substitute(case.guide, data=params_c), key)
    ).get_trace(*case.args)
    latents = {
        n: s["value"] for n, s in gtr.items() if s["type"] == "sample" and not s["is_observed"]
    }
    vals, _ = _joint(case.brute["model"], _site_shapes(case, params_c))

    def joint(b):
        return log_density(case.model, case.args, {}, {**params_c, **latents, **b})[0]

    summed = logsumexp(jax.vmap(joint)(vals))
    hand = log_density(case.hand_model, case.args, {}, {**params_c, **latents})[0]
    assert_close(summed, hand, "brute-force sum over the enumerated sites vs hand_model")


# hand_renyi is checked against RenyiELBO on the cases whose features it must reproduce
# (plates kept per element, subsampling, mask, scale, factor, vectorised particles); every
# case with another kind of reference is checked.
SELFCHECK = [
    c
    for c in CASES
    if c.kind != "exact"
    or c.renyi_refuses
    or c.name
    in {
        "nested_plates",
        "plate_reuse",
        "subsample_local_invariant",
        "subsample_local_indexed",
        "mask_handler",
        "scale_handler",
        "factor_in_plate",
        "vae_mlp",
        "random_walk_scan",
    }
]


@pytest.mark.slow  # 28 statistical checks of the test's own brute-force engine
@pytest.mark.parametrize("case", SELFCHECK, ids=[c.name for c in SELFCHECK])
def test_reference_selfcheck(case):
    """The references used above agree with NumPyro (and brute force) wherever they can."""
    params = params_of(case)
    pc = constrain(case, params)
    key = case_key(case, salt=1)
    if case.kind == "exact":
        if case.renyi_refuses:
            with pytest.raises(ValueError, match="subsampling"):
                RenyiELBO(num_particles=K).loss(key, pc, case.model, case.guide, *case.args)
            return
        for alpha in (0.0, 0.5):
            ref = -RenyiELBO(alpha=alpha, num_particles=K).loss(
                key, pc, case.model, case.guide, *case.args
            )
            assert_close(hand_renyi(case, pc, key, alpha, K), ref, f"hand_renyi({alpha})")
        return
    if case.kind == "enum":
        _enum_sum_matches_hand_model(case, pc, key)
        if case.trace_enum_ok:
            enum_vg = jax.value_and_grad(
                lambda p: (
                    -TraceEnum_ELBO().loss(
                        key, constrain(case, p), case.model, case.guide, *case.args
                    )
                )
            )(params)
            hand_vg = jax.value_and_grad(
                lambda p: (
                    -Trace_ELBO().loss(
                        key, constrain(case, p), case.hand_model, case.guide, *case.args
                    )
                )
            )(params)
            assert_close(enum_vg[0], hand_vg[0], "TraceEnum(model) vs Trace(hand_model): value")
            assert_grads_close(enum_vg[1], hand_vg[1], "TraceEnum(model) vs Trace(hand_model)")
        return
    # brute-force objective vs the mean of NumPyro's unbiased estimates
    exact_elbo, exact_elbo_grads = brute_value_and_grad(case, "elbo", params)
    values, grads = _numpyro_many(TraceEnum_ELBO(), case, params)
    assert_mean_matches(values, exact_elbo, "TraceEnum_ELBO value vs brute elbo")
    for k in exact_elbo_grads:
        assert_mean_matches(grads[k], exact_elbo_grads[k], f"TraceEnum_ELBO d/d{k}")
    exact_iw, _ = brute_value_and_grad(case, "iwelbo3", params)
    if case.hand_model is not None:  # model-side sums: brute force on the hand model agrees
        for alpha, num in ((None, 1), (0.0, K), (0.5, K)):
            hand = jax.jit(
                lambda q, a=alpha, n=num: brute_objective(case, q, a, n, case.hand_model)
            )
            sums = jax.jit(lambda q, a=alpha, n=num: brute_objective(case, q, a, n))
            assert_close(hand(pc), sums(pc), f"brute force, hand_model vs model sums ({alpha})")
    values, _ = _numpyro_many(
        RenyiELBO(alpha=0.0, num_particles=K), case, params, model=case.hand_model
    )
    assert_mean_matches(values, exact_iw, "RenyiELBO(0, 3) value vs brute iwelbo")


def test_corpus_size():
    assert len(CASES) >= 40
    kinds = {c.kind for c in CASES}
    assert kinds == {"exact", "enum", "reinforce", "guide_enum", "brute"}
