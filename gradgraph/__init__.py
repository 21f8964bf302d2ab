"""gradgraph: gradient graphs, semiring backpropagation and attributions for TransformerLens models."""

from gradgraph import data, metrics, models
from gradgraph.errors import GradGraphError
from gradgraph.models import load_model, tiny_model

__all__ = ["GradGraphError", "data", "load_model", "metrics", "models", "tiny_model"]
