"""A compiled capsflow graph -> an ONNX model of its inference forward pass.

The DAG is already unrolled (``routing/0/c``, ``routing/1/c``, ...), so each op node
becomes one or a few standard ONNX nodes, in the DAG's topological order, and no Loop is
needed. Names come from the YAML: the value an op node makes is named by its id (helper
values of a node that takes several ONNX nodes are ``id/what``), parameters are
initializers under their own names, graph outputs carry the graph's output names, and
every value has its DAG shape with the symbolic batch ``N``, which Netron shows on the
edges.

What is exported is what ``graph.run`` computes without the optional inputs (the label
``y``): the decoder is masked by the predicted class, and the losses are left out. Each
mapping below follows its op's reference forward in ops/, constants in float32 as NumPy
rounds them there.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import capsflow
from capsflow.backends import to_numpy
from capsflow.core import memory
from capsflow.core.opdef import OPS
from capsflow.errors import CapsflowError, SpecError

# Softmax over one axis needs opset 13; up to 17, ReduceMean, ReduceMax and ReduceSumSquare
# still take `axes` as an attribute (ReduceSum as an input, from 13).
OPSET = 17
IR_VERSION = 8  # the IR of opset 17, so that older runtimes and viewers read the file

#: What one ONNX file can hold is under 2 GiB (protobuf's message limit); the nodes of a
#: model take some of it, so weights are refused a little below.
MAX_WEIGHT_BYTES = 2**31 - 64 * 2**20

#: Peak memory of an export in copies of the float32 weights: the weights themselves, the
#: model's copy and the bytes of one weight on their way in (then the model and its
#: serialised bytes). Measured: 3.1 with graphs/baseline-cnn.yaml.
EXPORT_COPIES = 3

#: Ops that have no place in an inference model, and why.
NOT_EXPORTED = {"margin_loss": "a training loss", "sum_squared_error": "a training loss"}


@dataclass
class Call:
    """One capsflow op node, as its ONNX mapping sees it."""
    op: str
    id: str         # the node id: the name of the ONNX value it makes
    inputs: list    # ONNX value names of its inputs, None for an absent optional one
    shapes: list    # their DAG shapes (None where absent)
    attrs: dict     # the node's attributes, defaults filled in

    def name(self, what: str) -> str:
        """The name of a helper value (and of the ONNX node that makes it)."""
        return f"{self.id}/{what}"


class Builder:
    """The ONNX nodes and initializers of one model. An ONNX node is named after the
    value it makes, so the node that makes op node ``id``'s value is named ``id``."""

    def __init__(self, inputs: list) -> None:
        self.nodes: list = []
        self.initializers: list = []
        self.names = set(inputs)

    def op(self, op_type: str, inputs: list, out: str, **attrs) -> str:
        self.nodes.append(helper.make_node(op_type, inputs, [self.claim(out)], name=out,
                                           **attrs))
        return out

    def const(self, name: str, value, dtype=np.float32) -> str:
        array = np.asarray(value, dtype=dtype)
        self.initializers.append(numpy_helper.from_array(array, self.claim(name)))
        return name

    def claim(self, name: str) -> str:
        """Reserve ``name`` in the model's one namespace, or one line if it is taken."""
        if name in self.names:
            raise CapsflowError(f"two values of the ONNX model would be named '{name}': "
                                "inputs, parameters, node ids, output names and the "
                                "exporter's helper values 'ID/what' share one namespace")
        self.names.add(name)
        return name


#: capsflow op -> the function that writes its ONNX nodes.
EXPORTERS: dict[str, Callable[[Builder, Call], None]] = {}


def exports(*ops: str):
    def register(fn: Callable[[Builder, Call], None]):
        for op in ops:
            EXPORTERS[op] = fn
        return fn
    return register


# -- one mapping per op ------------------------------------------------------------------
#: Ops that are one ONNX op with the same inputs (NumPy broadcasting is ONNX's too).
SAME = {"relu": "Relu", "sigmoid": "Sigmoid", "add": "Add", "sub": "Sub", "mul": "Mul",
        "matmul": "MatMul", "stop_gradient": "Identity"}


@exports(*SAME)
def _same(b: Builder, c: Call) -> None:
    b.op(SAME[c.op], c.inputs, c.id)


@exports("log_sigmoid")
def _log_sigmoid(b: Builder, c: Call) -> None:
    # min(x, 0) - ln(1 + exp(-|x|)), as in ops/elementwise.py (ONNX has no LogSigmoid)
    x = c.inputs[0]
    zero = b.const(c.name("zero"), 0.0)
    tail = b.op("Exp", [b.op("Neg", [b.op("Abs", [x], c.name("abs"))], c.name("neg_abs"))],
                c.name("exp"))
    softplus = b.op("Log", [b.op("Add", [b.const(c.name("one"), 1.0), tail], c.name("one_plus"))],
                    c.name("log1p"))
    b.op("Sub", [b.op("Min", [x, zero], c.name("min0")), softplus], c.id)


@exports("scale")
def _scale(b: Builder, c: Call) -> None:
    b.op("Mul", [c.inputs[0], b.const(c.name("by"), c.attrs["by"])], c.id)


@exports("offset")
def _offset(b: Builder, c: Call) -> None:
    b.op("Add", [c.inputs[0], b.const(c.name("by"), c.attrs["by"])], c.id)


@exports("conv2d")
def _conv2d(b: Builder, c: Call) -> None:
    stride, pad = c.attrs["stride"], c.attrs["padding"]
    b.op("Conv", [i for i in c.inputs if i is not None], c.id,
         strides=[stride, stride], pads=[pad] * 4)


@exports("linear")
def _linear(b: Builder, c: Call) -> None:
    x, w, bias = c.inputs
    if bias is None:
        b.op("MatMul", [x, w], c.id)
    else:
        b.op("Add", [b.op("MatMul", [x, w], c.name("matmul")), bias], c.id)


@exports("einsum")
def _einsum(b: Builder, c: Call) -> None:
    b.op("Einsum", c.inputs, c.id, equation=c.attrs["eq"].replace(" ", ""))


def _axes(c: Call) -> list:
    """A reduction's ``axis`` (an int, a list, or None for all) as an ONNX axes list."""
    axis = c.attrs["axis"]
    if axis is None:
        return list(range(len(c.shapes[0])))
    return list(axis) if isinstance(axis, list) else [axis]


@exports("sum")
def _sum(b: Builder, c: Call) -> None:
    if not _axes(c):  # capsflow's axis: [] sums over nothing; ONNX's empty axes mean all
        b.op("Identity", [c.inputs[0]], c.id)
        return
    axes = b.const(c.name("axes"), _axes(c), np.int64)  # an input since opset 13
    b.op("ReduceSum", [c.inputs[0], axes], c.id, keepdims=int(c.attrs["keepdims"]))


@exports("mean")
def _mean(b: Builder, c: Call) -> None:
    if not _axes(c):  # as in _sum
        b.op("Identity", [c.inputs[0]], c.id)
        return
    b.op("ReduceMean", [c.inputs[0]], c.id, axes=_axes(c), keepdims=int(c.attrs["keepdims"]))


def _squared_norm(b: Builder, c: Call, keepdims: int) -> str:
    """sum(x * x) over the node's ``axis``."""
    return b.op("ReduceSumSquare", [c.inputs[0]], c.name("n2"), axes=[c.attrs["axis"]],
                keepdims=keepdims)


def _sqrt_plus_eps(b: Builder, c: Call, n2: str, out: str) -> str:
    """sqrt(n2 + eps) with the node's ``eps``, rounded to float32 as NumPy does."""
    return b.op("Sqrt", [b.op("Add", [n2, b.const(c.name("eps"), c.attrs["eps"])],
                              c.name("n2_eps"))], out)


@exports("norm")
def _norm(b: Builder, c: Call) -> None:
    n2 = _squared_norm(b, c, keepdims=0)
    if c.attrs["eps"]:
        _sqrt_plus_eps(b, c, n2, c.id)
    else:  # the exact length sqrt(sum(x^2))
        b.op("Sqrt", [n2], c.id)


def _eps_applies(c: Call) -> bool:
    """Whether an eps changes the float32 model: as ops/caps.py's _has_eps decides it, by
    the float32 value of eps (1e-50 is 0 there, and the paper's formula runs)."""
    return bool(np.float32(c.attrs["eps"]))


@exports("squash")
def _squash(b: Builder, c: Call) -> None:
    # In the order of ops/caps.py: s * (sqrt(n2) / (1 + n2)), the paper's exact
    # |s|^2 / (1 + |s|^2) * s / |s| (0 at s = 0); with an eps, s * (n2 / (1 + n2) /
    # sqrt(n2 + eps)), one factor at a time: (1 + n2) * sqrt(n2 + eps) overflows float32
    # from |s| of about 7e12, which made long capsules 0.
    n2 = _squared_norm(b, c, keepdims=1)
    one_plus = b.op("Add", [b.const(c.name("one"), 1.0), n2], c.name("one_plus_n2"))
    if not _eps_applies(c):
        n = b.op("Sqrt", [n2], c.name("n"))
        b.op("Mul", [c.inputs[0], b.op("Div", [n, one_plus], c.name("factor"))], c.id)
        return
    r = _sqrt_plus_eps(b, c, n2, c.name("r"))
    share = b.op("Div", [n2, one_plus], c.name("n2_share"))
    b.op("Mul", [c.inputs[0], b.op("Div", [share, r], c.name("factor"))], c.id)


@exports("squash_exp")
def _squash_exp(b: Builder, c: Call) -> None:
    # s * (1 - exp(-r)) / r with r = sqrt(|s|^2 + eps), and 1 at r = 0, as ops/routing.py.
    # ONNX has no expm1, and 1 - exp(-r) loses digits at the small r of unused capsules;
    # tanh(r/2) (1 + exp(-r)) is the same number with no cancellation, and nothing in it
    # overflows (sinh(r/2) does from r of about 178).
    n2 = _squared_norm(b, c, keepdims=1)
    if _eps_applies(c):
        r = _sqrt_plus_eps(b, c, n2, c.name("r"))
    else:  # n2 + eps adds nothing in float32
        r = b.op("Sqrt", [n2], c.name("r"))
    one = b.const(c.name("one"), 1.0)
    half = b.op("Mul", [r, b.const(c.name("half"), 0.5)], c.name("half_r"))
    tanh = b.op("Tanh", [half], c.name("tanh_half_r"))
    decay = b.op("Exp", [b.op("Neg", [r], c.name("neg_r"))], c.name("exp_neg_r"))
    one_minus = b.op("Mul", [tanh, b.op("Add", [one, decay], c.name("one_plus_exp"))],
                     c.name("one_minus_exp"))  # 1 - e^-r
    ratio = b.op("Div", [one_minus, r], c.name("ratio"))  # 0/0 at r = 0, not chosen below
    positive = b.op("Greater", [r, b.const(c.name("zero"), 0.0)], c.name("positive"))
    factor = b.op("Where", [positive, ratio, one], c.name("factor"))
    b.op("Mul", [c.inputs[0], factor], c.id)


@exports("softmax")
def _softmax(b: Builder, c: Call) -> None:
    b.op("Softmax", c.inputs, c.id, axis=c.attrs["axis"])


@exports("leaky_softmax")
def _leaky_softmax(b: Builder, c: Call) -> None:
    # exp(x - top) / (exp(-top) + sum(exp(x - top))) with top = max(max(x), 0): the zero
    # orphan logit takes part in the max, as in ops/routing.py, so nothing overflows.
    x, axis = c.inputs[0], c.attrs["axis"]
    top = b.op("Max", [b.op("ReduceMax", [x], c.name("max"), axes=[axis], keepdims=1),
                       b.const(c.name("zero"), 0.0)], c.name("top"))
    e = b.op("Exp", [b.op("Sub", [x, top], c.name("shifted"))], c.name("exp"))
    orphan = b.op("Exp", [b.op("Neg", [top], c.name("neg_top"))], c.name("orphan"))
    total = b.op("ReduceSum", [e, b.const(c.name("axes"), [axis], np.int64)], c.name("sum"),
                 keepdims=1)
    b.op("Div", [e, b.op("Add", [orphan, total], c.name("den"))], c.id)


@exports("label_or_argmax")
def _label_or_argmax(b: Builder, c: Call) -> None:
    scores, label = c.inputs
    if label is not None:  # the label is a required input of this graph: it is the mask
        b.op("Identity", [label], c.id)
        return
    # one-hot argmax (first maximum, as NumPy): argmax == [0, 1, ..., K-1]
    best = b.op("ArgMax", [scores], c.name("argmax"), axis=-1, keepdims=1)
    count = c.shapes[0][-1]
    if isinstance(count, int):
        classes = b.const(c.name("classes"), np.arange(count), np.int64)
    else:  # a symbolic class axis: K read from the scores at run time
        size = b.op("Gather", [b.op("Shape", [scores], c.name("scores_shape")),
                               b.const(c.name("last"), -1, np.int64)], c.name("count"))
        classes = b.op("Range", [b.const(c.name("start"), 0, np.int64), size,
                                 b.const(c.name("step"), 1, np.int64)], c.name("classes"))
    hit = b.op("Equal", [best, classes], c.name("one_hot"))
    b.op("Cast", [hit], c.id, to=TensorProto.FLOAT)


@exports("reshape")
def _reshape(b: Builder, c: Call) -> None:
    b.op("Reshape", [c.inputs[0], b.const(c.name("shape"), c.attrs["shape"], np.int64)], c.id)


@exports("transpose")
def _transpose(b: Builder, c: Call) -> None:
    b.op("Transpose", c.inputs, c.id, perm=c.attrs["axes"])


@exports("expand_dims")
def _expand_dims(b: Builder, c: Call) -> None:
    b.op("Unsqueeze", [c.inputs[0], b.const(c.name("axes"), [c.attrs["axis"]], np.int64)], c.id)


@exports("zeros")
def _zeros(b: Builder, c: Call) -> None:
    # The shape is read from `like` at run time, so the batch stays symbolic.
    dims = b.const(c.name("dims"), c.attrs["dims"], np.int64)
    shape = b.op("Gather", [b.op("Shape", [c.inputs[0]], c.name("like_shape")), dims],
                 c.name("shape"))
    b.op("ConstantOfShape", [shape], c.id,
         value=helper.make_tensor("value", TensorProto.FLOAT, [1], [0.0]))


# -- the model ---------------------------------------------------------------------------
def inference_plan(graph, weights_made: bool = False) -> tuple:
    """(the required inputs, the plan of graph.run without the optional ones, the
    parameters the model holds), after the checks that need no weights: some output
    computable, weights that fit in one ONNX file, and memory for the export (callers
    check before making or loading 2 GiB of weights only to be refused)."""
    dag = graph.dag
    required = {n for n, d in dag.nodes(data=True) if d["kind"] == "input" and not d["optional"]}
    plan = graph.plan(required)
    if not plan.outputs:
        optional = sorted(set(graph.spec.inputs) - required)
        raise CapsflowError(f"{graph.spec.file}: no output of {graph.spec.name} can be computed "
                            f"without its optional inputs ({', '.join(optional) or 'none'}), "
                            f"and the exported model is the inference pass, which has none")
    # Parameters read by the steps, or named as outputs themselves.
    used = {ref for node in plan.steps for ref in dag.nodes[node]["inputs"]}
    used |= set(plan.outputs.values())
    held = [n for n in graph.order if dag.nodes[n]["kind"] == "param" and n in used]
    size = 4 * sum(math.prod(dag.nodes[n]["shape"]) for n in held)  # float32
    if size > MAX_WEIGHT_BYTES:  # serialising would fail only at the end
        raise CapsflowError(f"{graph.spec.name}'s weights are {size / 2**30:.2f} GiB in float32; "
                            f"an ONNX file holds at most 2 GiB (protobuf's limit), so this "
                            f"graph cannot be exported as one file")
    need = (EXPORT_COPIES - weights_made) * size  # made weights are out of the room already
    room = memory.memory_room()
    if room is not None and need > room[0]:  # rather than the system killing the process
        raise CapsflowError(f"exporting {graph.spec.name} takes about {memory.bytes_text(need)} "
                            f"of memory ({EXPORT_COPIES} times its "
                            f"{memory.bytes_text(size)} of float32 weights), more than "
                            f"{room[1]}")
    return required, plan, held


def export_model(graph, params: dict) -> onnx.ModelProto:
    """The inference forward pass of ``graph`` with ``params`` (float32) as a checked
    ONNX model. An op without an ONNX mapping raises one line naming it and its node."""
    dag = graph.dag
    required, plan, held = inference_plan(graph, weights_made=True)
    input_names = [n for n in graph.spec.inputs if n in required]
    weights = {name: _float32_weight(name, params[name]) for name in held}
    b = Builder(input_names)
    for node in plan.steps:
        _export_node(b, dag, node, plan.absent)
    for name in weights:
        try:
            b.claim(name)
        except CapsflowError as exc:  # e.g. a parameter 's/n2' beside a squash 's'
            p = graph.spec.params[name]
            raise SpecError(f"parameter '{name}': {exc}", file=p.file, line=p.line) from None
    outputs = []
    for out_name, node in plan.outputs.items():
        if out_name != node:  # e.g. digitcaps -> routing/2/v: the output keeps its own name
            try:
                b.op("Identity", [node], out_name)
            except CapsflowError as exc:
                raise CapsflowError(f"{graph.spec.file}: output '{out_name}' (value "
                                    f"'{node}'): {exc}") from None
        outputs.append(_value_info(out_name, dag.nodes[node]["shape"]))
    inputs = [_value_info(n, dag.nodes[n]["shape"]) for n in input_names]
    # While ONNX infers the helper values' shapes and checks the model, the weights are
    # graph inputs of their shapes: both serialise and parse the model they are given, and
    # with the weight bytes in it that made the peak memory 8 times the weights.
    stand_ins = [_value_info(name, weight.shape) for name, weight in weights.items()]
    shapes = [_value_info(n, dag.nodes[n]["shape"]) for n in plan.steps
              if n not in plan.outputs]
    body = helper.make_graph(b.nodes, graph.spec.name, inputs + stand_ins, outputs,
                             b.initializers, doc_string=graph.spec.description,
                             value_info=shapes)
    model = helper.make_model(body, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="capsflow", producer_version=capsflow.__version__,
                              ir_version=IR_VERSION, doc_string=graph.spec.description)
    helper.set_model_props(model, {"capsflow.graph": str(graph.spec.file),
                                   "capsflow.vars": json.dumps(graph.spec.vars)})
    model = onnx.shape_inference.infer_shapes(model)  # shapes of the helper values too
    onnx.checker.check_model(model)
    del model.graph.input[len(inputs):]  # the stand-ins become the weights
    for name, weight in weights.items():
        _add_initializer(model.graph, name, weight)
    return model


def _add_initializer(graph, name: str, weight: np.ndarray) -> None:
    """``weight`` as an initializer of ``graph``, its bytes copied once into the model
    (numpy_helper.from_array's tensor would be a second copy, made while appending)."""
    tensor = graph.initializer.add()
    tensor.name = name
    tensor.data_type = TensorProto.FLOAT
    tensor.dims.extend(weight.shape)
    tensor.raw_data = weight.astype("<f4", copy=False).tobytes()  # ONNX's is little-endian


def _float32_weight(name: str, value) -> np.ndarray:
    """A parameter as the model's float32 initializer; one line if it does not fit."""
    array = to_numpy(value)
    with np.errstate(over="ignore", invalid="ignore"):
        weight = array.astype(np.float32, copy=False)
    if not np.isfinite(weight).all():
        raise CapsflowError(f"parameter '{name}' has values that are not finite in float32 "
                            f"(NaN, infinite, or beyond 3.4e38): it cannot be a weight of "
                            f"the model")
    return weight


def _export_node(b: Builder, dag, node: str, absent: set) -> None:
    d = dag.nodes[node]
    if d["op"] not in EXPORTERS:
        why = NOT_EXPORTED.get(d["op"], "no ONNX mapping")
        raise SpecError(f"op '{d['op']}' cannot be exported to ONNX ({why}); exportable ops: "
                        f"{', '.join(sorted(EXPORTERS))}", file=d["file"], line=d["line"],
                        node=node)
    refs = list(d["inputs"])
    if not OPS[d["op"]].variadic:
        refs += [None] * (len(OPS[d["op"]].inputs) - len(refs))  # absent optional slots
    refs = [None if r in absent else r for r in refs]
    call = Call(d["op"], node, refs, [dag.nodes[r]["shape"] if r else None for r in refs],
                d["attrs"])
    first = len(b.nodes)
    try:
        EXPORTERS[d["op"]](b, call)
    except SpecError:
        raise
    except CapsflowError as exc:  # a name clash: say which node met it
        raise SpecError(str(exc), file=d["file"], line=d["line"], node=node) from None
    for onnx_node in b.nodes[first:]:  # Netron shows where each node came from
        onnx_node.doc_string = f"{d['op']} '{node}' ({d['file']}:{d['line']})"


def _value_info(name: str, shape: tuple):
    """A float32 value with its DAG shape; a symbolic dimension (N) stays a dim_param."""
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape))


# -- math ops (ops/math.py, ops/normalization.py, log_softmax and cross-entropy) --------
#: Math ops that are one ONNX op with the same inputs.
MATH = {"div": "Div", "sqrt": "Sqrt", "exp": "Exp", "log": "Log"}


@exports(*MATH)
def _math(b: Builder, c: Call) -> None:
    b.op(MATH[c.op], c.inputs, c.id)


@exports("rsqrt")
def _rsqrt(b: Builder, c: Call) -> None:
    b.op("Reciprocal", [b.op("Sqrt", c.inputs, c.name("sqrt"))], c.id)


@exports("pow")
def _pow(b: Builder, c: Call) -> None:
    b.op("Pow", [c.inputs[0], b.const(c.name("exponent"), c.attrs["exponent"])], c.id)


@exports("layer_norm")
def _layer_norm(b: Builder, c: Call) -> None:
    # (x - mean) / sqrt(var + eps) * gamma + beta, in the order of ops/normalization.py;
    # decomposed, since ONNX's LayerNormalization only normalises trailing axes.
    x, gamma, beta = c.inputs
    shape = c.shapes[0]
    axis = c.attrs["axis"]
    axes = sorted(a % len(shape) for a in (axis if isinstance(axis, list) else [axis]))
    mean = b.op("ReduceMean", [x], c.name("mean"), axes=axes, keepdims=1)
    d = b.op("Sub", [x, mean], c.name("centred"))
    var = b.op("ReduceMean", [b.op("Mul", [d, d], c.name("squared"))], c.name("var"),
               axes=axes, keepdims=1)
    std = b.op("Sqrt", [b.op("Add", [var, b.const(c.name("eps"), c.attrs["eps"])],
                             c.name("var_eps"))], c.name("std"))
    steps = [("Mul", gamma, c.shapes[1], "gamma"), ("Add", beta, c.shapes[2], "beta")]
    steps = [s for s in steps if s[1] is not None]
    out = b.op("Div", [d, std], c.id if not steps else c.name("xhat"))
    trailing = axes == list(range(len(shape) - len(axes), len(shape)))
    for k, (kind, p, p_shape, what) in enumerate(steps):
        if tuple(p_shape) == tuple(shape[a] for a in axes) and not trailing:
            # shaped like the normalised axes: placed on them, as _placed in ops/ (size-1
            # axes inserted at the others, so symbolic sizes need no -1 in a Reshape)
            others = [i for i in range(len(shape)) if i not in axes]
            p = b.op("Unsqueeze", [p, b.const(c.name(f"{what}_axes"), others, np.int64)],
                     c.name(f"{what}_placed"))
        last = k == len(steps) - 1
        out = b.op(kind, [out, p], c.id if last else c.name(f"times_{what}"))


@exports("log_softmax")
def _log_softmax(b: Builder, c: Call) -> None:
    b.op("LogSoftmax", c.inputs, c.id, axis=c.attrs["axis"])


@exports("softmax_cross_entropy")
def _softmax_cross_entropy(b: Builder, c: Call) -> None:
    # -sum(target * log_softmax(logits), -1)
    logits, target = c.inputs
    logp = b.op("LogSoftmax", [logits], c.name("log_softmax"), axis=-1)
    terms = b.op("Mul", [target, logp], c.name("terms"))
    total = b.op("ReduceSum", [terms, b.const(c.name("axes"), [-1], np.int64)], c.name("sum"),
                 keepdims=0)
    b.op("Neg", [total], c.id)


# -- spatial ops (ops/pool.py, ops/regularize.py) ------------------------------------------
@exports("max_pool2d")
def _max_pool2d(b: Builder, c: Call) -> None:
    # ONNX's MaxPool pads with -inf too (a padded value never wins), as ops/pool.py does.
    k, pad = c.attrs["kernel"], c.attrs["padding"]
    stride = k if c.attrs["stride"] is None else c.attrs["stride"]
    b.op("MaxPool", c.inputs, c.id, kernel_shape=[k, k], strides=[stride, stride],
         pads=[pad] * 4)


@exports("unfold")
def _unfold(b: Builder, c: Call) -> None:
    # Zero padding, then one strided Slice per kernel offset (a, b), each (N, C, OH, OW),
    # stacked on a last axis in row-major offset order and split into (kh, kw): the
    # layout of ops/pool.py, out[n, c, i, j, a, b] = xpad[n, c, i*stride + a, j*stride + b].
    kernel, stride, pad = c.attrs["kernel"], c.attrs["stride"], c.attrs["padding"]
    kh, kw = kernel if isinstance(kernel, list) else (kernel, kernel)
    h, w = c.shapes[0][2:]
    oh, ow = (h + 2 * pad - kh) // stride + 1, (w + 2 * pad - kw) // stride + 1
    x = c.inputs[0]
    if pad:
        x = b.op("Pad", [x, b.const(c.name("pads"), [0, 0, pad, pad, 0, 0, pad, pad], np.int64)],
                 c.name("padded"))
    axes = b.const(c.name("axes"), [2, 3], np.int64)
    steps = b.const(c.name("steps"), [stride, stride], np.int64)
    last = b.const(c.name("last"), [4], np.int64)
    parts = []
    for i in range(kh):
        for j in range(kw):
            starts = b.const(c.name(f"starts_{i}_{j}"), [i, j], np.int64)
            ends = b.const(c.name(f"ends_{i}_{j}"),
                           [i + stride * (oh - 1) + 1, j + stride * (ow - 1) + 1], np.int64)
            window = b.op("Slice", [x, starts, ends, axes, steps], c.name(f"offset_{i}_{j}"))
            parts.append(b.op("Unsqueeze", [window, last], c.name(f"offset_{i}_{j}/col")))
    stacked = b.op("Concat", parts, c.name("offsets"), axis=4)        # (N, C, OH, OW, kh*kw)
    b.op("Reshape", [stacked, b.const(c.name("shape"), [0, 0, 0, 0, kh, kw], np.int64)], c.id)


@exports("dropout")
def _dropout(b: Builder, c: Call) -> None:
    # An exported model is the inference pass: dropout there is the identity (evaluation
    # mode, as graph.run without a seed); a fed seed, if the graph requires one, is unused.
    b.op("Identity", [c.inputs[0]], c.id)
