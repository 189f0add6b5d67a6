"""The ``ppl`` command: ``ppl list`` and ``ppl fit MODEL [options]``.

Every model comes from the registry of :mod:`ppl.models` (one ``ModelSpec`` per family),
so this file never changes for a new family. ``ppl fit`` validates all arguments before
any data is loaded or anything is compiled (bad arguments: exit status 2 and one line on
stderr), fits on the model's embedded data and writes, each file atomically (temp file,
fsync, rename), into ``--out``:

* ``posterior.nc``  — ``arviz.InferenceData`` (netCDF);
* ``loss.png``      — the loss curve (NUTS: a trace plot);
* the model's own plot(s), e.g. ``reconstructions.png``;
* ``summary.txt``   — settings, final objective, wall time and the ``az.summary`` table
  (written last: its presence marks a complete run).

Environment: ``PPL_FAST=1`` shrinks the defaults (steps, draws, warmup, chains) for smoke
runs and notebooks; ``PPL_DEBUG=1`` prints tracebacks of failures.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

__all__ = ["main", "build_parser", "UsageError"]

TMP_PREFIX = ".ppl-tmp-"
#: ``{model: error}`` for registered models whose options could not be added to the parser.
BROKEN: dict[str, str] = {}
MAX_SUMMARY_ROWS = 400


class UsageError(Exception):
    """A bad command line: reported as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, raised to main() instead of printing usage
        raise UsageError(message)


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


# ------------------------------------------------------------------ argument types


def _int_at_least(lo: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {value}")
        return value

    parse.__name__ = f"int>={lo}"
    return parse


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be finite, got {text}")
    return value


# ------------------------------------------------------------------------ parser


def _add_fit_options(parser: argparse.ArgumentParser, spec) -> None:
    from ppl.models import OBJECTIVES

    fast = _env_flag("PPL_FAST")
    steps = min(spec.default_steps, 50) if fast else spec.default_steps
    num_samples = min(spec.default_num_samples, 50) if fast else spec.default_num_samples
    num_warmup = min(spec.default_num_warmup, 50) if fast else spec.default_num_warmup
    num_chains = min(spec.default_num_chains, 2) if fast else spec.default_num_chains

    g = parser.add_argument_group("fitting")
    g.add_argument(
        "--inference",
        default=spec.inference[0],
        metavar="|".join(spec.inference),
        help="inference method (default: %(default)s)",
    )
    g.add_argument(
        "--steps",
        "-n",
        type=_int_at_least(1),
        default=steps,
        metavar="N",
        help="optimisation steps / iterations (default: %(default)s)",
    )
    g.add_argument(
        "--num-samples",
        type=_int_at_least(1),
        default=num_samples,
        metavar="M",
        help="posterior draws written to posterior.nc (NUTS: per chain) (default: %(default)s)",
    )
    g.add_argument(
        "--seed", type=_int_at_least(0), default=0, metavar="S", help="PRNG seed (default: 0)"
    )
    if spec.uses("svi"):
        s = parser.add_argument_group("variational inference (--inference svi)")
        names = spec.allowed_objectives
        s.add_argument(
            "--objective",
            choices=names,
            default=spec.default_objective,
            metavar="NAME",
            help="objective: "
            + "; ".join(f"{n}: {OBJECTIVES[n][1]}" for n in names)
            + " (default: %(default)s)",
        )
        s.add_argument(
            "--particles",
            "-K",
            type=_int_at_least(1),
            default=spec.default_particles,
            metavar="K",
            help="particles K of the objective (default: %(default)s)",
        )
        s.add_argument(
            "--alpha",
            type=_finite_float,
            default=0.5,
            metavar="A",
            help="order alpha of the renyi objective (default: %(default)s)",
        )
        s.add_argument(
            "--lr",
            type=_positive_float,
            default=spec.default_lr,
            metavar="X",
            help="Adam learning rate (default: %(default)s)",
        )
    if spec.uses("nuts"):
        m = parser.add_argument_group("MCMC (--inference nuts)")
        m.add_argument(
            "--num-warmup",
            type=_int_at_least(0),
            default=num_warmup,
            metavar="W",
            help="warmup (adaptation) steps per chain (default: %(default)s)",
        )
        m.add_argument(
            "--num-chains",
            type=_int_at_least(1),
            default=num_chains,
            metavar="C",
            help="chains, run vectorised (default: %(default)s)",
        )
    o = parser.add_argument_group("output")
    o.add_argument(
        "--out",
        "-o",
        type=Path,
        default=Path("runs") / spec.name,
        metavar="DIR",
        help="output directory (default: %(default)s)",
    )
    o.add_argument("--overwrite", action="store_true", help="replace the files of a non-empty DIR")
    o.add_argument("--no-progress", action="store_true", help="no progress bar")
    if spec.options is not None:
        spec.options(parser.add_argument_group(f"{spec.name} options"))


def build_parser() -> argparse.ArgumentParser:
    """The full parser; every registered model is a sub-command of ``fit``."""
    import ppl.models

    parser = _Parser(
        prog="ppl",
        description="Fit the model families of ppl on their embedded default data.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    commands.add_parser("list", help="list the fittable models")
    fit = commands.add_parser(
        "fit",
        help="fit a model and write posterior.nc, plots and summary.txt",
        description="Fit MODEL on its embedded default data. "
        "`ppl fit MODEL --help` lists the model's options.",
    )
    models = fit.add_subparsers(dest="model", metavar="MODEL", required=True)
    BROKEN.clear()
    for spec in ppl.models.specs():
        try:  # a family whose options clash or fail is left out, not the whole command
            _add_fit_options(_Parser(prog=f"ppl fit {spec.name}"), spec)
        except Exception as exc:
            BROKEN[spec.name] = f"{type(exc).__name__}: {_one_line(exc)}"
            continue
        epilog = (spec.details + "\n\n" if spec.details else "") + (
            "Writes into DIR: posterior.nc, loss.png, the model's plot(s) and summary.txt. "
            "PPL_FAST=1 shrinks the defaults for smoke runs."
        )
        sub = models.add_parser(
            spec.name,
            help=spec.description,
            description=f"{spec.name}: {spec.description}",
            epilog=epilog,
        )
        _add_fit_options(sub, spec)
    return parser


# ------------------------------------------------------------------------ validation


def _validate(spec, opts) -> None:
    if opts.inference not in spec.inference:
        raise UsageError(
            f"model {spec.name!r} does not support --inference {opts.inference} "
            f"(supported: {', '.join(spec.inference)})"
        )
    if spec.validate is not None:
        try:
            spec.validate(opts)
        except (ValueError, TypeError) as exc:
            raise UsageError(str(exc)) from None


def _prepare_out(path: Path, overwrite: bool) -> bool:
    """Check/create the output directory; True if this call created it."""
    created = False
    try:
        if path.exists():
            if not path.is_dir():
                raise UsageError(f"--out {path}: exists and is not a directory")
            if any(path.iterdir()) and not overwrite:
                raise UsageError(
                    f"--out {path}: directory is not empty (pass --overwrite to replace its files)"
                )
        else:
            try:
                path.mkdir(parents=True)
            except OSError as exc:
                reason = exc.strerror or type(exc).__name__
                raise UsageError(f"--out {path}: cannot create directory ({reason})") from None
            created = True
        fd, probe = tempfile.mkstemp(dir=path, prefix=TMP_PREFIX + "probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        if created:
            with contextlib.suppress(OSError):
                path.rmdir()
        reason = exc.strerror or type(exc).__name__
        raise UsageError(f"--out {path}: directory is not writable ({reason})") from None
    if overwrite:  # temp files left by a killed run
        for stale in path.glob(TMP_PREFIX + "*"):
            with contextlib.suppress(OSError):
                stale.unlink()
    return created


# ------------------------------------------------------------------ atomic output


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(final: Path):
    """Yield a temporary path next to ``final``; on success fsync it and rename it to
    ``final`` (so ``final`` is either the old file or the complete new one)."""
    fd, tmp = tempfile.mkstemp(
        dir=final.parent, prefix=f"{TMP_PREFIX}{final.stem}-", suffix=final.suffix
    )
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 -> an ordinary file's mode
        os.replace(tmp, final)
        _fsync_dir(final.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _save_figure(fig, final: Path) -> Path:
    import matplotlib.pyplot as plt

    try:
        with atomic_path(final) as tmp:
            fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    finally:
        plt.close(fig)
    return final


def _save_text(text: str, final: Path) -> Path:
    with atomic_path(final) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return final


# ------------------------------------------------------------------------ figures


def _loss_figure(spec, fit, opts):
    import matplotlib.pyplot as plt
    import numpy as np

    if fit.losses is not None and np.size(fit.losses):
        losses = np.asarray(fit.losses, dtype=np.float64).reshape(-1)
        steps = np.arange(1, losses.size + 1)
        fig, ax = plt.subplots(figsize=(7, 3.8))
        ax.plot(steps, losses, lw=0.7, alpha=0.45, color="C0", label="per step")
        window = max(5, losses.size // 50)
        if losses.size >= 2 * window:
            smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
            ax.plot(steps[window - 1 :], smooth, color="C1", label=f"moving mean ({window})")
        finite = losses[np.isfinite(losses)]
        if finite.size:
            lo, hi = finite.min(), np.percentile(finite, 99)
            pad = 0.05 * (hi - lo) or 1.0
            ax.set_ylim(lo - pad, hi + pad)
        ax.set_xlabel("step")
        ax.set_ylabel(fit.loss_label)
        ax.set_title(f"{spec.name}: {opts.inference} ({getattr(opts, 'objective', '')})")
        ax.legend(loc="upper right")
        fig.tight_layout()
        return fig
    # no loss (NUTS): a trace plot of the (up to 4) smallest posterior variables
    import arviz as az

    post = fit.idata.posterior
    names = sorted(post.data_vars, key=lambda v: (post[v].size, v))[:4]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        axes = az.plot_trace(fit.idata, var_names=names, compact=True)
    fig = np.ravel(axes)[0].figure
    fig.suptitle(f"{spec.name}: {opts.inference} trace (no loss curve)")
    fig.tight_layout()
    return fig


def _model_figures(spec, fit, problem, out: Path) -> dict:
    if spec.plot is None:
        return {}
    figs = spec.plot(fit, problem, out)
    if figs is None:
        return {}
    if not isinstance(figs, dict):
        figs = {spec.name: figs}
    reserved = {"loss", "summary", "posterior"}
    for stem in figs:
        if stem in reserved or "/" in stem or not stem:
            raise ValueError(f"model {spec.name!r}: plot name {stem!r} is reserved or invalid")
    return figs


def _summary_table(spec, idata) -> str:
    import arviz as az

    log = getattr(az, "_log", None) or logging.getLogger("arviz")  # arviz's own Logger
    level = log.level
    log.setLevel(logging.ERROR)  # one-chain SVI draws: "Shape validation failed" (r_hat NaN)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            table = spec.summary(idata) if spec.summary is not None else az.summary(idata)
    finally:
        log.setLevel(level)
    if table is None:
        return ""
    text = table.to_string() if hasattr(table, "to_string") else str(table)
    lines = text.splitlines()
    if len(lines) > MAX_SUMMARY_ROWS + 1:
        more = len(lines) - MAX_SUMMARY_ROWS - 1
        lines = lines[: MAX_SUMMARY_ROWS + 1] + [f"... ({more} more rows)"]
    return "\n".join(lines)


def _summary_text(spec, opts, fit, fit_seconds, total_seconds, files) -> str:
    import jax

    lines = [
        f"model: {spec.name} - {spec.description}",
        f"inference: {opts.inference}",
    ]
    if opts.inference == "svi":
        lines.append(
            f"objective: {opts.objective} (particles K={opts.particles}"
            + (f", alpha={opts.alpha}" if opts.objective == "renyi" else "")
            + f"), steps: {opts.steps}, lr: {opts.lr}"
        )
    elif opts.inference == "nuts":
        lines.append(
            f"warmup: {opts.num_warmup}, samples: {opts.num_samples}, chains: {opts.num_chains}"
        )
    else:
        lines.append(f"steps: {opts.steps}")
    lines.append(f"seed: {opts.seed}, posterior draws: {opts.num_samples}")
    if fit.final_objective is not None:
        how = " (mean over the last 10% of steps)" if opts.inference == "svi" else ""
        lines.append(f"final objective: {fit.final_objective:.6g}{how}")
    lines += list(fit.notes)
    lines.append(
        f"wall time: {fit_seconds:.2f} s fit (incl. compilation), {total_seconds:.2f} s total"
    )
    lines.append(f"devices: {', '.join(str(d) for d in jax.devices())}")
    lines.append(f"files: {', '.join(files)}")
    lines.append("")
    lines.append("posterior summary (arviz.summary):")
    lines.append(_summary_table(spec, fit.idata))
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------ commands


def _cmd_list(out) -> int:
    import ppl.models

    specs = [s for s in ppl.models.specs() if s.name not in BROKEN]
    width = max([len(s.name) for s in specs] + [5])
    inf = max([len(", ".join(s.inference)) for s in specs] + [9])
    print(f"{'MODEL':<{width}}  {'INFERENCE':<{inf}}  DESCRIPTION", file=out)
    for s in specs:
        print(f"{s.name:<{width}}  {', '.join(s.inference):<{inf}}  {s.description}", file=out)
    for family, error in ppl.models.failed().items():
        print(f"ppl: warning: model family {family!r} failed to import: {error}", file=sys.stderr)
    for name, error in BROKEN.items():
        print(f"ppl: warning: model {name!r} left out (bad options: {error})", file=sys.stderr)
    return 0


def _cmd_fit(opts) -> int:
    import ppl.models

    t_start = time.perf_counter()
    spec = ppl.models.get(opts.model)
    opts.progress = not opts.no_progress
    _validate(spec, opts)
    out: Path = opts.out
    created = _prepare_out(out, opts.overwrite)

    written: list[str] = []
    try:
        import matplotlib

        matplotlib.use("Agg")
        import jax

        problem = spec.build(opts)
        driver = spec.driver(opts.inference)
        t_fit = time.perf_counter()
        fit = driver(spec, problem, opts, jax.random.PRNGKey(opts.seed))
        fit_seconds = time.perf_counter() - t_fit

        with atomic_path(out / "posterior.nc") as tmp:
            fit.idata.to_netcdf(str(tmp))
        written.append("posterior.nc")
        _save_figure(_loss_figure(spec, fit, opts), out / "loss.png")
        written.append("loss.png")
        for stem, fig in _model_figures(spec, fit, problem, out).items():
            _save_figure(fig, out / f"{stem}.png")
            written.append(f"{stem}.png")
        written.append("summary.txt")
        text = _summary_text(spec, opts, fit, fit_seconds, time.perf_counter() - t_start, written)
        _save_text(text, out / "summary.txt")
    except BaseException:
        if created and not any(out.iterdir()):
            with contextlib.suppress(OSError):
                out.rmdir()
        raise
    final = (
        f"final objective {fit.final_objective:.6g}, " if fit.final_objective is not None else ""
    )
    print(
        f"ppl: {spec.name} fitted ({final}{fit_seconds:.1f} s); wrote {out}: {', '.join(written)}"
    )
    return 0


def _one_line(message: str) -> str:
    return " ".join(str(message).split())


def main(argv: list[str] | None = None) -> int:
    """Run the ``ppl`` command on ``argv`` (default ``sys.argv[1:]``); returns the exit
    status (0 ok, 1 failure while fitting, 2 bad arguments, 130 interrupted)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        try:
            opts = build_parser().parse_args(argv)
            if opts.command == "list":
                return _cmd_list(sys.stdout)
            return _cmd_fit(opts)
        except UsageError as exc:
            print(f"ppl: error: {_one_line(exc)}", file=sys.stderr)
            return 2
        except SystemExit as exc:  # --help
            return exc.code if isinstance(exc.code, int) else 0
    except KeyboardInterrupt:
        print("ppl: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if _env_flag("PPL_DEBUG"):
            traceback.print_exc()
        print(f"ppl: error: {type(exc).__name__}: {_one_line(exc)}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
