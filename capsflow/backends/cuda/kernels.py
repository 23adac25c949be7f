"""Hand-written CUDA kernels that CuPy runs in place of chains of small ``xp`` calls.

Each kernel implements one op (or one einsum pattern) that the op's reference ``xp``
code also implements, and does it in a single launch: squash and softmax over a
capsule's last axis (forward and VJP), the two routing contractions, a convolution's
im2col copy and the col2im sum of its input gradient, relu's VJP, the sum of
outer-product gradients (capsflow/core/gradients.py) and the Adam update. Only the
CUDA variants of this package call them, and those are on only for
``Options(backend="cupy", fast_paths=True)``. A function here answers None or False
where its kernel does not apply (another dtype or layout, too many elements for 32-bit
indices); the variant then takes another way, or declines and the reference runs.

The kernels are checked against the reference on the GPU by check.py. Without a GPU,
tests/test_cuda_compile.py compiles every source with NVRTC and
tests/test_cuda_emulated.py runs the kernels on the CPU (g++, one thread after another)
against the reference; which einsums take a kernel is in tests/test_cuda_kernels.py.
Kernels must therefore keep their threads independent: no shared memory, no two
threads writing one element.

Sources are written once for a type ``T`` and compiled per dtype (``typedef float T``
or ``double``) by NVRTC on first use; CuPy caches the binaries on disk.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from capsflow.backends.cuda.layout import in_memory_order, memory_order

#: Compiled kernels by (array module, name, dtype): the real CuPy's and the test
#: emulator's never mix.
_compiled: dict = {}

_CTYPES = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}
_THREADS = 256

# load4/store4: four consecutive values in one 16-byte access (two for double), where the
# caller has checked that the address is a multiple of four values from a 16-byte
# aligned base (``_aligned``). Wide accesses put more bytes in flight per thread and
# fewer instructions per byte. Off the GPU (tests/cuda_emulator.py) they are plain loops.
_VECTOR = r"""
#ifdef __CUDACC__
__device__ __forceinline__ void load4(const float* p, float* v) {
    float4 q = *reinterpret_cast<const float4*>(p);
    v[0] = q.x; v[1] = q.y; v[2] = q.z; v[3] = q.w;
}
__device__ __forceinline__ void load4(const double* p, double* v) {
    double2 a = reinterpret_cast<const double2*>(p)[0], b = reinterpret_cast<const double2*>(p)[1];
    v[0] = a.x; v[1] = a.y; v[2] = b.x; v[3] = b.y;
}
__device__ __forceinline__ void store4(float* p, const float* v) {
    *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
}
__device__ __forceinline__ void store4(double* p, const double* v) {
    reinterpret_cast<double2*>(p)[0] = make_double2(v[0], v[1]);
    reinterpret_cast<double2*>(p)[1] = make_double2(v[2], v[3]);
}
#else
template <class X> void load4(const X* p, X* v) { for (int k = 0; k < 4; ++k) v[k] = p[k]; }
template <class X> void store4(X* p, const X* v) { for (int k = 0; k < 4; ++k) p[k] = v[k]; }
#endif
"""

# One thread per capsule (row of D contiguous values).
_ROWWISE = r"""
extern "C" __global__ void squash_fwd(const T* __restrict__ s, T* __restrict__ out,
                                      long long rows, int D, T eps) {
    long long r = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= rows) return;
    const T* x = s + r * D;
    T n2 = 0;
    for (int d = 0; d < D; ++d) n2 += x[d] * x[d];
    // ops/caps.py: f = |s| / (1 + |s|^2) (the paper's, 0 at s = 0), or with an eps
    // n2 / ((1 + n2) sqrt(n2 + eps)), divided one factor at a time (no float32 overflow)
    T f = eps != 0 ? n2 / (1 + n2) / sqrt(n2 + eps) : sqrt(n2) / (1 + n2);
    for (int d = 0; d < D; ++d) out[r * D + d] = x[d] * f;
}

extern "C" __global__ void squash_vjp(const T* __restrict__ s, const T* __restrict__ g,
                                      T* __restrict__ out, long long rows, int D, T eps) {
    long long r = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= rows) return;
    const T* x = s + r * D;
    const T* gr = g + r * D;
    T n2 = 0, gs = 0;
    for (int d = 0; d < D; ++d) { n2 += x[d] * x[d]; gs += gr[d] * x[d]; }
    // ops/caps.py's squash_grad, divided one factor at a time as there
    T f, k;
    T q = 1 + n2;
    if (eps != 0) {  // k = 2 f'(n2) <g, s> = t <g, s> / r^3, t = (n2 + 2 eps - n2^2) / q^2
        T rt = sqrt(n2 + eps);
        f = n2 / q / rt;
        T t = (n2 + 2 * eps) / q / q - (n2 / q) * (n2 / q);
        k = (t / rt) * (gs / rt) / rt;
    } else {  // f = n / q, k = (1 - n2) / (q^2 n) <g, s>, 1/n as 1 at n = 0
        T n = sqrt(n2);
        f = n / q;
        k = (1 - n2) / q / q * (gs / (n > 0 ? n : (T)1));
    }
    for (int d = 0; d < D; ++d) out[r * D + d] = f * gr[d] + k * x[d];
}

extern "C" __global__ void softmax_fwd(const T* __restrict__ x, T* __restrict__ out,
                                       long long rows, int D) {
    long long r = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= rows) return;
    const T* xr = x + r * D;
    T* y = out + r * D;
    T m = xr[0];
    for (int d = 1; d < D; ++d) m = xr[d] > m ? xr[d] : m;
    T total = 0;
    for (int d = 0; d < D; ++d) total += exp(xr[d] - m);
    // exp again rather than write y and read it back: the same values, no round trip
    for (int d = 0; d < D; ++d) y[d] = exp(xr[d] - m) / total;
}

extern "C" __global__ void softmax_vjp(const T* __restrict__ o, const T* __restrict__ g,
                                       T* __restrict__ out, long long rows, int D) {
    long long r = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= rows) return;
    const T* orow = o + r * D;
    const T* gr = g + r * D;
    T dot = 0;
    for (int d = 0; d < D; ++d) dot += gr[d] * orow[d];
    for (int d = 0; d < D; ++d) out[r * D + d] = orow[d] * (gr[d] - dot);
}
"""

# Routing's contractions of A (B, I, J, D):
#   contract_d: out[b,i,j] = sum_d A[b,i,j,d] V[b,j,d]   (agreement; dc of the weighted sum)
#   contract_i: out[b,j,d] = sum_i C[b,i,j] A[b,i,j,d]   (weighted sum; dv of the agreement)
# contract_i splits i over S blocks per example and writes S partial sums, which one
# reduction adds up: deterministic, and enough blocks to keep the memory system busy.
_ROUTING = r"""
extern "C" __global__ void contract_d(const T* __restrict__ A, const T* __restrict__ V,
                                      T* __restrict__ out, int total, int I, int J, int D,
                                      int wide) {
    int r = blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= total) return;
    int b = r / (I * J);
    int j = r % J;
    const T* a = A + (long long)r * D;
    const T* v = V + ((long long)b * J + j) * D;
    T acc = 0;
    if (wide) {  // D a multiple of 4, A and V aligned: the same sum, read 4 values at a time
        T x[4], y[4];
        for (int d = 0; d < D; d += 4) {
            load4(a + d, x);
            load4(v + d, y);
            #pragma unroll
            for (int k = 0; k < 4; ++k) acc += x[k] * y[k];
        }
    } else {
        for (int d = 0; d < D; ++d) acc += a[d] * v[d];
    }
    out[r] = acc;
}

extern "C" __global__ void contract_i(const T* __restrict__ C, const T* __restrict__ A,
                                      T* __restrict__ partial, int Bn, int I, int J, int D, int S) {
    int b = blockIdx.x / S;
    int s = blockIdx.x % S;
    int JD = J * D;
    int per = (I + S - 1) / S;
    int i0 = s * per;
    int i1 = min(I, i0 + per);
    for (int jd = threadIdx.x; jd < JD; jd += blockDim.x) {
        int j = jd / D;
        T acc = 0;
        #pragma unroll 4
        for (int i = i0; i < i1; ++i) {
            long long row = (long long)b * I + i;
            acc += C[row * J + j] * A[row * JD + jd];
        }
        partial[((long long)s * Bn + b) * JD + jd] = acc;
    }
}
"""

# im2col: the windows of xt (N, H, W, C) as (N*OH*OW, KH*KW*C), the im2col matrix of
# conv2d's GEMMs.
# sum_leading: a (S, K) summed over S, one thread per output, reads coalesced (CuPy's
# generic reduction is slow for a short leading axis over a wide array).
# col2im: the gradient of every input pixel (n, h, w, c) gathered from the windows'
# gradients cols (KH, N, OH, OW, KW, C) that cover it (the layout of conv2d's batched
# GEMMs, one per kernel row), visiting only the offsets that land on it, in the order the
# reference adds them. A thread takes V channels C/V apart (V <= COL2IM_LANES, as C
# allows): each of its loads is coalesced over the warp, and it has V loads in flight.
_CONV = r"""
extern "C" __global__ void im2col(const T* __restrict__ xt, T* __restrict__ out,
                                  int M, int H, int W, int C, int OH, int OW, int KH, int KW,
                                  int stride) {
    // One block per output row piece (window m, kernel row r): kw*C values that lie
    // contiguously in xt, so it is a straight, coalesced copy.
    int row = blockIdx.x;  // < M * KH: a grid dimension
    int m = row / KH;
    int r = row % KH;
    int ohw = OH * OW;
    int n = m / ohw;
    int p = m % ohw;
    int oh = p / OW;
    int ow = p % OW;
    const T* src = xt + (((long long)n * H + (long long)oh * stride + r) * W
                         + (long long)ow * stride) * C;
    T* dst = out + (long long)row * KW * C;
    for (int q = threadIdx.x; q < KW * C; q += blockDim.x) dst[q] = src[q];
}

extern "C" __global__ void sum_leading(const T* __restrict__ a, T* __restrict__ out,
                                       int S, long long K) {
    long long k = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (k >= K) return;
    // Four running sums: four loads in flight per thread instead of one.
    T a0 = a[k], a1 = 0, a2 = 0, a3 = 0;
    int s = 1;
    for (; s + 3 < S; s += 4) {
        a0 += a[(long long)s * K + k];
        a1 += a[(long long)(s + 1) * K + k];
        a2 += a[(long long)(s + 2) * K + k];
        a3 += a[(long long)(s + 3) * K + k];
    }
    for (; s < S; ++s) a0 += a[(long long)s * K + k];
    out[k] = (a0 + a1) + (a2 + a3);
}

extern "C" __global__ void col2im(const T* __restrict__ cols, T* __restrict__ out,
                                  int total, int N, int H, int W, int C, int OH, int OW,
                                  int KH, int KW, int stride, int V) {
    int idx = blockIdx.x * blockDim.x + threadIdx.x;  // < N*H*W*(C/V)
    if (idx >= total) return;
    int CV = C / V;
    int q = idx % CV;
    int rest = idx / CV;
    int w = rest % W; rest /= W;
    int h = rest % H;
    int n = rest / H;
    // The windows that cover (h, w): kernel offset i = h - stride*oh in [0, KH) with
    // oh in [0, OH), and the same for j and ow. Descending oh is ascending i.
    int oh_hi = min(OH - 1, h / stride);
    int oh_lo = h >= KH ? (h - KH + stride) / stride : 0;
    int ow_hi = min(OW - 1, w / stride);
    int ow_lo = w >= KW ? (w - KW + stride) / stride : 0;
    long long plane = (long long)N * OH * OW * KW * C;  // one kernel row's block of cols
    T acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int oh = oh_hi; oh >= oh_lo; --oh) {
        int i = h - stride * oh;
        for (int ow = ow_hi; ow >= ow_lo; --ow) {
            int j = w - stride * ow;
            const T* src = cols + i * plane
                           + ((((long long)n * OH + oh) * OW + ow) * KW + j) * C + q;
            #pragma unroll
            for (int k = 0; k < 8; ++k) if (k < V) acc[k] += src[k * CV];
        }
    }
    T* dst = out + (((long long)n * H + h) * W + w) * C + q;
    #pragma unroll
    for (int k = 0; k < 8; ++k) if (k < V) dst[k * CV] = acc[k];
}
"""

# outer_sum: out[b,l,j,r] (+)= sum_k L_k[b,l,j] R_k[b,j,r] for up to 8 terms: the
# gradient that routing's uses of u_hat send back, written once (capsflow/core/gradients.py).
# A thread makes W consecutive outputs (W = 4 when NR and the alignment allow, read and
# written 4 at a time), so the index arithmetic and the left factors' loads are shared.
# Unused pointers repeat the first and are never read.
_OUTER = r"""
#define OUTER_TERM(k) if (K > k) { \
    T lv = l##k[t]; \
    if (W == 4) { T rv[4]; load4(r##k + rix, rv); for (int q = 0; q < 4; ++q) acc[q] += lv * rv[q]; } \
    else acc[0] += lv * r##k[rix]; }
extern "C" __global__ void outer_sum(
        const T* __restrict__ l0, const T* __restrict__ l1, const T* __restrict__ l2,
        const T* __restrict__ l3, const T* __restrict__ l4, const T* __restrict__ l5,
        const T* __restrict__ l6, const T* __restrict__ l7,
        const T* __restrict__ r0, const T* __restrict__ r1, const T* __restrict__ r2,
        const T* __restrict__ r3, const T* __restrict__ r4, const T* __restrict__ r5,
        const T* __restrict__ r6, const T* __restrict__ r7,
        T* __restrict__ out, int total, int NL, int NJ, int NR, int K, int accumulate, int W) {
    int e = (blockIdx.x * blockDim.x + threadIdx.x) * W;  // this thread's first output
    if (e >= total) return;
    int t = e / NR;                   // (b, l, j): the left factors' index
    int r = e % NR;
    int j = t % NJ;
    int b = t / (NL * NJ);
    int rix = (b * NJ + j) * NR + r;  // (b, j, r): the right factors' index
    T acc[4] = {0, 0, 0, 0};
    if (accumulate) {
        if (W == 4) load4(out + e, acc); else acc[0] = out[e];
    }
    OUTER_TERM(0) OUTER_TERM(1) OUTER_TERM(2) OUTER_TERM(3)
    OUTER_TERM(4) OUTER_TERM(5) OUTER_TERM(6) OUTER_TERM(7)
    if (W == 4) store4(out + e, acc); else out[e] = acc[0];
}
"""

#: Kernels that decompose a flat index do it in 32-bit ints (a GPU has no integer
#: divider: a 64-bit division is a long subroutine, a 32-bit one a few instructions),
#: so they decline arrays of more elements than this.
INT_MAX = 2 ** 31 - 1

#: Blocks per example over which contract_i splits the sum over i.
SPLITS = 16
#: Most channels one col2im thread gathers (8, 4, 2 or 1; the kernel holds up to 8).
COL2IM_LANES = 8


def typed_source(source: str, dtype: Any) -> str:
    """What NVRTC compiles for ``source`` (one of the sources above) and ``dtype``."""
    return f"typedef {_CTYPES[np.dtype(dtype)]} T;\n{_VECTOR}{source}"


def _kernel(xp: Any, source: str, name: str, dtype: Any):
    key = (xp, name, np.dtype(dtype))
    if key not in _compiled:
        _compiled[key] = xp.RawKernel(typed_source(source, dtype), name)
    return _compiled[key]


def _elementwise(xp: Any, name: str, *definition: str):
    """``xp.ElementwiseKernel(*definition, name)``, made once per array module."""
    key = (xp, name)
    if key not in _compiled:
        _compiled[key] = xp.ElementwiseKernel(*definition, name)
    return _compiled[key]


def _launch(kernel, total: int, args: tuple) -> None:
    blocks = (int(total) + _THREADS - 1) // _THREADS
    if blocks:
        kernel((blocks,), (_THREADS,), args)


def usable(*arrays: Any) -> bool:
    """Whether the kernels take these arrays: all float32 or all float64."""
    dtype = arrays[0].dtype
    return np.dtype(dtype) in _CTYPES and all(a.dtype == dtype for a in arrays)


def _last_axis(x: Any, axis: int) -> bool:
    return axis % x.ndim == x.ndim - 1


def _aligned(*arrays: Any) -> bool:
    """Whether every array starts on a 16-byte boundary (what load4/store4 need; CuPy's
    allocations do, a view into one need not)."""
    return all((a.data.ptr if hasattr(a.data, "ptr") else a.ctypes.data) % 16 == 0
               for a in arrays)


# -- squash and softmax over the last axis --------------------------------------------
def rowwise(xp: Any, name: str, axis: int, *arrays: Any, eps: float | None = None):
    """``name`` (squash_fwd, squash_vjp, softmax_fwd, softmax_vjp) over the last axis of
    same-shaped ``arrays``, or None when the kernel does not apply."""
    if not usable(*arrays) or not _last_axis(arrays[0], axis):
        return None
    arrays = tuple(xp.ascontiguousarray(a) for a in arrays)
    dtype = arrays[0].dtype.type
    d = arrays[0].shape[-1]
    rows = arrays[0].size // max(d, 1)
    out = xp.empty_like(arrays[0])
    args = arrays + (out, np.int64(rows), np.int32(d))
    if eps is not None:
        args += (dtype(eps),)
    _launch(_kernel(xp, _ROWWISE, name, arrays[0].dtype), rows, args)
    return out


# -- the routing contractions -----------------------------------------------------------
def routing_pattern(subs: list, out: str) -> tuple | None:
    """('contract_d' | 'contract_i', order) when einsum ``subs -> out`` is one of the
    routing contractions, ``order`` saying which operand is which; else None.

    contract_d: 'bijd,bjd->bij' (either operand order); contract_i: 'bij,bijd->bjd'.
    """
    if len(subs) != 2:
        return None
    for first, second in ((0, 1), (1, 0)):
        big, small = subs[first], subs[second]
        if len(big) != 4 or len(set(big)) != 4:
            continue
        b, i, j, d = big
        if len(small) == 3 and small == b + j + d and out == b + i + j:
            return "contract_d", (first, second)
        if len(small) == 3 and small == b + i + j and out == b + j + d:
            return "contract_i", (second, first)
    return None


def routing_contraction(xp: Any, subs: list, out: str, xs: tuple):
    """The einsum ``subs -> out`` of ``xs`` by a routing kernel, or None."""
    found = routing_pattern(subs, out)
    if found is None or not usable(*xs):
        return None
    kind, (ka, kb) = found
    if kind == "contract_d" and int(np.prod(xs[ka].shape[:3])) > INT_MAX:
        return None
    first, second = (xp.ascontiguousarray(xs[ka]), xp.ascontiguousarray(xs[kb]))
    dtype = first.dtype
    if kind == "contract_d":
        big, small = first, second
        bn, i, j, d = big.shape
        result = xp.empty((bn, i, j), dtype=dtype)
        wide = d % 4 == 0 and _aligned(big, small)
        _launch(_kernel(xp, _ROUTING, "contract_d", dtype), result.size,
                (big, small, result, np.int32(result.size), np.int32(i), np.int32(j), np.int32(d),
                 np.int32(wide)))
        return result
    c, big = first, second
    bn, i, j, d = big.shape
    partial = xp.empty((SPLITS, bn, j * d), dtype=dtype)
    if bn:
        threads = min(_THREADS, max(32, -(-j * d // 32) * 32))
        _kernel(xp, _ROUTING, "contract_i", dtype)(
            (bn * SPLITS,), (threads,),
            (c, big, partial, np.int32(bn), np.int32(i), np.int32(j), np.int32(d), np.int32(SPLITS)))
    return sum_leading(xp, partial).reshape(bn, j, d)


def outer_sum(xp: Any, lefts: list, rights: list, out: Any, accumulate: bool) -> bool:
    """out (nb, nl, nj, nr) = (or +=) the sum of the outer products of lefts[k] (nb, nl,
    nj) and rights[k] (nb, nj, nr), k < 8; False when the kernel does not apply."""
    if not lefts or len(lefts) > 8 or out.size > INT_MAX or not usable(out, *lefts, *rights) \
            or not all(a.flags.c_contiguous for a in (out, *lefts, *rights)):
        return False
    nb, nl, nj, nr = out.shape
    pad = [lefts[0]] * (8 - len(lefts)), [rights[0]] * (8 - len(rights))
    width = 4 if nr % 4 == 0 and _aligned(out, *rights) else 1
    _launch(_kernel(xp, _OUTER, "outer_sum", out.dtype), out.size // width,
            (*lefts, *pad[0], *rights, *pad[1], out, np.int32(out.size), np.int32(nl),
             np.int32(nj), np.int32(nr), np.int32(len(lefts)), np.int32(accumulate),
             np.int32(width)))
    return True


# -- reductions ------------------------------------------------------------------------------
def sum_leading(xp: Any, a: Any):
    """``a.sum(axis=0)``, or None when the kernel does not apply."""
    if not usable(a) or a.ndim < 1 or a.shape[0] < 1:
        return None
    a = xp.ascontiguousarray(a)
    out = xp.empty(a.shape[1:], dtype=a.dtype)
    _launch(_kernel(xp, _CONV, "sum_leading", a.dtype), out.size,
            (a, out, np.int32(a.shape[0]), np.int64(out.size)))
    return out


def sum_rows(xp: Any, a: Any):
    """``a.sum(axis=0)`` of a tall (M, K) array in two passes of sum_leading (the rows
    folded into 64 or so partial sums first, so that enough threads run), or None."""
    if not usable(a) or a.ndim != 2:
        return None
    m = a.shape[0]
    r = next((d for d in range(64, 1, -1) if m % d == 0), 1)
    partial = sum_leading(xp, xp.ascontiguousarray(a).reshape(m // r, r * a.shape[1]))
    if partial is None:  # declined (no rows, say): so is the whole sum
        return None
    return sum_leading(xp, partial.reshape(r, a.shape[1]))


def column_sums(xp: Any, a: Any):
    """``a.sum(axis=0)`` of a 2-D array, by sum_rows where it applies: the bias gradients
    of conv2d and linear (CuPy's generic reduction is slow for tall arrays)."""
    fused = sum_rows(xp, a)
    return a.sum(axis=0) if fused is None else fused


# -- convolution ---------------------------------------------------------------------------
def im2col(xp: Any, xt: Any, kh: int, kw: int, stride: int):
    """The windows of xt (N, H, W, C) as (N*OH*OW, kh*kw*C), columns in (kh, kw, C)
    order, or None when the kernel does not apply."""
    if not usable(xt):
        return None
    xt = xp.ascontiguousarray(xt)
    n, h, w, c = xt.shape
    oh, ow = (h - kh) // stride + 1, (w - kw) // stride + 1
    m = n * oh * ow
    out = xp.empty((m, kh * kw * c), dtype=xt.dtype)
    if out.size:
        _kernel(xp, _CONV, "im2col", xt.dtype)(
            (m * kh,), (_THREADS,),
            (xt, out, np.int32(m), np.int32(h), np.int32(w), np.int32(c), np.int32(oh),
             np.int32(ow), np.int32(kh), np.int32(kw), np.int32(stride)))
    return out


def col2im(xp: Any, cols: Any, in_shape: tuple, stride: int):
    """Input gradient (N, H, W, C) from window gradients ``cols`` (KH, N, OH, OW, KW, C),
    or None when the kernel does not apply."""
    kh, n, oh, ow, kw, c = cols.shape
    _, h, w, _ = in_shape
    if not usable(cols) or n * h * w * c > INT_MAX:
        return None
    cols = xp.ascontiguousarray(cols)
    out = xp.empty((n, h, w, c), dtype=cols.dtype)
    lanes = next(v for v in (8, 4, 2, 1) if v <= COL2IM_LANES and c % v == 0)
    threads = out.size // lanes
    _launch(_kernel(xp, _CONV, "col2im", cols.dtype), threads,
            (cols, out, np.int32(threads), np.int32(n), np.int32(h), np.int32(w), np.int32(c),
             np.int32(oh), np.int32(ow), np.int32(kh), np.int32(kw), np.int32(stride),
             np.int32(lanes)))
    return out


# -- relu --------------------------------------------------------------------------------------
def relu_vjp(xp: Any, g: Any, y: Any):
    """relu's input gradient ``g * (y > 0)`` from its output ``y``, in one pass and laid out
    in memory as ``y`` is (Conv1's output is channels-last, and so stays its gradient);
    None when the kernel does not apply."""
    dense = y.transpose(memory_order(y)).flags.c_contiguous  # a (transposed) contiguous array
    if not usable(g, y) or g.shape != y.shape or not dense:
        return None
    kernel = _elementwise(xp, "capsflow_relu_vjp", "T g, T y", "T dx", "dx = g * (T)(y > 0);")

    def run(y_mem, g_mem):
        dx = xp.empty(y_mem.shape, dtype=y_mem.dtype)
        kernel(xp.ascontiguousarray(g_mem), y_mem, dx)
        return dx

    return in_memory_order(run, y, g)


# -- Adam ---------------------------------------------------------------------------------------
def adam_update(xp: Any, p: Any, g: Any, m: Any, v: Any, hyper: Any, betas: tuple,
                eps: float) -> bool:
    """One Adam update of ``p``, ``m``, ``v`` in place, with the arithmetic of the
    reference (training/optim.py); ``hyper`` is a device array (step_size,
    sqrt(1 - b2^t)[, go]), read when the kernel runs (so a captured CUDA graph sees each
    step's values). With a third value the update happens only where it is nonzero: a
    replayed step skips itself on the device when its loss is not finite
    (capsflow/training/train_step.py). False when the kernel does not apply."""
    if not usable(p, g, m, v) or not all(a.flags.c_contiguous for a in (p, g, m, v)):
        return False
    kernel = _elementwise(
        xp, "capsflow_adam",
        "T g, raw float64 hyper, int32 guarded, float64 b1, float64 b2, float64 eps",
        "T p, T m, T v",
        """
        if (!guarded || hyper[2] != 0) {
            T mm = m + (g - m) * (T)(1.0 - b1);
            T vv = v * (T)b2 + (T)(1.0 - b2) * (g * g);
            T denom = sqrt(vv) / (T)hyper[1] + (T)eps;
            p = p - (mm / denom) * (T)hyper[0];
            m = mm;
            v = vv;
        }
        """)
    kernel(g, hyper, np.int32(hyper.size > 2), float(betas[0]), float(betas[1]), float(eps),
           p, m, v)
    return True
