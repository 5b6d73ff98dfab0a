"""The ``pathsmc`` command line: ``pathsmc demo`` (the main job), ``pathsmc sample`` (a user's
own steering job from a config file), ``pathsmc samplers`` and ``pathsmc info``.

The package :mod:`pathsmc.commands` holds the whole command-line face: this parser,
:mod:`~pathsmc.commands.demo` (with ``demo_digits`` and ``lm_demo``),
:mod:`~pathsmc.commands.sample` and :mod:`~pathsmc.commands.samplers_demo`;
:mod:`pathsmc.cli` is the console script's entry point."""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

_STEER_MODES = ("reward", "temper", "product", "twisted", "uncorrected")


def _build_parser() -> argparse.ArgumentParser:
    from pathsmc import __version__

    parser = argparse.ArgumentParser(
        prog="pathsmc",
        description="Path-space SMC and replica exchange with fused PyTorch kernels.",
        formatter_class=_FORMATTER,
    )
    parser.add_argument("--version", action="version", version=f"pathsmc {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show the full Python traceback of an error")
    sub = _Subcommands(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))

    demo = sub.add_parser(
        "demo",
        help="steer a 2-D Gaussian-mixture diffusion model with every steering mode "
             "(or, with 'digits', the shipped digits DDPM; with 'lm', constrained text from "
             "the shipped character GPT-2)",
        description="Steer a 2-D Gaussian-mixture diffusion model (exact score, VP schedule) "
                    "with every mode of pathsmc.diffusion.steer — reward tilting with FK "
                    "potentials, tempering, products / CFG, twisted guidance, uncorrected "
                    "guidance — and with a hand-written loop of the ops; compare log Ẑ to "
                    "the exact log Z and time the fused ops against the pure-PyTorch "
                    "reference. Writes one PNG per mode and demo.png. "
                    "'pathsmc demo digits' steers the shipped class-conditional digits DDPM "
                    "(pathsmc.models.digits) toward every class at once: FK steering, twisted "
                    "SMC with classifier guidance, twisted SMC with a learned twist (a noisy "
                    "classifier), CFG corrected by the path RND, plain CFG "
                    "and uncorrected guidance; prints judge accuracy, diversity, log Ẑ, ESS "
                    "and time, checks log Ẑ against plain samples; writes digits-<method>.png. "
                    "'pathsmc demo lm' samples a lipogram (no --exclude letters) from the "
                    "shipped character GPT-2 (pathsmc.models.char_lm) with token SMC, "
                    "importance sampling and plain masked sampling: log Ẑ across N, the KL "
                    "of masked sampling to the target and statistics under both.",
    )
    demo.add_argument("problem", nargs="?", choices=("mixture", "digits", "lm"),
                      default="mixture", help="the demo to run")
    demo.add_argument("--particles", type=int, default=None,
                      help="particles per run; digits: per row (one class), 64 unless given; "
                           "lm: the largest N (N/16 and N/4 run too), 128 unless given "
                           "(default: 1024)")
    demo.add_argument("--steps", type=int, default=None,
                      help="Euler–Maruyama steps; digits: DDPM steps, 50 unless given; lm: "
                           "the longest continuation in characters, 32 unless given "
                           "(default: 100)")
    demo.add_argument("--runs", type=int, default=None,
                      help="independent runs (batched rows), for the spread of log Ẑ; "
                           "digits: replicate rows per class, 2 unless given; lm: 8 unless "
                           "given (default: 16)")
    demo.add_argument("--quick", action="store_true",
                      help="digits: the short version that make demo runs (32 particles, 25 steps)")
    demo.add_argument("--seed", type=int, default=0, help="random seed")
    demo.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1, ...)")
    demo.add_argument("--out", default="out", help="folder for the PNGs")
    demo.add_argument("--modes", default=",".join(_STEER_MODES),
                      help="comma-separated steering modes of the table")
    demo.add_argument("--twist", choices=("value", "tweedie"), default="value",
                      help="intermediate potential of the hand-written loop: the exact soft "
                           "value or the reward at the denoised mean")
    demo.add_argument("--threads", type=int, default=1,
                      help="torch intra-op threads (these small problems run fastest on one; "
                           "results do not depend on it; 0: as torch chooses)")
    demo.add_argument("--no-plot", action="store_true", help="do not write the PNGs")
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")
    demo.add_argument("--exclude", default="e", help="lm: the letters the text must avoid")
    demo.add_argument("--prompt", default="return the ", help="lm: the text to continue")

    sample = sub.add_parser(
        "sample",
        help="steer your own diffusion model as configured in a TOML or JSON file",
        description="Run pathsmc.diffusion.steer on a model given as a Python import path, "
                    "as described by a TOML or JSON config (see examples/steer_reward.toml "
                    "and docs/concepts.md). Writes result.pt (and result.npz), report.txt "
                    "and job.json to the output folder. A job split into chunks resumes: "
                    "chunks already written are skipped. Existing results are never "
                    "overwritten without --force.",
    )
    sample.add_argument("--config", required=True, help="the job's .toml or .json file")
    sample.add_argument("--out", default=None,
                        help="output folder (default: the config's 'out' key)")
    sample.add_argument("--force", action="store_true",
                        help="overwrite existing results (and start chunks afresh)")
    sample.add_argument("--no-progress", action="store_true", help="no progress bar")

    samplers = sub.add_parser(
        "samplers",
        help="annealed SMC, waste-free SMC and PT on the Boltzmann targets vs exact log Z",
        description="Run the Boltzmann samplers on many-well, funnel, the 40-mode mixture and "
                    "DW-4 and print log Ẑ ± SE against the exact (or reference) log Z.",
    )
    samplers.add_argument("--particles", type=int, default=1024, help="particles per row")
    samplers.add_argument("--rows", type=int, default=8,
                          help="independent rows per run (the standard errors come from them)")
    samplers.add_argument("--seed", type=int, default=0, help="random seed")
    samplers.add_argument("--device", default="cpu", help="torch device")
    samplers.add_argument("--no-pt", action="store_true", help="skip parallel tempering")
    samplers.add_argument("--threads", type=int, default=1,
                          help="torch threads on CPU (0: as torch chooses)")

    sub.add_parser("info", help="print how the extension was built")
    return parser


class _FORMATTER(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows each option's default, except empty ones (None, False) and those its
    help text already states."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class _Subcommands:
    """``add_parser`` with the defaults shown in ``--help`` and a ``--debug`` flag that does
    not overwrite the top-level one (``pathsmc --debug sample`` and ``pathsmc sample --debug``
    both work)."""

    def __init__(self, action: argparse._SubParsersAction) -> None:
        self._action = action

    def add_parser(self, name: str, **kwargs) -> argparse.ArgumentParser:
        kwargs.setdefault("formatter_class", _FORMATTER)
        parser = self._action.add_parser(name, **kwargs)
        parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                            help="show the full Python traceback of an error")
        return parser


def _check_device(command: str, device: str, fix: str = "use --device cpu") -> None:
    """Refuse a CUDA device on a machine without one before any work is done."""
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise SystemExit(f"pathsmc {command}: --device: {exc}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"pathsmc {command}: device {device!r} was asked for but CUDA is not "
                         f"available on this machine (torch {torch.__version__}, "
                         f"built with CUDA: {torch.version.cuda or 'no'}); {fix}")


def _check_out(command: str, out: str | os.PathLike | None) -> None:
    """An output folder that is an existing file is an error (before any work)."""
    if out is not None and Path(out).exists() and not Path(out).is_dir():
        raise SystemExit(f"pathsmc {command}: --out: {str(out)!r} is a file, not a folder")


_PACKAGE_DIR = Path(__file__).resolve().parent


def _user_frame(tb) -> traceback.FrameSummary | None:
    """The innermost traceback frame outside pathsmc, torch and the standard library: the
    user's function that raised."""
    skip = [str(_PACKAGE_DIR), os.path.dirname(os.__file__)]
    try:
        import torch

        skip.append(os.path.dirname(torch.__file__))
    except ImportError:  # pragma: no cover
        pass
    frames = [f for f in traceback.extract_tb(tb)
              if not any(os.path.abspath(f.filename).startswith(d) for d in skip)]
    return frames[-1] if frames else None


def _report_error(command: str, exc: BaseException) -> int:
    """A few lines about an error (from the user's code or ours) instead of a full trace."""
    frame = _user_frame(exc.__traceback__)
    where = (f" in your function {frame.name}() ({frame.filename}:{frame.lineno})"
             if frame is not None else "")
    print(f"pathsmc {command}: error{where}:\n  {type(exc).__name__}: {exc}\n"
          f"(rerun with --debug for the full traceback)", file=sys.stderr)
    return 1


def _chunks_saved(config: str, out: str | None) -> tuple[int, int] | None:
    """(chunk files written, chunks) of a ``pathsmc sample`` job, or None if unknown."""
    try:
        from pathsmc.commands.sample import load_config

        cfg = load_config(config)
        folder = Path(out) if out is not None else cfg.source.parent / cfg.out
        total = len(cfg.chunks)
        done = len(list((folder / "chunks").glob("chunk-*.pt"))) if total > 1 else 0
        return min(done, total), total
    except Exception:  # the message is a courtesy: never mask the interrupt
        return None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``pathsmc`` console script; returns the exit code."""
    args = _build_parser().parse_args(argv)
    if getattr(args, "debug", False):
        return _dispatch(args)
    try:
        return _dispatch(args)
    except KeyboardInterrupt:
        if args.command == "sample":
            saved = _chunks_saved(args.config, args.out)
            done = f"{saved[0]}/{saved[1]}" if saved else "the finished"
            print(f"\ninterrupted: {done} chunks saved; rerun to resume", file=sys.stderr)
        else:
            print("\ninterrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        return _report_error(args.command, exc)


def _demo_lm(args: argparse.Namespace) -> int:
    """``pathsmc demo lm``: the lipogram demo of :mod:`pathsmc.commands.lm_demo`."""
    if args.particles < 2 or args.runs < 2:
        raise SystemExit("pathsmc demo lm: --particles and --runs must be >= 2")
    n = args.particles
    from pathsmc.commands.lm_demo import format_lm_demo, run_lm_demo

    try:
        res = run_lm_demo(particles=sorted({max(2, n // 16), max(2, n // 4), n}),
                          runs=args.runs, max_new_tokens=args.steps, exclude=args.exclude,
                          prompt=args.prompt, seed=args.seed, threads=args.threads or None,
                          log=lambda line: print(line, flush=True))
    except (FileNotFoundError, ValueError) as exc:
        raise SystemExit(f"pathsmc demo lm: {exc}") from None
    print("\n".join(format_lm_demo(res)))
    return 0


def _dispatch(args: argparse.Namespace) -> int:
    """Run the parsed subcommand."""
    if args.command in ("demo", "samplers") and hasattr(args, "device"):
        _check_device(args.command, args.device)
    if args.command in ("demo", "sample") and hasattr(args, "out"):
        _check_out(args.command, args.out)
    if args.command == "demo":
        digits = args.problem == "digits"
        defaults = ({"particles": 32 if args.quick else 64, "steps": 25 if args.quick else 50,
                     "runs": 2} if digits else {"particles": 1024, "steps": 100, "runs": 16})
        if args.problem == "lm":
            defaults = {"particles": 32 if args.quick else 128,
                        "steps": 16 if args.quick else 32, "runs": 4 if args.quick else 8}
        for name, default in defaults.items():
            if getattr(args, name) is None:
                setattr(args, name, default)
            if getattr(args, name) < 1:
                raise SystemExit(f"pathsmc demo: --{name} must be a positive integer")
        if args.threads < 0:
            raise SystemExit("pathsmc demo: --threads must be >= 0")
        if args.problem == "lm":
            return _demo_lm(args)
        if digits:
            from pathsmc.commands.demo_digits import run_digits_demo

            return run_digits_demo(particles=args.particles, steps=args.steps, runs=args.runs,
                                   seed=args.seed, device=args.device, out=args.out,
                                   plot=not args.no_plot, threads=args.threads or None)
        modes = [m.strip() for m in args.modes.split(",") if m.strip()]
        bad = [m for m in modes if m not in _STEER_MODES]
        if bad or not modes:
            raise SystemExit(f"pathsmc demo: --modes: expected names from {_STEER_MODES}, "
                             f"got {args.modes!r}")
        from pathsmc.commands.demo import run_demo

        return run_demo(particles=args.particles, steps=args.steps, runs=args.runs,
                        seed=args.seed, device=args.device, out=args.out,
                        plot=not args.no_plot, progress=not args.no_progress,
                        twist=args.twist, modes=modes, threads=args.threads or None)
    if args.command == "sample":
        from pathsmc.commands.sample import ConfigError, ResultsExistError, load_config, run_sample

        try:
            cfg = load_config(args.config)
            _check_device("sample", cfg.device, f"set device = \"cpu\" in {cfg.source.name}")
            _check_out("sample", args.out if args.out is not None or cfg.out is None
                       else cfg.source.parent / cfg.out)
            return run_sample(args.config, out=args.out, force=args.force,
                              progress=not args.no_progress)
        except (ConfigError, ResultsExistError) as exc:
            print(f"pathsmc sample: error: {exc}", file=sys.stderr)
            return 2
    if args.command == "samplers":
        if args.particles < 8 or args.rows < 2:
            raise SystemExit("pathsmc samplers: --particles must be >= 8 and --rows >= 2")
        import torch

        from pathsmc.commands.samplers_demo import HEADER, format_sampler_table, run_sampler_table

        if args.threads:
            torch.set_num_threads(args.threads)
        print(HEADER, flush=True)
        rows = run_sampler_table(particles=args.particles, rows=args.rows, seed=args.seed,
                                 device=args.device, pt=not args.no_pt,
                                 log=lambda line: print(line, flush=True))
        print(format_sampler_table(rows)[-1])
        return 0
    if args.command == "info":
        import torch

        import pathsmc

        info = pathsmc.build_info()
        print(f"pathsmc {pathsmc.__version__} (torch {torch.__version__})")
        for key, value in info.items():
            print(f"  {key}: {value}")
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        print(f"  gpus visible: {gpus}" + (f" ({torch.cuda.get_device_name(0)})" if gpus else ""))
        import torch.distributed as dist

        backends = [name for name, ok in (("gloo", dist.is_available() and
                                           dist.is_gloo_available()),
                                          ("nccl", dist.is_available() and
                                           dist.is_nccl_available())) if ok]
        print(f"  torch.distributed backends: {', '.join(backends) or 'none'} "
              "(pathsmc.distributed)")
        return 0
    return 2  # unreachable: argparse enforces the subcommands


if __name__ == "__main__":
    raise SystemExit(main())
