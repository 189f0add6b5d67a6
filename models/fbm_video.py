"""A mini-video latent SDE: a Gaussian blob driven by a fractional OU process (spec B3).

The small-scale version of the reference's ``ball`` data set: a blob's centre
``c(t) = centre + scale·X(t)`` follows a 2-d fractional OU process
dX = −θX dt + σ dB^H (exact fBM, :func:`ppl.models.fbm_sde.simulate_fou`), rendered on a
``size × size`` canvas at ``num_frames`` frames (``frame_dt`` apart) with pixel noise.

The model is a :class:`~ppl.models.fbm_sde.LatentSDE` with a convolutional encoder (frame
→ context features, the guide's input) and decoder (latent state → frame), at half the
reference's width and without its GroupNorm and content vector (the blob has no content
to carry): the latent dynamics, learned H and Girsanov ELBO are the family's own.

Example (two short clips and the model for them):

>>> data = simulate_video(0, hurst=0.7, num_sequences=2, num_frames=6)
>>> data["ys"].shape                          # [B, T, size·size]
(2, 6, 1024)
>>> sde = video_sde(horizon=float(data["ts"][-1]))
>>> sde.dim, sde.obs_dim, sde.hurst is None   # H is learned
(2, 1024, True)
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ppl.models.fbm_sde import LatentSDE, simulate_fou

__all__ = ["VideoDecoder", "VideoEncoder", "render", "simulate_video", "video_sde"]


def render(centres, size: int = 32, blob_sd: float = 2.0):
    """Gaussian blobs at pixel ``centres [..., 2]`` (row, column): frames ``[..., size²]``
    with values in (0, 1] (1 at the centre).

    >>> render(np.array([[15.5, 15.5]]), size=32).shape
    (1, 1024)
    """
    grid = np.arange(size, dtype=np.float64)
    c = np.asarray(centres, dtype=np.float64)
    d2 = (grid - c[..., 0, None]) ** 2  # [..., size] over rows
    e2 = (grid - c[..., 1, None]) ** 2  # [..., size] over columns
    img = np.exp(-(d2[..., :, None] + e2[..., None, :]) / (2.0 * blob_sd**2))
    return img.reshape(*c.shape[:-1], size * size)


def simulate_video(
    seed: int = 0,
    *,
    hurst: float = 0.7,
    num_sequences: int = 64,
    num_frames: int = 20,
    frame_dt: float = 0.1,
    size: int = 32,
    scale: float = 5.0,
    blob_sd: float = 2.0,
    theta: float = 1.0,
    sigma: float = 1.0,
    pixel_sd: float = 0.05,
    fbm_type: str = "I",
) -> dict:
    """Clips of a blob whose centre follows a 2-d fOU process started at the canvas centre.

    :param hurst: H of the driving fBM (exact, Cholesky; both coordinates independent).
    :param num_frames, frame_dt: frames at t = frame_dt, 2·frame_dt, …
    :param scale: pixels per unit of X (the stationary sd of X is about 1 at H = ½).
    :param pixel_sd: sd of the Gaussian pixel noise.
    :return: ``{"ts": [T], "ys": [B, T, size²] (noisy frames), "frames": [B, T, size²]
        (clean), "xs": [B, T, 2] (the latent path), "hurst", "size", "scale", "obs_sd"}``.

    >>> d = simulate_video(1, num_sequences=3, num_frames=5, size=16)
    >>> d["ys"].shape, d["xs"].shape
    ((3, 5, 256), (3, 5, 2))
    """
    for name, v in (("num_sequences", num_sequences), ("num_frames", num_frames)):
        if int(v) < 1:
            raise ValueError(f"{name} must be a positive integer, got {v}")
    if int(size) < 8:
        raise ValueError(f"size must be at least 8 pixels, got {size}")
    if not (frame_dt > 0 and scale > 0 and blob_sd > 0 and pixel_sd >= 0):
        raise ValueError("frame_dt, scale and blob_sd must be > 0 and pixel_sd ≥ 0")
    fou = simulate_fou(
        seed, hurst=hurst, num_paths=2 * int(num_sequences), num_times=int(num_frames),
        horizon=frame_dt * num_frames, theta=theta, sigma=sigma, obs_sd=0.0,
        fbm_type=fbm_type,
    )  # fmt: skip
    xs = fou["xs"][..., 0].reshape(int(num_sequences), 2, int(num_frames)).transpose(0, 2, 1)
    centre = (size - 1) / 2.0
    frames = render(centre + scale * xs, size, blob_sd)
    rng = np.random.default_rng([seed, 1])
    ys = frames + pixel_sd * rng.standard_normal(frames.shape)
    return dict(
        ts=fou["ts"],
        ys=ys.astype(np.float32),
        frames=frames.astype(np.float32),
        xs=xs,
        hurst=float(hurst),
        size=int(size),
        scale=float(scale),
        obs_sd=float(pixel_sd),
    )


class VideoEncoder(eqx.Module):
    """One frame ``[size²]`` → features ``[features]``: three [Conv3×3 → MaxPool2 → SiLU]
    blocks (``channels``) and a linear map of the flattened ``(size/8)²·channels[-1]``."""

    convs: list
    head: eqx.nn.Linear
    size: int = eqx.field(static=True)

    def __init__(self, key, *, size=32, channels=(8, 16, 16), features=32):
        if size % 8:
            raise ValueError(f"size must be a multiple of 8, got {size}")
        keys = jax.random.split(key, len(channels) + 1)
        c_in = (1, *channels[:-1])
        self.convs = [
            eqx.nn.Conv2d(a, b, 3, padding=1, key=k)
            for a, b, k in zip(c_in, channels, keys, strict=False)
        ]
        self.head = eqx.nn.Linear((size // 8) ** 2 * channels[-1], features, key=keys[-1])
        self.size = size

    def __call__(self, frame):
        h = frame.reshape(1, self.size, self.size)
        for conv in self.convs:
            h = conv(h)
            c, n, _ = h.shape
            h = jax.nn.silu(h.reshape(c, n // 2, 2, n // 2, 2).max(axis=(2, 4)))
        return self.head(h.reshape(-1))


class VideoDecoder(eqx.Module):
    """A latent state ``[D]`` → a frame ``[size²]`` in (0, 1): a linear map to
    ``(size/8)²·channels[0]``, three [nearest ×2 → Conv3×3 → SiLU] blocks, a final
    Conv3×3 and a sigmoid."""

    head: eqx.nn.Linear
    convs: list
    out: eqx.nn.Conv2d
    size: int = eqx.field(static=True)
    c0: int = eqx.field(static=True)

    def __init__(self, key, *, dim=2, size=32, channels=(16, 8, 8)):
        if size % 8:
            raise ValueError(f"size must be a multiple of 8, got {size}")
        keys = jax.random.split(key, len(channels) + 2)
        self.head = eqx.nn.Linear(dim, (size // 8) ** 2 * channels[0], key=keys[0])
        c_in = (channels[0], *channels[:-1])
        self.convs = [
            eqx.nn.Conv2d(a, b, 3, padding=1, key=k)
            for a, b, k in zip(c_in, channels, keys[1:], strict=False)
        ]
        self.out = eqx.nn.Conv2d(channels[-1], 1, 3, padding=1, key=keys[-1])
        self.size, self.c0 = size, channels[0]

    def __call__(self, x):
        n = self.size // 8
        h = jax.nn.silu(self.head(x)).reshape(self.c0, n, n)
        for conv in self.convs:
            h = jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)
            h = jax.nn.silu(conv(h))
        return jax.nn.sigmoid(self.out(h)).reshape(-1)


def video_sde(
    *,
    hurst=None,
    dim: int = 2,
    size: int = 32,
    horizon: float = 2.0,
    features: int = 32,
    width: int = 64,
    obs_sd: float = 0.1,
    seed: int = 0,
    **kwargs,
) -> LatentSDE:
    """The mini-video :class:`~ppl.models.fbm_sde.LatentSDE`: D latent dimensions, type I,
    K = 5, γ_max = 10, dt = 1/30 (3 sub-steps per frame at ``frame_dt = 0.1``), a tanh MLP
    drift, a constant diffusion, H learned (``hurst=None``), fixed, or ``"bm"``.

    :param horizon: the last frame time (the ω optimisation's T).
    :param kwargs: other :class:`~ppl.models.fbm_sde.LatentSDE` fields (``dt``, ``drift``,
        ``diffusion``, ``gamma_max``, …).
    """
    k_enc, k_dec = jax.random.split(jax.random.PRNGKey(seed + 1))
    options = dict(num_ou=5, gamma_max=10.0, dt=1.0 / 30.0, drift="mlp", fbm_type="I")
    options.update(kwargs)
    return LatentSDE(
        dim=dim,
        obs_dim=size * size,
        hurst=hurst,
        horizon=horizon,
        obs_sd=obs_sd,
        width=width,
        encoder=VideoEncoder(k_enc, size=size, features=features),
        decoder=VideoDecoder(k_dec, dim=dim, size=size),
        context_dim=features,
        seed=seed,
        **options,
    )
