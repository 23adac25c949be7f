"""The CUDA backend: capsflow's own cuBLAS call, CUDA kernels, CUDA graphs, and the op variants that use them."""
