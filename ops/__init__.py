"""The op library. Importing this package registers every op in ``capsflow.core.opdef.OPS``.

One module per op family; each op sits next to its shape rule, forward and VJP.
"""
from . import elementwise, reduce, shape, linalg, conv, caps, losses, routing, math, normalization, pool, regularize  # noqa: F401
