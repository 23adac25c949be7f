"""The one options object: every choice that changes how (not what) capsflow computes.

Made once by the command line (``options_from_args``) or by API users
(``capsflow.Options(backend="cupy", precision="tf32")``) and passed down explicitly:
``graph.run(params, inputs, backend=options)``, ``TrainStep(..., backend=options)``.
No environment variable or module global changes numerics; the fields below are the
whole list of switches, each with the default that training uses.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .errors import BackendError

BACKENDS = ("numpy", "cupy")
PRECISIONS = ("fp32", "tf32")


@dataclass(frozen=True)
class Options:
    #: Array library: "numpy" (CPU) or "cupy" (GPU).
    backend: str = "numpy"
    #: float32 matrix products on the GPU: "fp32" (exact) or "tf32" (tensor cores, about
    #: 10 mantissa bits). NumPy ignores it.
    precision: str = "fp32"
    #: Run the backend's registered variants of ops (threaded CPU convolution, GPU
    #: kernels, ...) where they apply; off, every op runs its reference ``xp`` code.
    fast_paths: bool = True
    #: Keep outer-product gradients (routing's 'nij,njd->nijd') as their two factors
    #: and sum them in one pass when the value's gradient is needed; off, each is made
    #: as a full array at once.
    factored_grads: bool = True
    #: Run recognised subgraphs (routing's expand_dims -> mul -> sum) as one op.
    fusion: bool = True
    #: Record a training step once and replay it where the backend can (CuPy);
    #: off, every step runs op by op.
    replay_steps: bool = True

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise BackendError(f"unknown backend '{self.backend}'; choose one of: {', '.join(BACKENDS)}")
        if self.precision not in PRECISIONS:
            raise BackendError(f"unknown precision '{self.precision}'; choose one of: "
                               f"{', '.join(PRECISIONS)}")

    def replace(self, **changes) -> "Options":
        return dataclasses.replace(self, **changes)

    @property
    def plain(self) -> "Options":
        """The same backend and precision with every fast path off: the reference
        computation that each fast path is checked against."""
        return self.replace(fast_paths=False, factored_grads=False, fusion=False,
                            replay_steps=False)


def as_options(spec: "str | Options | None" = None) -> Options:
    """A backend name (or None for NumPy) -> default Options for it; Options as given."""
    if spec is None:
        return Options()
    if isinstance(spec, Options):
        return spec
    if isinstance(spec, str):
        return Options(backend=spec)
    options = getattr(spec, "options", None)  # a Backend: its options
    if isinstance(options, Options):
        return options
    raise BackendError(f"backend must be a name ({', '.join(BACKENDS)}) or capsflow.Options, "
                       f"got {type(spec).__name__}")


def add_option_arguments(parser) -> None:
    """The command-line flags that make an Options object (train, bench, compare...)."""
    parser.add_argument("--backend", choices=BACKENDS, default="numpy",
                        help="array library: numpy (CPU) or cupy (GPU)")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32",
                        help="float32 GEMMs on the GPU: fp32, or tf32 tensor cores")
    parser.add_argument("--no-fast-paths", dest="fast_paths", action="store_false",
                        help="run every op's reference xp code (no backend variants)")
    parser.add_argument("--no-factored-grads", dest="factored_grads", action="store_false",
                        help="make outer-product gradients as full arrays one by one")
    parser.add_argument("--no-fusion", dest="fusion", action="store_false",
                        help="run routing's weighted sum as three ops, as written")
    parser.add_argument("--no-replay", dest="replay_steps", action="store_false",
                        help="run every training step op by op (no recorded replay on CuPy)")


def options_from_args(args) -> Options:
    """The Options that ``add_option_arguments``' flags chose."""
    return Options(backend=getattr(args, "backend", "numpy"),
                   precision=getattr(args, "precision", "fp32"),
                   fast_paths=getattr(args, "fast_paths", True),
                   factored_grads=getattr(args, "factored_grads", True),
                   fusion=getattr(args, "fusion", True),
                   replay_steps=getattr(args, "replay_steps", True))
