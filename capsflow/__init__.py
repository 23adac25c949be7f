"""capsflow: Capsule Networks as a declarative YAML computation graph.

    import capsflow
    graph = capsflow.compile("graphs/capsnet.yaml", overrides={"routing_iters": 1})
    params = graph.init_params(seed=0)
    outputs, grads = graph.value_and_grad(params, {"x": x, "y": y})
    graph.run(params, {"x": x}, backend=capsflow.Options(backend="cupy", precision="tf32"))
"""
from capsflow.core.graph import Graph, compile  # noqa: A004
from capsflow.errors import BackendError, CapsflowError, SpecError
from capsflow.lang.limits import Limits
from capsflow.options import Options
from capsflow.training.checkpoint import load_params, save_params

__all__ = ["compile", "Graph", "Limits", "Options", "save_params", "load_params",
           "CapsflowError", "SpecError", "BackendError"]
__version__ = "0.1.0"
