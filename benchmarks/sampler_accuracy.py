"""Error versus NFE of any scheduler on the exact Gaussian-mixture oracles (2-D and 64-D), with plots: the same
command as ``diffusers-ext bench sampler-accuracy`` (``--help`` lists its options).

    python benchmarks/sampler_accuracy.py                                  # diffusers' built-ins
    python benchmarks/sampler_accuracy.py --scheduler HeunDiscreteScheduler --scheduler ERSDESolverScheduler
    python benchmarks/sampler_accuracy.py --num-samples 8192 --nfe 5 10 20 50 100

VP schedulers are built with ``from_config`` from Stable Diffusion 1.x's scheduler config, flow-matching ones from
SD3's. A scheduler is a name from ``BUILTIN_SCHEDULERS``, a scheduler class of diffusers or diffusers-ext, or
``module:ClassName``.
"""

import sys

from diffusers_ext.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "sampler-accuracy", *sys.argv[1:]]))
