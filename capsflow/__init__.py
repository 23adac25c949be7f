"""capsflow: Capsule Networks as a declarative YAML computation graph.

    import capsflow
    graph = capsflow.compile("graphs/capsnet.yaml", overrides={"routing_iters": 1})
    params = graph.init_params(seed=0)
    outputs, grads = graph.value_and_grad(params, {"x": x, "y": y})
"""
from capsflow.training.checkpoint import load_params, save_params
from capsflow.errors import BackendError, CapsflowError, SpecError
from capsflow.core.graph import Graph, compile  # noqa: A004

__all__ = ["compile", "Graph", "save_params", "load_params",
           "CapsflowError", "SpecError", "BackendError"]
__version__ = "0.1.0"
