"""Small inputs for every op's finite-difference gradient check.

Shared by tests/test_ops_grad.py (NumPy) and the GPU check (CuPy, runners/gpu_check.py),
so both check the same cases. Each case is (op name, input arrays, attributes).
"""
import numpy as np

rng = np.random.default_rng(1)


def R(*shape):
    return rng.standard_normal(shape)


def one_hot(rows, k):
    return np.eye(k)[rows]


CASES = [
    ("relu", [R(3, 4)], {}),
    ("sigmoid", [R(3, 4) * 4], {}),
    ("add", [R(3, 4), R(4)], {}),
    ("sub", [R(3, 1), R(3, 4)], {}),
    ("mul", [R(2, 3, 1), R(3, 4)], {}),
    ("scale", [R(3)], {"by": 0.3}),
    ("stop_gradient", [R(3)], {}),
    ("sum", [R(2, 3, 4)], {"axis": 1}),
    ("sum", [R(2, 3, 4)], {"axis": [0, 2], "keepdims": True}),
    ("mean", [R(2, 3, 4)], {"axis": None}),
    ("mean", [R(2, 3, 4)], {"axis": -1}),
    ("norm", [R(2, 3, 4)], {"axis": -1}),
    ("reshape", [R(2, 6)], {"shape": [3, -1]}),
    ("transpose", [R(2, 3, 4)], {"axes": [2, 0, 1]}),
    ("expand_dims", [R(2, 3)], {"axis": -1}),
    ("zeros", [R(2, 3, 4)], {"dims": [0, 2]}),
    ("matmul", [R(2, 3, 4), R(4, 5)], {}),
    ("linear", [R(3, 4), R(4, 5), R(5)], {}),
    ("linear", [R(2, 3, 4), R(4, 5)], {}),
    ("einsum", [R(3, 2, 4, 5), R(6, 3, 5)], {"eq": "ijdk,nik->nijd"}),
    ("einsum", [R(2, 3, 4), R(2, 4)], {"eq": "nij,nj->ni"}),
    ("einsum", [R(2, 3), R(3, 4)], {"eq": "ab,bc->a"}),
    # routing's contractions, which the GPU backend runs as kernels of their own
    ("einsum", [R(2, 3, 4, 5), R(2, 4, 5)], {"eq": "nijd,njd->nij"}),
    ("einsum", [R(2, 3, 4), R(2, 3, 4, 5)], {"eq": "nij,nijd->njd"}),
    # an outer product (routing's gradients): no index summed
    ("einsum", [R(2, 3, 4), R(2, 4, 5)], {"eq": "nij,njd->nijd"}),
    ("conv2d", [R(2, 3, 7, 7), R(4, 3, 3, 3), R(4)], {"stride": 2}),
    ("conv2d", [R(1, 2, 5, 5), R(3, 2, 3, 3), R(3)], {"stride": 1, "padding": 1}),
    ("conv2d", [R(2, 1, 6, 6), R(2, 1, 3, 3)], {}),
    ("softmax", [R(2, 3, 4)], {"axis": 1}),
    ("softmax", [R(2, 3) * 5], {"axis": -1}),
    ("squash", [R(2, 3, 4)], {"axis": -1}),
    ("squash", [R(2, 5, 3) * 0.05], {"axis": 1}),
    ("label_or_argmax", [R(3, 4)], {}),
    ("margin_loss", [rng.random((4, 5)), one_hot([0, 1, 2, 3], 5)], {}),
    ("sum_squared_error", [R(3, 4), R(3, 4)], {}),
    ("leaky_softmax", [R(2, 3, 4)], {"axis": 2}),
    ("leaky_softmax", [R(2, 3) * 5 + 3], {"axis": -1}),
    ("squash_exp", [R(2, 3, 4)], {"axis": -1}),
    ("squash_exp", [R(2, 5, 3) * 0.01], {"axis": 1}),
]
