"""ppl.models.bnn: the BNN models, their data, metrics and the ``ppl fit ssvi-bnn`` command."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpyro.handlers import seed, substitute, trace

from ppl.models import bnn
from ppl.sparse import SparseTensor, from_dense
from ppl.transforms import restrict_prior


def test_mlp_and_cnn_match_their_dense_forward_with_sparse_weights():
    x = jax.random.normal(jax.random.PRNGKey(0), (5, 8, 8, 1))

    @jax.jit
    def both(x):
        tr = trace(seed(bnn.cnn, 0)).get_trace(x, channels=(4, 6))
        # the same weights as SparseTensor (all entries active) give the same probabilities
        values = {n: s["value"] for n, s in tr.items() if s["type"] == "sample" and n != "y"}
        idx = {n: jnp.arange(v.size, dtype=jnp.int32) for n, v in values.items() if v.ndim >= 2}
        sparse = {n: (from_dense(v, idx[n]) if n in idx else v) for n, v in values.items()}
        model = substitute(restrict_prior(bnn.cnn, idx), data=sparse)
        tr2 = trace(seed(model, 1)).get_trace(x, channels=(4, 6))
        assert isinstance(tr2["conv1"]["value"], SparseTensor)
        return tr["probs"]["value"], tr2["probs"]["value"]

    probs, probs_sparse = both(x)
    np.testing.assert_allclose(probs_sparse, probs, rtol=1e-5, atol=1e-6)
    xm = jnp.ones((3, 64))
    tr = trace(seed(bnn.mlp, 0)).get_trace(xm, widths=(7,))
    assert tr["w0"]["value"].shape == (64, 7) and tr["probs"]["value"].shape == (3, 10)
    with pytest.raises(ValueError, match="x must have 2 dims"):
        bnn.mlp(jnp.ones(3))


def test_load_digits_splits_are_disjoint():
    d = bnn.load_digits()
    assert d["x_train"].shape == (1150, 64) and d["x_val"].shape == (288, 64)
    assert d["x_test"].shape == (359, 64) and d["x_rot"].shape == (359, 64)
    rows = {r.tobytes() for r in d["x_train"]}
    assert not any(r.tobytes() in rows for r in d["x_test"][:50])
    np.testing.assert_array_equal(
        d["x_rot"][0].reshape(8, 8), np.rot90(d["x_test"][0].reshape(8, 8))
    )
    assert bnn.load_digits(images=True)["x_val"].shape == (288, 8, 8, 1)


def test_top_label_ece_by_hand():
    probs = np.array([[0.95, 0.05], [0.6, 0.4], [0.3, 0.7], [0.55, 0.45]])
    y = np.array([0, 1, 1, 0])
    # 15 equal-width bins of the max probability: {0.95} (acc 1), {0.7} (acc 1) and
    # {0.6, 0.55} in (8/15, 9/15] (mean conf 0.575, acc 0.5): ECE = (0.05 + 0.3 + 2·0.075)/4
    m = bnn.metrics(probs, y)
    assert m["ece"] == pytest.approx((0.05 + 0.3 + 2 * 0.075) / 4)
    assert m["accuracy"] == 0.75
    assert m["nll"] == pytest.approx(-np.mean(np.log([0.95, 0.4, 0.7, 0.55])))
    rel = bnn.reliability(probs, y)
    assert rel["count"].sum() == 4


@pytest.mark.slow
def test_fit_small_mlp_learns_and_selects_on_validation():
    d = bnn.load_digits()
    model = partial(bnn.mlp, widths=(32,), kl_weight=0.1)
    res, best = bnn.fit(model, d, density=0.2, steps=200, lr=5e-3, every=25, eval_every=2)
    steps = [h["step"] for h in res.history if "val_accuracy" in h]
    assert best["step"] in steps
    assert best["val_accuracy"] == max(
        h["val_accuracy"] for h in res.history if "val_accuracy" in h
    )
    # stored parameters of the sparse weight sites: 2·s each, s = round(0.2·size)
    for name, size in (("w0", 64 * 32), ("w1", 32 * 10)):
        assert res.params[name + "_loc"].shape == (round(0.2 * size),)
    idata = res.to_inference_data(
        key=jax.random.PRNGKey(0), num_samples=16, args=(d["x_test"], d["y_test"])
    )
    m = bnn.metrics(bnn.predictive_probs(idata), d["y_test"])
    assert m["accuracy"] > 0.8  # chance is 0.1; a 20 %-dense 64-32-10 MLP after 200 steps


@pytest.mark.slow
def test_ppl_fit_ssvi_bnn_end_to_end(tmp_path, capsys, monkeypatch):
    import arviz as az

    from ppl import cli

    monkeypatch.setenv("PPL_FAST", "1")
    out = tmp_path / "bnn"
    code = cli.main(["fit", "ssvi-bnn", "--out", str(out), "--no-progress", "--density", "0.2"])
    _, err = capsys.readouterr()
    assert code == 0, err
    assert {p.name for p in out.iterdir()} == {
        "posterior.nc",
        "loss.png",
        "ssvi_bnn.png",
        "summary.txt",
    }
    idata = az.from_netcdf(out / "posterior.nc")
    assert idata.posterior["w0"].dims == ("chain", "draw", "w0_active")
    assert idata.posterior["w0"].shape[-1] == round(0.2 * 64 * 256)
    assert "top-label ECE" in (out / "summary.txt").read_text()
    code = cli.main(["fit", "ssvi-bnn", "--out", str(tmp_path / "x"), "--density", "1.5"])
    assert code == 2 and "--density" in capsys.readouterr().err
