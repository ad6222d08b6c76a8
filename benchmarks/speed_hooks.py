"""Speed hooks against the stock pipeline and diffusers' own caches, in one run: wall time, FLOPs, fidelity. The
benchmark lives in ``diffusers_ext.hooks.benchmark`` (its docstring says what each section measures);
``--help`` lists the options.

    python benchmarks/speed_hooks.py                                    # sd15, stream, oracle, trained (~7 min)
    python benchmarks/speed_hooks.py --sections sd15 --steps 50 --methods faster-diffusion
    python benchmarks/speed_hooks.py --sections sd3 --latent-size 64
"""

import sys

from diffusers_ext.hooks.benchmark import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
