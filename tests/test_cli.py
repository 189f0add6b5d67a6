"""The `ppl` command: list, fit end to end (SVI and NUTS), --help, bad arguments, atomic output."""

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import arviz as az
import numpy as np
import pytest

import ppl.models
from ppl import cli
from ppl.models import FitResult, ModelSpec, Problem

PPL = Path(sys.executable).with_name("ppl")
PNG = b"\x89PNG\r\n\x1a\n"


def run(argv, capsys):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_outputs(out_dir: Path, plots):
    names = {p.name for p in out_dir.iterdir()}
    assert names == {"posterior.nc", "loss.png", "summary.txt", *plots}, names
    for png in ["loss.png", *plots]:
        assert (out_dir / png).read_bytes()[:8] == PNG
    idata = az.from_netcdf(out_dir / "posterior.nc")
    assert "posterior" in idata.groups()
    summary = (out_dir / "summary.txt").read_text()
    assert "wall time:" in summary and "mean" in summary
    return idata, summary


# ----------------------------------------------------------------------------- list/help


def test_list(capsys):
    code, out, err = run(["list"], capsys)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["MODEL", "INFERENCE", "DESCRIPTION"]
    rows = {line.split()[0]: line for line in lines[1:]}
    for name in ("vae", "eight-schools"):
        assert ppl.models.get(name).description in rows[name]
    assert "nuts" in rows["eight-schools"] and "nuts" not in rows["vae"]


def test_fit_help_documents_model_options(capsys):
    code, out, _ = run(["fit", "vae", "--help"], capsys)
    assert code == 0
    for opt in ("--batch-size", "--latent-dim", "--hidden-dim", "vae options"):
        assert opt in out
    for opt in ("--objective", "--particles", "--steps", "--lr", "--seed", "--out", "--overwrite"):
        assert opt in out
    assert "iwelbo" in out and "rws" in out
    code, out, _ = run(["fit", "eight-schools", "--help"], capsys)
    assert code == 0 and "--num-warmup" in out and "svi|nuts" in out
    code, out, _ = run(["fit", "--help"], capsys)
    assert code == 0 and "vae" in out and "eight-schools" in out


def test_fast_mode_shrinks_defaults(monkeypatch):
    monkeypatch.setenv("PPL_FAST", "1")
    opts = cli.build_parser().parse_args(["fit", "eight-schools"])
    assert opts.steps <= 50 and opts.num_samples <= 50 and opts.num_warmup <= 50
    monkeypatch.delenv("PPL_FAST")
    opts = cli.build_parser().parse_args(["fit", "eight-schools"])
    assert opts.steps == ppl.models.get("eight-schools").default_steps


# ---------------------------------------------------------------------------- end to end


def test_fit_vae(tmp_path, capsys):
    out = tmp_path / "vae"
    code, stdout, err = run(
        ["fit", "vae", "--steps", 20, "--num-samples", 10, "--out", out, "--no-progress"], capsys
    )
    assert code == 0, err
    idata, summary = assert_outputs(out, ["reconstructions.png"])
    assert idata.posterior["z"].shape[:2] == (1, 10)
    assert idata.posterior["z"].shape[-2:] == (297, 8)  # held-out images
    assert "final objective:" in summary and "objective: elbo" in summary
    assert "posterior.nc" in stdout


def test_fit_eight_schools_svi_console_script(tmp_path):
    """Through the installed console script; --overwrite replaces into a non-empty DIR."""
    if not PPL.exists():
        pytest.skip("console script not installed")
    out = tmp_path / "es"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    proc = subprocess.run(
        [PPL, "fit", "eight-schools", "--steps", "20", "--num-samples", "50", "--out", out]
        + ["--overwrite", "--no-progress", "--objective", "iwelbo", "-K", "3"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    idata, summary = assert_outputs(out, ["forest.png"])
    assert idata.posterior["mu"].shape == (1, 50)
    assert "objective: iwelbo (particles K=3)" in summary
    assert "theta[7]" in summary


@pytest.mark.slow  # NUTS itself is covered by tests/test_nuts.py; this is the CLI path
def test_fit_eight_schools_nuts(tmp_path, capsys):
    out = tmp_path / "nuts"
    argv = ["fit", "eight-schools", "--inference", "nuts", "--num-warmup", 30]
    argv += ["--num-samples", 20, "--num-chains", 2, "--out", out, "--no-progress"]
    code, _, err = run(argv, capsys)
    assert code == 0, err
    idata, summary = assert_outputs(out, ["forest.png"])
    assert idata.posterior["mu"].shape == (2, 20)
    assert "inference: nuts" in summary and "tau" in summary


# ------------------------------------------------------------------------- bad arguments


@pytest.fixture
def no_build(monkeypatch):
    """Make any data loading/compilation fail loudly: bad arguments must stop before."""

    def boom(opts):
        raise AssertionError("build() reached with bad arguments")

    for name in ("vae", "eight-schools"):
        spec = ppl.models.get(name)
        monkeypatch.setitem(ppl.models.registry._SPECS, name, dataclasses.replace(spec, build=boom))


@pytest.mark.parametrize(
    "args, message",
    [
        (["fit", "no-such-model"], "invalid choice: 'no-such-model'"),
        (["fit", "vae", "--objective", "nope"], "--objective: invalid choice: 'nope'"),
        (["fit", "vae", "--particles", "0"], "--particles/-K: must be >= 1"),
        (["fit", "vae", "-K", "-3"], "must be >= 1"),
        (["fit", "vae", "--particles", "two"], "expected an integer"),
        (["fit", "vae", "--steps", "0"], "--steps/-n: must be >= 1"),
        (["fit", "vae", "--lr", "0"], "--lr: must be a finite number > 0"),
        (["fit", "vae", "--lr=-1e-3"], "--lr: must be a finite number > 0"),
        (["fit", "vae", "--lr", "nan"], "--lr: must be a finite number > 0"),
        (["fit", "vae", "--num-samples", "0"], "--num-samples: must be >= 1"),
        (["fit", "vae", "--inference", "nuts"], "model 'vae' does not support --inference nuts"),
        (["fit", "eight-schools", "--inference", "gibbs"], "does not support --inference gibbs"),
        (["fit", "vae", "--batch-size", "-1"], "--batch-size must be in"),
        (["fit", "vae", "--no-such-option"], "unrecognized arguments: --no-such-option"),
        (["fit"], "required: MODEL"),
        ([], "required: COMMAND"),
    ],
)
def test_bad_arguments_exit_2_one_line(args, message, tmp_path, capsys, no_build):
    out = tmp_path / "out"
    code, stdout, err = run([*args, "--out", out] if len(args) > 1 else args, capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ppl: error: "), err
    assert message in lines[0]
    assert not out.exists()


def test_bad_out_dirs(tmp_path, capsys, no_build):
    afile = tmp_path / "file"
    afile.write_text("x")
    full = tmp_path / "full"
    full.mkdir()
    (full / "old.txt").write_text("old")
    cases = [
        (afile, "exists and is not a directory"),
        (afile / "sub", "cannot create directory"),
        (full, "directory is not empty (pass --overwrite"),
    ]
    if hasattr(os, "geteuid") and os.geteuid() != 0:  # root ignores permission bits
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        cases.append((locked, "not writable"))
    for out, message in cases:
        code, _, err = run(["fit", "eight-schools", "--out", out], capsys)
        assert code == 2
        lines = err.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], err
    assert (full / "old.txt").read_text() == "old"


def test_console_script_bad_argument():
    if not PPL.exists():
        pytest.skip("console script not installed")
    proc = subprocess.run([PPL, "fit", "vae", "-K", "0"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "ppl: error: argument --particles/-K: must be >= 1, got 0"
    assert proc.stdout == ""
    proc = subprocess.run([PPL, "list"], capture_output=True, text=True)
    assert proc.returncode == 0 and "eight-schools" in proc.stdout


# ----------------------------------------------------- a new family needs no CLI edits


class _PartialIData:
    """Writes half a file and is then 'killed' (KeyboardInterrupt) mid-write."""

    def to_netcdf(self, path):
        Path(path).write_bytes(b"\x89HDF half-written")
        raise KeyboardInterrupt


def _toy_idata():
    rng = np.random.default_rng(0)
    return az.from_dict(posterior={"w": rng.normal(size=(1, 30, 2))})


@pytest.fixture
def toy_family():
    calls = {}

    def options(group):
        group.add_argument("--size", type=int, default=3, help="toy size option")

    def validate(opts):
        if opts.size < 1:
            raise ValueError(f"--size must be >= 1, got {opts.size}")

    def build(opts):
        return Problem(model=None, data={"size": opts.size})

    def em(spec, problem, opts, key):
        calls["steps"] = opts.steps
        idata = _PartialIData() if problem.data["size"] == 99 else _toy_idata()
        return FitResult(idata=idata, losses=np.linspace(3, 1, opts.steps), final_objective=-1.0)

    def plot(fit, problem, out_dir):
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots()
        ax.plot([0, problem.data["size"]])
        return fig

    spec = ModelSpec(
        name="toy-em",
        description="a toy family with its own EM driver",
        build=build,
        plot=plot,
        options=options,
        validate=validate,
        inference=("em",),
        drivers={"em": em},
        default_steps=7,
    )
    ppl.models.register(spec)
    yield calls
    ppl.models.unregister("toy-em")


def test_new_family_is_listed_and_fitted(toy_family, tmp_path, capsys):
    code, out, _ = run(["list"], capsys)
    assert code == 0 and "toy-em" in out and "own EM driver" in out
    code, out, _ = run(["fit", "toy-em", "--help"], capsys)
    assert code == 0 and "--size" in out and "toy size option" in out
    assert "--objective" not in out  # no SVI, no objective options
    code, _, err = run(["fit", "toy-em", "--size", "0", "--out", tmp_path / "x"], capsys)
    assert code == 2 and err.strip() == "ppl: error: --size must be >= 1, got 0"
    code, _, err = run(["fit", "toy-em", "--out", tmp_path / "toy"], capsys)
    assert code == 0, err
    assert toy_family["steps"] == 7
    _, summary = assert_outputs(tmp_path / "toy", ["toy-em.png"])
    assert "final objective: -1" in summary and "inference: em" in summary


def test_killed_write_leaves_no_partial_posterior(toy_family, tmp_path, capsys):
    out = tmp_path / "killed"
    out.mkdir()
    (out / "posterior.nc").write_bytes(b"previous complete file")
    code, _, err = run(["fit", "toy-em", "--size", "99", "--out", out, "--overwrite"], capsys)
    assert code == 130 and err.strip() == "ppl: interrupted"
    assert sorted(p.name for p in out.iterdir()) == ["posterior.nc"]  # no temp files left
    assert (out / "posterior.nc").read_bytes() == b"previous complete file"
    fresh = tmp_path / "fresh"
    code, _, _ = run(["fit", "toy-em", "--size", "99", "--out", fresh], capsys)
    assert code == 130 and not fresh.exists()  # the directory it created is removed again


def test_atomic_path_replaces_only_on_success(tmp_path):
    final = tmp_path / "a.txt"
    with cli.atomic_path(final) as tmp:
        tmp.write_text("one")
        assert not final.exists()
    assert final.read_text() == "one"
    with pytest.raises(RuntimeError), cli.atomic_path(final) as tmp:
        tmp.write_text("two, half")
        raise RuntimeError
    assert final.read_text() == "one"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_family_with_clashing_options_is_left_out(tmp_path, capsys):
    spec = ModelSpec(
        name="clash",
        description="adds --steps a second time",
        build=lambda opts: Problem(model=None),
        options=lambda group: group.add_argument("--steps"),
    )
    ppl.models.register(spec)
    try:
        code, out, err = run(["list"], capsys)
        assert code == 0 and "eight-schools" in out and "clash" not in out
        assert "model 'clash' left out" in err
        code, _, err = run(["fit", "clash"], capsys)
        assert code == 2 and "invalid choice: 'clash'" in err
    finally:
        ppl.models.unregister("clash")


_KILL_SCRIPT = """
import os, signal, sys
from pathlib import Path
import ppl.models
from ppl import cli
from ppl.models import FitResult, ModelSpec, Problem

class Killed:
    def to_netcdf(self, path):
        Path(path).write_bytes(b"half a netCDF file")
        os.kill(os.getpid(), signal.SIGKILL)

def driver(spec, problem, opts, key):
    return FitResult(idata=Killed())

ppl.models.register(ModelSpec(name="killme", description="d", build=lambda o: Problem(None),
                              inference=("x",), drivers={"x": driver}))
sys.exit(cli.main(["fit", "killme", "--out", sys.argv[1]]))
"""


@pytest.mark.skipif(not hasattr(os, "kill") or sys.platform == "win32", reason="POSIX signals")
def test_sigkill_during_write_leaves_no_posterior(toy_family, tmp_path, capsys):
    out = tmp_path / "killed"
    proc = subprocess.run([sys.executable, "-c", _KILL_SCRIPT, out], capture_output=True)
    assert proc.returncode == -9
    names = [p.name for p in out.iterdir()]
    assert "posterior.nc" not in names and all(n.startswith(cli.TMP_PREFIX) for n in names)
    code, _, err = run(["fit", "toy-em", "--out", out, "--overwrite"], capsys)
    assert code == 0, err  # --overwrite also removes the dead run's temp files
    assert not any(p.name.startswith(cli.TMP_PREFIX) for p in out.iterdir())
    assert_outputs(out, ["toy-em.png"])
