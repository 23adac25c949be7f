"""Where a CapsNet training step spends its GPU time, per GPU function, by PyTorch's profiler.

    python -m capsflow.runners.gpu_kernels [--steps 5] [--top 30] [--timeline]

What it measures is described in capsflow/backends/cuda/kernel_profile.py. Exits 2
without CuPy or a GPU.
"""
from __future__ import annotations

import argparse
import sys


def main(argv: list | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="profiled steps (5)")
    parser.add_argument("--top", type=int, default=30, help="lines to list (30)")
    parser.add_argument("--timeline", action="store_true",
                        help="also list one step's GPU work in order, with idle time")
    args = parser.parse_args(argv)
    from capsflow.backends.cuda import kernel_profile
    return kernel_profile.run(args.steps, args.top, args.timeline)


if __name__ == "__main__":
    sys.exit(main())
