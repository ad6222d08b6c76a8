"""The ``diffusers-ext`` command: ``list``, ``demo``, ``bench``, ``restore``, ``train``."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .components import components_markdown_table, list_components


def _list(args: argparse.Namespace) -> None:
    if args.markdown:
        print(components_markdown_table())
        return
    for c in list_components(args.kind):
        paper = f"{c.paper} (arXiv:{c.arxiv})" if c.paper else "—"
        print(f"{c.name:<34}{c.kind:<11}{c.status:<13}{paper}")


def run_sampler_accuracy(output: Path, num_samples: int, dims, nfes, schedulers=None) -> None:
    from .testing.sampler_accuracy import measure_sampler_accuracy, plot_accuracy, plot_samples_2d

    output.mkdir(parents=True, exist_ok=True)
    report = measure_sampler_accuracy(schedulers=schedulers, dims=dims, nfes=nfes, num_samples=num_samples)
    table = report.table()
    print(table)
    (output / "sampler_accuracy.txt").write_text(table + "\n", encoding="utf-8")
    report.write_csv(output / "sampler_accuracy.csv")
    plot_accuracy(report, output / "sampler_accuracy.png")
    if 2 in dims:
        plot_samples_2d(report, output / "samples_2d.png")
    print()
    for dim in dims:
        for nfe in sorted({r.nfe for r in report.rows if r.dim == dim}):
            best = report.best(dim, nfe, "ode_error")
            print(f"{dim:>3}-D, NFE {nfe:>2}: closest to the exact ODE solution: {best.scheduler} "
                  f"(mean distance {best.ode_error:.2e})")
    print(f"\nwritten to {output}/: sampler_accuracy.png, sampler_accuracy.txt, sampler_accuracy.csv"
          + (", samples_2d.png" if 2 in dims else ""))


def _demo(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    print("diffusers-ext demo: diffusers' built-in samplers on the exact Gaussian-mixture oracle\n")
    run_sampler_accuracy(Path(args.output) / "sampler_accuracy", args.num_samples, (2, 64), (5, 10, 20, 50))
    print("\nSteering hooks on the exact 2-D oracle: steered versus unsteered, next to the exact target law\n")
    from .guidance.demo import run_steering_demo

    run_steering_demo(Path(args.output) / "steering")
    print("\nThe shipped tiny masked-diffusion language model (trained on Python's documentation)\n")
    from .pipelines.text.demo import run_text_demo

    run_text_demo(Path(args.output) / "text")
    print("\nThe shipped tiny ResShift model: 4x super-resolution of photos it was not trained on\n")
    from .pipelines.restoration.demo import run_restoration_demo

    run_restoration_demo(Path(args.output) / "restoration")
    print(f"\ndemo finished in {time.perf_counter() - start:.0f} s; open {args.output}/ to look at the plots")


def _bench(args: argparse.Namespace) -> None:
    run_sampler_accuracy(Path(args.output), args.num_samples, tuple(args.dims), tuple(args.nfe))


def _restore(args: argparse.Namespace) -> None:
    from .pipelines.restoration.demo import restore_file

    seconds = restore_file(args.input, args.output, model=args.model, num_inference_steps=args.steps,
                           upscale_factor=args.scale, seed=args.seed, trust_remote_code=args.trust_remote_code)
    print(f"wrote {args.output} in {seconds:.1f} s")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffusers-ext", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    list_parser = commands.add_parser("list", help="list the package's components")
    list_parser.add_argument("--kind", help="only components of this kind")
    list_parser.add_argument("--markdown", action="store_true", help="print the README feature table")
    list_parser.set_defaults(run=_list)

    demo = commands.add_parser("demo", help="run the offline demo and write its outputs")
    demo.add_argument("--output", default="demo_output")
    demo.add_argument("--num-samples", type=int, default=2048)
    demo.set_defaults(run=_demo)

    restore = commands.add_parser(
        "restore", help="restore an image (by default: 4x super-resolution with the shipped tiny ResShift model)")
    restore.add_argument("input", help="the degraded (or low-resolution) image file")
    restore.add_argument("output", help="where to write the restored image")
    restore.add_argument("--model", help="a restoration pipeline folder or Hub id (default: the shipped model)")
    restore.add_argument("--steps", type=int, help="sampling steps (default: the model's)")
    restore.add_argument("--scale", type=int, help="upscaling factor (default: the model's, 4 for the shipped one)")
    restore.add_argument("--seed", type=int, default=0)
    restore.add_argument("--trust-remote-code", action="store_true",
                         help="allow --model's loader files (needed for folders saved with diffusers-ext's "
                              "save_for_hub; they import classes from the installed diffusers_ext)")
    restore.set_defaults(run=_restore)

    bench = commands.add_parser("bench", help="benchmarks")
    bench_kinds = bench.add_subparsers(dest="benchmark", required=True)
    accuracy = bench_kinds.add_parser("sampler-accuracy", help="error versus NFE of diffusers' samplers on the oracle")
    accuracy.add_argument("--output", default="benchmarks/results")
    accuracy.add_argument("--num-samples", type=int, default=4096)
    accuracy.add_argument("--dims", type=int, nargs="+", default=[2, 64])
    accuracy.add_argument("--nfe", type=int, nargs="+", default=[5, 10, 20, 50])
    accuracy.set_defaults(run=_bench)

    # Listed here for --help; main() hands its arguments to training/cli.py, whose flags need torch to build.
    commands.add_parser("train", add_help=False,
                        help="train a registered method on the shared Trainer (diffusers-ext train --help)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train"]:
        from .training.cli import main as train

        return train(argv[1:])
    args = build_parser().parse_args(argv)
    args.run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
