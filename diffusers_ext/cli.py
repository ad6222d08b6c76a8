"""The ``diffusers-ext`` command: ``list``, ``demo``, ``bench``, ``restore``, ``train``.

Arguments are checked before anything heavy is imported or computed; a user error is one line on stderr and exit
status 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from .components import COMPONENTS, components_markdown_table, list_components

# The restored image is computed at full output resolution; the shipped model needs about 1.6 GB per megapixel.
MAX_RESTORE_PIXELS = 2048 * 2048
DEMO_PARTS = ("samplers", "steering", "text", "restoration")


def _list(args: argparse.Namespace) -> None:
    if args.markdown:
        print(components_markdown_table())
        return
    for c in list_components(args.kind):
        paper = f"{c.paper} (arXiv:{c.arxiv})" if c.paper else "—"
        print(f"{c.name:<34}{c.kind:<11}{c.status:<13}{paper}")


def resolve_scheduler(spec: str) -> tuple[str, type]:
    """``(name, class)`` of a scheduler given as a name in ``BUILTIN_SCHEDULERS``, a class exported by diffusers or
    diffusers-ext (``DEISMultistepScheduler``, ``ERSDESolverScheduler``), or ``module:ClassName``."""
    from diffusers.schedulers.scheduling_utils import SchedulerMixin

    from .testing.sampler_accuracy import BUILTIN_SCHEDULERS

    if spec in BUILTIN_SCHEDULERS:
        return spec, BUILTIN_SCHEDULERS[spec]
    module_name, _, name = spec.rpartition(":")
    candidates = [module_name] if module_name else ["diffusers", "diffusers_ext"]
    for candidate in candidates:
        try:
            found = getattr(importlib.import_module(candidate), name, None)
        except ImportError as error:
            raise ValueError(f"--scheduler {spec!r}: cannot import {candidate!r} ({error})") from None
        if isinstance(found, type) and issubclass(found, SchedulerMixin):
            return name, found
    raise ValueError(f"--scheduler {spec!r} is not a scheduler: use one of {list(BUILTIN_SCHEDULERS)}, a scheduler "
                     f"class of diffusers or diffusers-ext, or module:ClassName")


def run_sampler_accuracy(output: Path, num_samples: int, dims, nfes, schedulers=None, scatter_2d: bool = True) -> None:
    from .testing.sampler_accuracy import measure_sampler_accuracy, plot_accuracy, plot_samples_2d

    output.mkdir(parents=True, exist_ok=True)
    report = measure_sampler_accuracy(schedulers=schedulers, dims=dims, nfes=nfes, num_samples=num_samples)
    table = report.table()
    print(table)
    (output / "sampler_accuracy.txt").write_text(table + "\n", encoding="utf-8")
    report.write_csv(output / "sampler_accuracy.csv")
    plot_accuracy(report, output / "sampler_accuracy.png")
    written = ["sampler_accuracy.png", "sampler_accuracy.txt", "sampler_accuracy.csv"]
    if 2 in dims and scatter_2d:
        plot_samples_2d(report, output / "samples_2d.png")
        written.append("samples_2d.png")
    print()
    for dim in dims:
        for nfe in sorted({r.nfe for r in report.rows if r.dim == dim}):
            if sum(r.dim == dim and r.nfe == nfe for r in report.rows) < 2:  # e.g. a 2-call-per-step sampler's odd NFE
                continue
            best = report.best(dim, nfe, "ode_error")
            print(f"{dim:>3}-D, NFE {nfe:>2}: closest to the exact ODE solution: {best.scheduler} "
                  f"(mean distance {best.ode_error:.2e})")
    print(f"\nwritten to {output}/: {', '.join(written)}")


def _demo_schedulers(full: bool) -> dict[str, type]:
    """diffusers' built-ins (the quick demo leaves out Euler, the least accurate) and ours."""
    from .schedulers import ERSDESolverScheduler, RFSolverScheduler, TimeShiftScheduler
    from .testing.sampler_accuracy import BUILTIN_SCHEDULERS

    builtins = {name: cls for name, cls in BUILTIN_SCHEDULERS.items() if full or name != "Euler"}
    return builtins | {"ER-SDE (ours)": ERSDESolverScheduler, "TimeShift (ours)": TimeShiftScheduler,
                       "RF-Solver (ours)": RFSolverScheduler}


def _demo(args: argparse.Namespace) -> None:
    import diffusers.utils.logging
    import transformers.utils.logging

    start = time.perf_counter()
    output = Path(args.output)
    seconds = {}
    diffusers.utils.logging.disable_progress_bar()  # the loading bars of the shipped models say nothing here
    transformers.utils.logging.disable_progress_bar()
    for part in args.parts or DEMO_PARTS:
        part_start = time.perf_counter()
        if part == "samplers":
            print("Samplers on the exact Gaussian-mixture oracle: diffusers' built-ins next to diffusers-ext's\n")
            run_sampler_accuracy(output / "sampler_accuracy", args.num_samples or (2048 if args.full else 512),
                                 (2, 64), (5, 10, 20, 50) if args.full else (5, 10), _demo_schedulers(args.full))
        elif part == "steering":
            print("Steering hooks on the exact 2-D oracle: steered versus unsteered, next to the exact target law\n")
            from .guidance.demo import run_steering_demo

            run_steering_demo(output / "steering", num_samples=2000 if args.full else 500)
        elif part == "text":
            print("The shipped tiny masked-diffusion language model (trained on Python's documentation)\n")
            from .pipelines.text.demo import run_text_demo

            run_text_demo(output / "text")
        else:
            print("The shipped tiny ResShift model: 4x super-resolution of photos it was not trained on\n")
            from .pipelines.restoration.demo import run_restoration_demo

            run_restoration_demo(output / "restoration")
        seconds[part] = time.perf_counter() - part_start
        print()
    parts = ", ".join(f"{part} {value:.0f} s" for part, value in seconds.items())
    print(f"demo finished in {time.perf_counter() - start:.0f} s on {os.cpu_count()} CPU cores ({parts}); open "
          f"{output}/ to look at the plots")


def _bench(args: argparse.Namespace) -> None:
    schedulers = dict(resolve_scheduler(spec) for spec in args.scheduler) if args.scheduler else None
    run_sampler_accuracy(Path(args.output), args.num_samples, tuple(args.dims), tuple(args.nfe), schedulers)


def _check_restore_arguments(args: argparse.Namespace) -> None:
    """Everything about ``restore``'s files and sizes that can be known before a model is loaded."""
    import PIL.Image

    source, target = Path(args.input), Path(args.output)
    if not source.is_file():
        raise ValueError(f"no input image at {source}")
    try:
        with PIL.Image.open(source) as image:
            width, height = image.size
    except (OSError, PIL.UnidentifiedImageError) as error:
        raise ValueError(f"cannot read {source} as an image: {error}") from None
    PIL.Image.init()
    if target.suffix.lower() not in PIL.Image.registered_extensions():
        raise ValueError(f"cannot write an image as {target.name!r}: use an image extension such as .png or .jpg")
    existing = next(folder for folder in (target.absolute().parent, *target.absolute().parents) if folder.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise ValueError(f"cannot write {target}: {existing} is not a writable folder")
    scale = args.scale or 4  # the shipped model's factor; another --model's own factor is checked when it loads
    pixels = width * height * scale**2
    if pixels > MAX_RESTORE_PIXELS:
        raise ValueError(f"restoring {source.name} ({width}x{height}) at scale {scale} makes a {width * scale}x"
                         f"{height * scale} image ({pixels / 1e6:.1f} MP), above this command's "
                         f"{MAX_RESTORE_PIXELS / 1e6:.1f} MP limit (the shipped model needs about 1.6 GB of memory per "
                         f"MP): pass a smaller --scale or crop the input")


def _restore(args: argparse.Namespace) -> None:
    _check_restore_arguments(args)
    from .pipelines.restoration.demo import restore_file

    seconds = restore_file(args.input, args.output, model=args.model, num_inference_steps=args.steps,
                           upscale_factor=args.scale, seed=args.seed, trust_remote_code=args.trust_remote_code)
    print(f"wrote {args.output} in {seconds:.1f} s")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def demo_part(text: str) -> str:
    if text not in DEMO_PARTS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a part of the demo; choose from {', '.join(DEMO_PARTS)}")
    return text


SPEED_HOOK_SECTIONS = ("sd15", "sdxl", "sd3", "flux", "stream", "oracle", "trained", "calls")
SPEED_HOOK_METHODS = ("faster-diffusion", "feature-inheritance", "t-stitch", "ras", "diffusers PAB",
                      "diffusers TaylorSeer", "diffusers FirstBlockCache")


def comma_separated(choices: tuple[str, ...]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        names = [name.strip() for name in text.split(",") if name.strip()]
        if not names:
            raise argparse.ArgumentTypeError(f"name at least one of {', '.join(choices)}")
        unknown = [name for name in names if name not in choices]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {', '.join(map(repr, unknown))}; choose from "
                                             f"{', '.join(choices)}")
        return names

    return parse


def add_speed_hooks_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of ``diffusers-ext bench speed-hooks`` (``diffusers_ext.hooks.benchmark``), kept here so that they
    are checked before torch is imported."""
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--latent-size", type=positive_int, default=32, help="latent side (64 is SD 1.5's 512 px)")
    parser.add_argument("--steps", type=positive_int, default=10, help="denoising steps of the full-size runs")
    parser.add_argument("--repeats", type=positive_int, default=1, help="interleaved repeats of every timed run")
    parser.add_argument("--frames", type=positive_int, default=12,
                        help="frames timed through the img2img stream")
    parser.add_argument("--sections", type=comma_separated(SPEED_HOOK_SECTIONS),
                        default=["sd15", "stream", "oracle", "trained"],
                        help=f"comma-separated, from: {', '.join(SPEED_HOOK_SECTIONS)} "
                             "(default: sd15,stream,oracle,trained, about 7 minutes on 2 cores)")
    parser.add_argument("--sd3", action="store_true", help="add the SD3-medium-shaped transformer section")
    parser.add_argument("--sdxl", action="store_true", help="add the SDXL UNet section")
    parser.add_argument("--flux", action="store_true", help="add the Flux-shaped transformer section")
    parser.add_argument("--flux-blocks", type=positive_int, default=2,
                        help="double-stream blocks of the Flux-shaped model (and twice as many single-stream ones)")
    parser.add_argument("--methods", type=comma_separated(SPEED_HOOK_METHODS), default=[],
                        help="which methods the sd15 / sdxl / sd3 / flux sections run (quote names with spaces), "
                             f"comma-separated, from: {', '.join(SPEED_HOOK_METHODS)} (default: all)")
    parser.add_argument("--call-latent-size", type=positive_int, default=64, help="latent side of the calls section")
    parser.add_argument("--call-repeats", type=positive_int, default=3,
                        help="timed pairs of calls in the calls section")
    return parser


def _speed_hooks(args: argparse.Namespace) -> None:
    from .hooks.benchmark import run

    run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffusers-ext", description=__doc__.split("\n\n")[0])
    # A ValueError from a command is the user's (a file, a scheduler name) and prints as one line; the benchmark's
    # options are all checked by argparse, so one from inside its long run is a bug and keeps its traceback.
    parser.set_defaults(user_errors=ValueError)
    commands = parser.add_subparsers(dest="command", required=True)

    kinds = sorted({c.kind for c in COMPONENTS})
    list_parser = commands.add_parser("list", help="list the package's components",
                                      description="List diffusers-ext's components with their papers.")
    list_parser.add_argument("--kind", choices=kinds, help="only components of this kind")
    list_parser.add_argument("--markdown", action="store_true", help="print the README's component tables")
    list_parser.set_defaults(run=_list)

    demo = commands.add_parser(
        "demo", help="run the offline demo and write its outputs",
        description="The offline demo, in parts: 'samplers' (diffusers' and diffusers-ext's samplers against the exact "
                    "Gaussian-mixture oracle: error versus NFE, 2-D scatter), 'steering' (steering hooks toward exact "
                    "tilted and posterior laws), 'text' (the shipped masked-diffusion language model generates and "
                    "infills), 'restoration' (the shipped ResShift model super-resolves held-out photos). All parts "
                    "by default, in under a minute on 2 CPU cores; --full runs the sampler part at full size.")
    demo.add_argument("parts", nargs="*", type=demo_part, metavar="PART",
                      help=f"which parts to run ({', '.join(DEMO_PARTS)}; default: all)")
    demo.add_argument("--output", default="demo_output", help="folder for the plots and tables (default: %(default)s)")
    demo.add_argument("--full", action="store_true", help="the sampler part with 2048 samples and NFE up to 50")
    demo.add_argument("--num-samples", type=positive_int, help="samples per sampler (default: 512, 2048 with --full)")
    demo.set_defaults(run=_demo)

    restore = commands.add_parser(
        "restore", help="restore an image (by default: 4x super-resolution with the shipped tiny ResShift model)",
        description="Restore an image file with a diffusers-ext restoration pipeline.")
    restore.add_argument("input", help="the degraded (or low-resolution) image file")
    restore.add_argument("output", help="where to write the restored image (.png, .jpg, ...)")
    restore.add_argument("--model", help="a restoration pipeline folder or Hub id (default: the shipped model)")
    restore.add_argument("--steps", type=positive_int,
                         help="sampling steps (default: the model's best, 4 for the shipped one)")
    restore.add_argument("--scale", type=positive_int,
                         help="upscaling factor (default: the model's, 4 for the shipped one)")
    restore.add_argument("--seed", type=int, default=0)
    restore.add_argument("--trust-remote-code", action="store_true",
                         help="allow --model's loader files (needed for folders saved with diffusers-ext's "
                              "save_for_hub; they import classes from the installed diffusers_ext)")
    restore.set_defaults(run=_restore)

    bench = commands.add_parser("bench", help="benchmarks",
                                description="Benchmarks: samplers on the exact oracles, speed hooks.")
    bench_kinds = bench.add_subparsers(dest="benchmark", required=True)
    accuracy = bench_kinds.add_parser(
        "sampler-accuracy", help="error versus NFE of samplers on the exact Gaussian-mixture oracle",
        description="Sliced W2 to the exact law, distance to the exact ODE solution and mixture-weight error versus "
                    "counted NFE, for any schedulers (VP ones built from Stable Diffusion 1.x's config, flow ones from "
                    "SD3's), with plots.")
    accuracy.add_argument("--scheduler", action="append",
                          help="repeatable: a built-in name (DDIM, DEIS, ...), a scheduler class of diffusers or "
                               "diffusers-ext (ERSDESolverScheduler), or module:ClassName; default: diffusers' built-ins")
    accuracy.add_argument("--output", default="benchmarks/results")
    accuracy.add_argument("--num-samples", type=positive_int, default=4096)
    accuracy.add_argument("--dims", type=positive_int, nargs="+", default=[2, 64])
    accuracy.add_argument("--nfe", type=positive_int, nargs="+", default=[5, 10, 20, 50])
    accuracy.set_defaults(run=_bench)
    speed_hooks = bench_kinds.add_parser(
        "speed-hooks", help="speed hooks against the stock pipelines and diffusers' caches: wall time, FLOPs, fidelity",
        description="Speed hooks against the stock pipelines and diffusers' own caches in one run: wall-time and "
                    "CPU-time ratios, FLOPs, fidelity to the stock output; writes speed_hooks.csv and speed_hooks.png.")
    add_speed_hooks_arguments(speed_hooks).set_defaults(run=_speed_hooks, user_errors=())

    # Listed here for --help; main() hands its arguments to training/cli.py.
    commands.add_parser("train", add_help=False,
                        help="train a registered method on the shared Trainer (diffusers-ext train --help)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv[:1] == ["train"]:
            from .training.cli import main as train

            return train(argv[1:])
        parser = build_parser()
        args = parser.parse_args(argv)
        try:
            args.run(args)
        except args.user_errors as error:  # the package's clear errors about what the user asked for
            print(f"{parser.prog} {args.command}: error: {' '.join(str(error).split())}", file=sys.stderr)
            return 2
    except BrokenPipeError:  # the reader went away (``diffusers-ext list | head``): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
