"""The engine's shape, enforced: ops/ holds one reference code path per op (no backend
branches, no imports beyond the op definitions), and nothing outside the CUDA backend
package (capsflow/backends/cuda/) mentions CUDA kernels, cuBLAS or CUDA graphs."""
import ast
import re

import pytest

from conftest import REPO

CUDA_MACHINERY = re.compile(
    r"cublas|cudagraph|cuda[ _]graph|cuda[ _]kernel|RawKernel|ElementwiseKernel|nvrtc"
    r"|backends[./]cuda[./](kernels|gemm|cudagraph|layout)", re.IGNORECASE)
BACKEND_BRANCH = re.compile(r"on_cpu|on_gpu|__name__|get_array_module|capsflow\.backends"
                            r"|threadpool|parallel|cupy", re.IGNORECASE)


def _engine_files():
    """capsflow/ and runners/, less the CUDA backend package and the thin GPU commands."""
    files = sorted((REPO / "capsflow").rglob("*.py")) + sorted((REPO / "runners").glob("*.py"))
    cuda = REPO / "capsflow" / "backends" / "cuda"
    return [f for f in files if cuda not in f.parents]


@pytest.mark.parametrize("path", _engine_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_no_cuda_machinery_outside_its_package(path):
    found = CUDA_MACHINERY.search(path.read_text())
    assert found is None, f"{path.relative_to(REPO)} mentions {found.group(0)!r}"


def test_the_check_catches_a_mention():
    assert CUDA_MACHINERY.search("from capsflow.backends.cuda import kernels as cuda_kernels "
                                 "# launches a CUDA kernel")


@pytest.mark.parametrize("path", sorted((REPO / "ops").glob("*.py")), ids=lambda p: p.name)
def test_ops_are_references_without_backend_branches(path):
    source = path.read_text()
    found = BACKEND_BRANCH.search(source)
    assert found is None, f"ops/{path.name} has a backend branch or import: {found.group(0)!r}"
    allowed = {"capsflow.core.opdef", "capsflow.core.shapes", "__future__", "math", "typing"}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.level == 0:
            assert node.module in allowed, f"ops/{path.name} imports {node.module}"
        elif isinstance(node, ast.Import):
            raise AssertionError(f"ops/{path.name} imports {[a.name for a in node.names]}")
