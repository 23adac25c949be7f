"""The CPU backend: NumPy variants of ops that split work over threads and pick faster BLAS shapes."""
