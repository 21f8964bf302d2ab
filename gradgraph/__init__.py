"""gradgraph: gradient graphs, semiring backpropagation and attributions for TransformerLens models."""

from gradgraph import data, metrics, rules, semirings
from gradgraph.arch.models import load_model, tiny_model
from gradgraph.attribution import Attribution, attribute, integrated_flow, lrp
from gradgraph.backprop import backprop, forward
from gradgraph.build import assemble, build_graph, record
from gradgraph.errors import GradGraphError
from gradgraph.fused import input_values
from gradgraph.graph import GradGraph
from gradgraph.paths import GradientPath, gradient_flow, path_entropy, top_paths
from gradgraph.rules import GRADIENT, RuleSet

__all__ = [
    "Attribution",
    "GRADIENT",
    "GradGraph",
    "GradGraphError",
    "GradientPath",
    "RuleSet",
    "assemble",
    "attribute",
    "backprop",
    "build_graph",
    "data",
    "forward",
    "gradient_flow",
    "input_values",
    "integrated_flow",
    "load_model",
    "lrp",
    "metrics",
    "path_entropy",
    "record",
    "rules",
    "semirings",
    "tiny_model",
    "top_paths",
]
