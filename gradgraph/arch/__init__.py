"""The model side: everything gradgraph knows about a TransformerLens model, and nothing above it.

``names`` (node and hook names), ``lens`` (the TransformerLens version: 3.9 models and 4.x bridges),
``features`` (what a model's architecture has, and what gradgraph covers), ``rotary``, ``hooks``
(scoped recording and replacement), ``memory`` (the graph's memory estimate), ``models`` (loading:
the embedded model, tiny models) and ``inference`` (output-only forward passes from the weights).
"""
