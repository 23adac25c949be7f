"""The CUDA backend: everything capsflow does only on CuPy, registered as variants of
the ops and routines for ``Options(backend="cupy")`` when this package is imported
(capsflow.backends.get_backend does that on first use of "cupy").

Mechanisms: kernels.py (hand-written CUDA kernels), gemm.py (capsflow's own cuBLAS
call), cudagraph.py (CUDA graph capture), layout.py (memory order, pinned copies).
Variants, by op family as in ops/: linalg.py, conv.py, caps.py, elementwise.py, and
routines.py for the engine's routines. Checks and profiles that need a GPU: check.py
(``bash runners/gpu_check.sh``) and kernel_profile.py (runners/gpu_kernels.py).
"""
from capsflow.backends.cuda import caps, conv, elementwise, linalg, routines  # noqa: F401
