"""Every registered variant of every op against the op's reference, on every gradient
case (capsflow/core/gradcases.py): outputs and input gradients in float64. CPU variants
run on NumPy, CUDA variants on the emulated CuPy (tests/cuda_emulator.py). A new
variant is checked here without a test written for it; the last test fails if some
variant never ran on any case (every variant needs a case it does not decline)."""
import numpy as np
import pytest

from capsflow import Options
from capsflow.backends import get_backend, to_numpy
from capsflow.core.gradcases import CASES
from capsflow.core.gradients import as_array
from capsflow.core.opdef import get_op

RAN: dict = {}   # (op, backend, option) -> whether any case ran the variant


def _backends_with_variants():
    get_backend("numpy")  # registers the CPU variants
    import capsflow.backends.cuda  # noqa: F401  (registers the CUDA variants; no GPU needed)
    return sorted({v.backend for name, _, _ in CASES for v in get_op(name).variants} - {"*"})


def _run(be, op, args, attrs, g):
    result, variant = op.run_forward(be, list(args), attrs)
    out, extras = result if isinstance(result, tuple) else (result, {})
    names = op.input_names(len(args))
    saved = dict(extras)
    for key in op.saves:
        saved[key] = out if key == "out" else (args[names.index(key)] if key in names else saved[key])
    needs = tuple(a is not None and op.differentiable(k, len(args)) for k, a in enumerate(args))
    grads = op.run_vjp(be, variant, saved, g, needs, attrs)
    return out, [None if gk is None else to_numpy(as_array(be, gk)) for gk in grads], variant


@pytest.mark.parametrize("backend", _backends_with_variants())
@pytest.mark.parametrize("name,args,attrs", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_variant_matches_reference(request, backend, name, args, attrs):
    if backend == "cupy":
        request.getfixturevalue("emu")
    op = get_op(name)
    full = {k: a.default for k, a in op.attrs.items()}
    full.update(attrs)
    fast = get_backend(Options(backend=backend))
    plain = get_backend(Options(backend=backend).plain)
    xs = [fast.xp.asarray(a, dtype=np.float64) for a in args]
    out_ref = op.compute(plain, *xs, **full)
    g = fast.xp.asarray(np.random.default_rng(0).standard_normal(out_ref.shape))
    out, grads, variant = _run(fast, op, xs, full, g)
    _, ref_grads, _ = _run(plain, op, xs, full, g)
    for v in op.variants:
        if v.applies(fast.options):
            key = (name, backend, v.option)
            RAN[key] = RAN.get(key, False) or variant is v or v.forward_fn is None
    np.testing.assert_allclose(to_numpy(out), to_numpy(out_ref), rtol=1e-10, atol=1e-12)
    for got, want in zip(grads, ref_grads):
        assert (got is None) == (want is None)
        if want is not None:
            np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


def test_every_variant_ran_on_some_case():
    never = sorted(k for k, ran in RAN.items() if not ran)
    assert RAN and not never, f"variants that declined every case: {never}"
