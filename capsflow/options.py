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
    #: 10 mantissa bits). It reaches capsflow's own GEMMs, that is the GPU fast paths; an op
    #: that runs its reference (fast paths off, or a variant declined) multiplies with
    #: CuPy's own matmul in fp32. NumPy ignores it.
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
        for name in SWITCHES:  # "off" or "false" is a true string: it would leave it on
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise BackendError(f"Options {name} must be True or False, got {value!r:.40}")

    def replace(self, **changes) -> "Options":
        return dataclasses.replace(self, **changes)

    @property
    def plain(self) -> "Options":
        """The same backend with every fast path off: the reference computation that each
        fast path is checked against (in fp32 on the GPU: see ``precision``)."""
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


#: The on/off fields of Options: the flag that switches each off, and its help.
SWITCHES = {
    "fast_paths": ("--no-fast-paths", "run every op's reference xp code (no backend variants)"),
    "factored_grads": ("--no-factored-grads",
                       "make outer-product gradients as full arrays one by one"),
    "fusion": ("--no-fusion", "run routing's weighted sum as three ops, as written"),
    "replay_steps": ("--no-replay",
                     "run every training step op by op (no recorded replay on CuPy)"),
}


def add_option_arguments(parser, keep_unset: bool = False) -> None:
    """The command-line flags that make an Options object (train, bench, compare...).

    With ``keep_unset`` a flag not given is None, so that ``options_from_args(args, base)``
    keeps ``base``'s value (a resumed run keeps the options it was saved with)."""
    default = Options()

    def unless_kept(name: str):
        return None if keep_unset else getattr(default, name)

    parser.add_argument("--backend", choices=BACKENDS, default=unless_kept("backend"),
                        help="array library: numpy (CPU) or cupy (GPU)")
    parser.add_argument("--precision", choices=PRECISIONS, default=unless_kept("precision"),
                        help="float32 GEMMs on the GPU: fp32, or tf32 tensor cores")
    for name, (flag, help_text) in SWITCHES.items():
        parser.add_argument(flag, dest=name, action="store_false", default=unless_kept(name),
                            help=help_text)


def option_arguments(options: Options) -> list:
    """The flags that make ``options`` (none for the defaults), so that a printed
    command line reproduces a run."""
    default = Options()
    words = []
    for name in ("backend", "precision"):
        if getattr(options, name) != getattr(default, name):
            words += [f"--{name}", getattr(options, name)]
    return words + [flag for name, (flag, _) in SWITCHES.items() if not getattr(options, name)]


def options_from_args(args, base: Options | None = None) -> Options:
    """The Options that ``add_option_arguments``' flags chose; ``base``'s value (default:
    Options()) where a flag is None or missing from ``args``."""
    chosen = {f.name: getattr(args, f.name, None) for f in dataclasses.fields(Options)}
    return (base or Options()).replace(**{k: v for k, v in chosen.items() if v is not None})
