"""Backend selection: NumPy always, CuPy only with a GPU; clear errors otherwise."""
import builtins

import numpy as np
import pytest

from capsflow.backends import get_array_module, get_backend
from capsflow.ops.conv import sliding_windows
from capsflow.errors import BackendError


def _cupy_usable() -> bool:
    try:
        get_backend("cupy")
    except BackendError:
        return False
    return True


def test_numpy_backend_and_array_module():
    be = get_backend("numpy")
    assert be.xp is np and get_array_module(np.zeros(2), 1.0) is np
    a = be.asarray([[1, 2]], dtype=np.float32)
    assert a.dtype == np.float32 and a.flags.c_contiguous


def test_unknown_backend_is_one_line():
    with pytest.raises(BackendError, match="unknown backend 'torch'; choose one of: numpy, cupy"):
        get_backend("torch")


def test_cupy_missing_is_one_clear_line(monkeypatch):
    import capsflow.backends as backend
    monkeypatch.setattr(backend, "_cache", {})
    real_import = builtins.__import__

    def no_cupy(name, *args, **kwargs):
        if name == "cupy":
            raise ImportError("No module named 'cupy'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_cupy)
    monkeypatch.setattr(backend.importlib, "import_module",
                        lambda name: no_cupy(name) if name == "cupy" else real_import(name))
    with pytest.raises(BackendError, match=r"backend 'cupy' needs CuPy: pip install 'capsflow\[cuda12\]'"):
        get_backend("cupy")


@pytest.mark.skipif(_cupy_usable(), reason="CuPy and a GPU are present")
def test_cli_backend_cupy_without_gpu_exits_2(capsys):
    from capsflow.cli import main
    from conftest import CAPSNET
    assert main(["gradcheck", str(CAPSNET), "--backend", "cupy", "--set", "routing_iters=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("capsflow gradcheck: error: backend 'cupy'")


def test_sliding_windows_is_a_view_of_every_window():
    x = np.arange(2 * 3 * 7 * 7, dtype=np.float64).reshape(2, 3, 7, 7)
    win = sliding_windows(np, x, 3, 3, 2)
    assert win.shape == (2, 3, 3, 3, 3, 3) and np.shares_memory(win, x)
    np.testing.assert_array_equal(win[1, 2, 1, 2], x[1, 2, 2:5, 4:7])


def test_options_check_their_values_in_one_line():
    from capsflow import Options
    with pytest.raises(BackendError, match="unknown precision 'bf16'; choose one of: fp32, tf32"):
        Options(precision="bf16")
    with pytest.raises(BackendError, match="unknown backend 'torch'"):
        Options(backend="torch")
    assert Options(precision="tf32").plain == Options(precision="tf32", fast_paths=False,
                                                      factored_grads=False, fusion=False,
                                                      replay_steps=False)


def test_backends_are_made_once_per_options():
    from capsflow import Options
    assert get_backend("numpy") is get_backend(Options())
    fast, plain = get_backend(Options()), get_backend(Options(fast_paths=False))
    assert fast is not plain and fast.xp is plain.xp and get_backend(fast) is fast
