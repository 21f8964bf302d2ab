"""gradgraph: gradient graphs, semiring backpropagation and attributions for TransformerLens models."""

from gradgraph import data, metrics, models, semirings
from gradgraph.backprop import backprop, forward
from gradgraph.build import build_graph
from gradgraph.errors import GradGraphError
from gradgraph.graph import GradGraph
from gradgraph.models import load_model, tiny_model
from gradgraph.paths import Path, gradient_flow, path_entropy, top_paths

__all__ = [
    "GradGraph",
    "GradGraphError",
    "Path",
    "backprop",
    "build_graph",
    "data",
    "forward",
    "gradient_flow",
    "load_model",
    "metrics",
    "models",
    "path_entropy",
    "semirings",
    "tiny_model",
    "top_paths",
]
