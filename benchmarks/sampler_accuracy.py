"""Error versus NFE of any scheduler on the exact Gaussian-mixture oracles (2-D and 64-D), with plots.

    python benchmarks/sampler_accuracy.py                                  # diffusers' built-ins
    python benchmarks/sampler_accuracy.py --scheduler diffusers:HeunDiscreteScheduler --scheduler DDIM
    python benchmarks/sampler_accuracy.py --num-samples 8192 --nfe 5 10 20 50 100

VP schedulers are built with ``from_config`` from Stable Diffusion 1.x's scheduler config, flow-matching ones from
SD3's. A scheduler is a name from ``BUILTIN_SCHEDULERS`` or ``module:ClassName`` (ours or diffusers').
"""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

from diffusers_ext.cli import run_sampler_accuracy
from diffusers_ext.testing.sampler_accuracy import BUILTIN_SCHEDULERS


def resolve_scheduler(spec: str) -> tuple[str, type]:
    if spec in BUILTIN_SCHEDULERS:
        return spec, BUILTIN_SCHEDULERS[spec]
    module, _, name = spec.partition(":")
    if not name:
        raise SystemExit(f"--scheduler {spec!r}: use a name from {list(BUILTIN_SCHEDULERS)} or module:ClassName")
    return name, getattr(importlib.import_module(module), name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scheduler", action="append", help="repeatable; default: all of diffusers' built-ins")
    parser.add_argument("--output", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--num-samples", type=int, default=4096)
    parser.add_argument("--dims", type=int, nargs="+", default=[2, 64])
    parser.add_argument("--nfe", type=int, nargs="+", default=[5, 10, 20, 50])
    args = parser.parse_args()
    schedulers = dict(resolve_scheduler(s) for s in args.scheduler) if args.scheduler else None
    run_sampler_accuracy(Path(args.output), args.num_samples, tuple(args.dims), tuple(args.nfe), schedulers)


if __name__ == "__main__":
    main()
