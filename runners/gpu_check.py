"""The GPU check: every GPU correctness check, then the speed table against PyTorch.

    bash runners/gpu_check.sh [--data-dir ROOT] [--repeats 20]

What it runs is described in capsflow/backends/cuda/check.py. Exits 1 if a
correctness check fails, 2 without CuPy or a GPU.
"""
from __future__ import annotations

import argparse
import sys


def main(argv: list | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", help="data root with mnist/ for the short training run")
    parser.add_argument("--repeats", type=int, default=20, help="timed steps per framework (20)")
    args = parser.parse_args(argv)
    from capsflow.backends.cuda import check
    return check.run(args.data_dir, args.repeats)


if __name__ == "__main__":
    sys.exit(main())
