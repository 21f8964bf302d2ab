"""The model side: everything gradgraph knows about a TransformerLens model, and nothing above it.

``names`` (node and hook names), ``lens`` (the TransformerLens version: 3.9 models and 4.x bridges),
``features`` (what a model's architecture has, and what gradgraph covers), ``rotary``, ``hooks``
(scoped recording and replacement), ``memory`` (the graph's memory estimate, and when a long prompt's
patterns are recomputed), ``models`` (loading: the embedded model, tiny models), ``inference``
(output-only forward passes from the weights) and ``recorded`` (the recording forward from the
weights: every hook point the graph reads, without hooks).
"""
