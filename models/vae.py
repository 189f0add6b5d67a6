"""Variational autoencoder on binarised 8×8 digits (``ppl fit vae``).

Data: scikit-learn's digits (ships with scikit-learn, no network), pixels > 7 → 1, float32,
1797 images split 1500 train / 297 test by a seeded permutation
(``numpy.random.default_rng(0)``).

Networks are plain weight matrices (``numpyro.param`` sites, Glorot-uniform initial values
from a fixed seed), so :func:`encoder` and :func:`decoder` are pure functions of a params
dict and can be reused outside NumPyro (e.g. a hand-written JAX ELBO)::

    params = init_params()                       # {"enc_w1": [64,128], ..., "dec_w2": [128,64]}
    loc, scale = encoder(params, x)              # [N, 8], [N, 8]
    logits = decoder(params, z)                  # [N, 64] Bernoulli logits

Architecture: encoder 64 → 128 (leaky-ReLU) → loc[8], softplus scale[8]; decoder
8 → 128 (leaky-ReLU) → 64 Bernoulli logits.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist

from ppl.models.registry import FitResult, ModelSpec, Problem, register

__all__ = [
    "DATA_DIM",
    "HIDDEN_DIM",
    "LATENT_DIM",
    "NUM_TEST",
    "NUM_TRAIN",
    "decoder",
    "encoder",
    "init_params",
    "load_digits_binarised",
    "vae_guide",
    "vae_model",
]

DATA_DIM = 64
HIDDEN_DIM = 128
LATENT_DIM = 8
NUM_TRAIN = 1500
NUM_TEST = 297
ENCODER_PARAMS = ("enc_w1", "enc_b1", "enc_w_loc", "enc_b_loc", "enc_w_scale", "enc_b_scale")
DECODER_PARAMS = ("dec_w1", "dec_b1", "dec_w2", "dec_b2")


# --------------------------------------------------------------------------------- data


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    x = (load_digits().data > 7).astype(np.float32)
    perm = np.random.default_rng(0).permutation(x.shape[0])
    train, test = x[perm[:NUM_TRAIN]], x[perm[NUM_TRAIN:]]
    train.setflags(write=False)
    test.setflags(write=False)
    return train, test


def load_digits_binarised(split: str = "train") -> np.ndarray:
    """Binarised digits, float32 ``[1500, 64]`` (``"train"``), ``[297, 64]`` (``"test"``)
    or ``[1797, 64]`` (``"all"``, train then test); the split is the same on every call."""
    train, test = _digits()
    if split == "train":
        return train.copy()
    if split == "test":
        return test.copy()
    if split == "all":
        return np.concatenate([train, test])
    raise ValueError(
        f"load_digits_binarised(split) must be 'train', 'test' or 'all', got {split!r}"
    )


# ----------------------------------------------------------------------------- networks


def _glorot(rng: np.random.Generator, fan_in: int, fan_out: int) -> np.ndarray:
    limit = np.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-limit, limit, size=(fan_in, fan_out)).astype(np.float32)


@functools.lru_cache(maxsize=16)
def _init_params(seed: int, latent_dim: int, hidden_dim: int, data_dim: int) -> dict:
    rng = np.random.default_rng(seed)
    p = {
        "enc_w1": _glorot(rng, data_dim, hidden_dim),
        "enc_b1": np.zeros(hidden_dim, np.float32),
        "enc_w_loc": _glorot(rng, hidden_dim, latent_dim),
        "enc_b_loc": np.zeros(latent_dim, np.float32),
        "enc_w_scale": _glorot(rng, hidden_dim, latent_dim),
        "enc_b_scale": np.zeros(latent_dim, np.float32),
        "dec_w1": _glorot(rng, latent_dim, hidden_dim),
        "dec_b1": np.zeros(hidden_dim, np.float32),
        "dec_w2": _glorot(rng, hidden_dim, data_dim),
        "dec_b2": np.zeros(data_dim, np.float32),
    }
    for v in p.values():
        v.setflags(write=False)
    return p


def init_params(
    seed: int = 0,
    latent_dim: int = LATENT_DIM,
    hidden_dim: int = HIDDEN_DIM,
    data_dim: int = DATA_DIM,
) -> dict[str, np.ndarray]:
    """Deterministic initial weights: Glorot-uniform matrices, zero biases (numpy float32).

    The model and guide use these (``seed=0``) as the initial values of their
    ``numpyro.param`` sites, so the same seed gives the same network everywhere.
    """
    return dict(_init_params(int(seed), int(latent_dim), int(hidden_dim), int(data_dim)))


def encoder(params, x):
    """``x [..., 64] -> (loc [..., L], scale [..., L])``; scale = softplus(.) + 1e-4."""
    h = jax.nn.leaky_relu(x @ params["enc_w1"] + params["enc_b1"])
    loc = h @ params["enc_w_loc"] + params["enc_b_loc"]
    scale = jax.nn.softplus(h @ params["enc_w_scale"] + params["enc_b_scale"]) + 1e-4
    return loc, scale


def decoder(params, z):
    """``z [..., L] -> logits [..., 64]`` of independent Bernoulli pixels."""
    h = jax.nn.leaky_relu(z @ params["dec_w1"] + params["dec_b1"])
    return h @ params["dec_w2"] + params["dec_b2"]


def _params(names, latent_dim, hidden_dim, data_dim):
    init = _init_params(0, latent_dim, hidden_dim, data_dim)
    return {k: numpyro.param(k, init[k]) for k in names}


# ------------------------------------------------------------------------ model & guide


def vae_model(x, batch_size=None, *, latent_dim: int = LATENT_DIM, hidden_dim: int = HIDDEN_DIM):
    """``z_n ~ Normal(0, I_L)``, ``x_n ~ Bernoulli(logits=decoder(z_n))`` over plate ``data``
    (subsampled to ``batch_size`` when given)."""
    n, d = x.shape
    params = _params(DECODER_PARAMS, latent_dim, hidden_dim, d)
    with numpyro.plate("data", n, subsample_size=batch_size):
        xb = numpyro.subsample(x, event_dim=1)
        z = numpyro.sample("z", dist.Normal(0.0, 1.0).expand([latent_dim]).to_event(1))
        numpyro.sample("x", dist.Bernoulli(logits=decoder(params, z)).to_event(1), obs=xb)


def vae_guide(x, batch_size=None, *, latent_dim: int = LATENT_DIM, hidden_dim: int = HIDDEN_DIM):
    """Amortised ``q(z_n | x_n) = Normal(encoder(x_n))``."""
    n, d = x.shape
    params = _params(ENCODER_PARAMS, latent_dim, hidden_dim, d)
    with numpyro.plate("data", n, subsample_size=batch_size):
        xb = numpyro.subsample(x, event_dim=1)
        loc, scale = encoder(params, xb)
        numpyro.sample("z", dist.Normal(loc, scale).to_event(1))


# ------------------------------------------------------------------------------ command


def _options(group):
    group.add_argument(
        "--batch-size",
        type=int,
        default=128,
        metavar="B",
        help="minibatch size (images per step; 0 = full batch of 1500) (default: %(default)s)",
    )
    group.add_argument(
        "--latent-dim",
        type=int,
        default=LATENT_DIM,
        metavar="L",
        help="latent dimension (default: %(default)s)",
    )
    group.add_argument(
        "--hidden-dim",
        type=int,
        default=HIDDEN_DIM,
        metavar="H",
        help="hidden units of encoder and decoder (default: %(default)s)",
    )


def _validate(opts):
    if not 0 <= opts.batch_size <= NUM_TRAIN:
        raise ValueError(f"--batch-size must be in 0..{NUM_TRAIN}, got {opts.batch_size}")
    if opts.latent_dim < 1:
        raise ValueError(f"--latent-dim must be >= 1, got {opts.latent_dim}")
    if opts.hidden_dim < 1:
        raise ValueError(f"--hidden-dim must be >= 1, got {opts.hidden_dim}")


def _build(opts) -> Problem:
    train = jnp.asarray(load_digits_binarised("train"))
    test = jnp.asarray(load_digits_binarised("test"))
    size = {"latent_dim": opts.latent_dim, "hidden_dim": opts.hidden_dim}
    model = functools.partial(vae_model, **size)
    guide = functools.partial(vae_guide, **size)
    batch = opts.batch_size or None
    return Problem(
        model=model,
        guide=guide,
        args=(train,),
        kwargs={"batch_size": batch},
        eval_args=(test,),  # posterior.nc: the amortised posterior of the held-out images
        eval_kwargs={"batch_size": None},
        data={"train": train, "test": test},
    )


def plot_reconstructions(params, test, *, num: int = 10, seed: int = 0):
    """Figure: test images, their reconstructions (decoder mean at the encoder mean) and
    images decoded from prior samples (pixel probabilities)."""
    import matplotlib.pyplot as plt

    num = min(num, test.shape[0])
    x = np.asarray(test[:num])
    loc, _ = encoder(params, x)
    recon = np.asarray(jax.nn.sigmoid(decoder(params, loc)))
    latent_dim = params["dec_w1"].shape[0]
    z = np.random.default_rng(seed).standard_normal((num, latent_dim)).astype(np.float32)
    samples = np.asarray(jax.nn.sigmoid(decoder(params, z)))
    rows = [("test", x), ("reconstruction", recon), ("prior sample", samples)]
    fig, axes = plt.subplots(len(rows), num, figsize=(1.1 * num, 1.3 * len(rows) + 0.4))
    axes = np.asarray(axes).reshape(len(rows), num)
    for r, (label, imgs) in enumerate(rows):
        for c in range(num):
            ax = axes[r, c]
            ax.imshow(imgs[c].reshape(8, 8), cmap="gray_r", vmin=0.0, vmax=1.0)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r, 0].set_ylabel(label, fontsize=8)
    fig.suptitle("VAE on binarised digits: held-out reconstructions and prior samples")
    fig.tight_layout()
    return fig


def _plot(fit: FitResult, problem: Problem, out_dir):
    if not fit.params:
        raise ValueError("the VAE plot needs the fitted network parameters")
    return {"reconstructions": plot_reconstructions(fit.params, problem.data["test"])}


def _summary(idata):
    """``az.summary`` of the latent codes of the first 5 held-out images (the full table
    has 297 × L rows)."""
    import arviz as az

    post = idata.posterior
    var = "z" if "z" in post else next(iter(post.data_vars))
    da = post[var]
    extra = [d for d in da.dims if d not in ("chain", "draw")]
    if extra:
        da = da.isel({extra[0]: slice(0, 5)})
    return az.summary(da.to_dataset(name=var))


register(
    ModelSpec(
        name="vae",
        description="variational autoencoder (MLP, 8-d latent) on binarised 8x8 digits",
        build=_build,
        plot=_plot,
        options=_options,
        validate=_validate,
        inference=("svi",),
        default_steps=5000,
        default_lr=3e-3,
        default_num_samples=100,
        summary=_summary,
        details=(
            "Fits on the 1500 training images of scikit-learn's digits (pixels > 7 -> 1) "
            "with minibatches; posterior.nc holds the amortised posterior of the 297 "
            "held-out images; reconstructions.png shows held-out reconstructions and "
            "prior samples."
        ),
    )
)
