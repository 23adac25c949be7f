"""The CPU backend: NumPy variants of ops that split work over threads, pick faster
BLAS shapes and fold short reductions (registered on import; see core/opdef.py)."""
from capsflow.backends.cpu import caps, conv, linalg  # noqa: F401
