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
    # from np.linspace, not rng, so that the cases after it keep their values; down to
    # -120, where log(sigmoid) would be -inf in float32
    ("log_sigmoid", [np.linspace(-120.0, 30.0, 12).reshape(3, 4)], {}),
    ("add", [R(3, 4), R(4)], {}),
    ("sub", [R(3, 1), R(3, 4)], {}),
    ("mul", [R(2, 3, 1), R(3, 4)], {}),
    ("scale", [R(3)], {"by": 0.3}),
    ("offset", [R(3)], {"by": -0.7}),
    ("stop_gradient", [R(3)], {}),
    ("sum", [R(2, 3, 4)], {"axis": 1}),
    ("sum", [R(2, 3, 4)], {"axis": [0, 2], "keepdims": True}),
    ("mean", [R(2, 3, 4)], {"axis": None}),
    ("mean", [R(2, 3, 4)], {"axis": -1}),
    ("norm", [R(2, 3, 4)], {"axis": -1}),
    # |x| with an exact zero vector in the batch (its gradient is 0, as PyTorch's), and the
    # eps option sqrt(|x|^2 + eps). These inputs come from np.sin, not rng, so that the
    # cases after them keep their values.
    ("norm", [np.sin(np.arange(1.0, 61.0)).reshape(3, 4, 5)
              * (np.arange(12).reshape(3, 4, 1) != 6)], {"axis": -1}),
    ("norm", [np.sin(np.arange(1.0, 25.0)).reshape(2, 3, 4)], {"axis": 1, "eps": 1e-7}),
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
    # an exact zero capsule inside a batch (value 0, gradient 0, nothing divides 0/0), with
    # 16 dimensions (the CPU's short-axis path, and the GPU backend's own), over axis 1 too, and
    # the eps option |s|^2 / (1 + |s|^2) s / sqrt(|s|^2 + eps); inputs from np.sin, not rng.
    # s|s| is not twice differentiable at 0, so central differences are off by h |g| there:
    # the other capsules have |s| ~ 1 (where squash's slope is largest), keeping that ~5e-7.
    ("squash", [np.sin(np.arange(1.0, 257.0)).reshape(4, 4, 16) * 0.35
                * (np.arange(16).reshape(4, 4, 1) != 6)], {"axis": -1}),
    ("squash", [np.sin(np.arange(1.0, 257.0)).reshape(4, 4, 16) * 0.35
                * (np.arange(16).reshape(4, 4, 1) != 6)], {"axis": -1, "eps": 1e-7}),
    ("squash", [np.sin(np.arange(1.0, 121.0)).reshape(4, 5, 6) * 0.6
                * (np.arange(24).reshape(4, 1, 6) != 9)], {"axis": 1}),
    ("label_or_argmax", [R(3, 4)], {}),
    ("margin_loss", [rng.random((4, 5)), one_hot([0, 1, 2, 3], 5)], {}),
    ("sum_squared_error", [R(3, 4), R(3, 4)], {}),
    ("leaky_softmax", [R(2, 3, 4)], {"axis": 2}),
    ("leaky_softmax", [R(2, 3) * 5 + 3], {"axis": -1}),
    ("squash_exp", [R(2, 3, 4)], {"axis": -1}),
    ("squash_exp", [R(2, 5, 3) * 0.01], {"axis": 1}),
    # -- math ops (div .. softmax_cross_entropy)
    # Positive inputs, uniform in [0.5, 2), for sqrt, rsqrt, log and non-integer powers;
    # div's denominators at least 0.5 away from 0. No None inputs: the variants' check
    # turns every input into an array.
    ("div", [R(3, 4), rng.uniform(0.5, 2, (4,)) * np.array([1, -1, 1, -1])], {}),
    ("div", [R(2, 1, 3), rng.uniform(0.5, 2, (4, 3))], {}),
    ("sqrt", [rng.uniform(0.5, 2, (3, 4))], {}),
    ("rsqrt", [rng.uniform(0.5, 2, (3, 4))], {}),
    ("exp", [R(3, 4)], {}),
    ("log", [rng.uniform(0.5, 2, (3, 4))], {}),
    ("pow", [R(3, 4)], {}),
    ("pow", [rng.uniform(0.5, 2, (3, 4))], {"exponent": 1.5}),
    ("pow", [rng.uniform(0.5, 2, (2, 3))], {"exponent": -0.5}),
    ("pow", [R(2, 3)], {"exponent": 3.0}),
    ("layer_norm", [R(2, 3, 4)], {}),
    ("layer_norm", [R(2, 3, 4), rng.uniform(0.5, 2, (4,)), R(4)], {}),
    # gamma and beta shaped like the normalised axes lie on them, wherever they are
    ("layer_norm", [R(2, 3, 4), rng.uniform(0.5, 2, (3,)), R(3)], {"axis": 1}),
    ("layer_norm", [R(2, 3, 4), rng.uniform(0.5, 2, (3, 4)), R(3, 4)],
     {"axis": [1, 2], "eps": 1e-3}),
    ("layer_norm", [R(2, 3, 4), rng.uniform(0.5, 2, (2, 4)), R(2, 4)], {"axis": [0, 2]}),
    # other shapes broadcast to x
    ("layer_norm", [R(2, 3, 4), rng.uniform(0.5, 2, (3, 1)), R(2, 1, 4)], {"axis": -1}),
    ("log_softmax", [R(2, 3, 4)], {"axis": 1}),
    ("log_softmax", [R(2, 3) * 5], {"axis": -1}),
    ("softmax_cross_entropy", [R(4, 5) * 3, one_hot([0, 1, 2, 3], 5)], {}),
    ("softmax_cross_entropy", [R(2, 3, 4), rng.dirichlet(np.ones(4), (2, 3))], {}),
    # -- spatial ops (max_pool2d, unfold, dropout)
    # max_pool2d on random floats (no ties): disjoint windows, overlapping ones with -inf
    # padding, and a stride that skips inputs
    ("max_pool2d", [R(2, 3, 6, 6)], {"kernel": 2}),
    ("max_pool2d", [R(1, 2, 7, 7)], {"kernel": 3, "stride": 2, "padding": 1}),
    ("max_pool2d", [R(2, 1, 5, 6)], {"kernel": 3, "stride": 1}),
    ("max_pool2d", [R(1, 2, 7, 7)], {"kernel": 2, "stride": 3}),
    ("unfold", [R(2, 2, 5, 5)], {"kernel": 3, "stride": 2, "padding": 1}),
    ("unfold", [R(1, 3, 4, 6)], {"kernel": [2, 3]}),
    ("unfold", [R(1, 1, 6, 5)], {"kernel": [3, 1], "stride": 2}),
    # dropout in training mode: the seed fixes the mask, so finite differences see one
    # linear map; and without a seed (evaluation), the identity
    ("dropout", [R(3, 4, 5), np.array(7)], {"rate": 0.3}),
    ("dropout", [R(3, 4)], {}),
]
