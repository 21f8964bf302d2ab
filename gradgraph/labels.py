"""The label grammar of components: every head, q/k/v pathway, MLP and embedding, per position, with
its node and index (``Registry``), and ``Registry.parse``, the one reader of labels.

Labels follow TransformerLens:

| label         | component                                               | node, index            |
|---------------|---------------------------------------------------------|------------------------|
| ``embed@2``   | token (and position) embedding at position 2            | ``hook_embed[b, 2]``   |
| ``L3H7.q@5``  | query input of head 7 in layer 3, at position 5         | ``hook_q_input[b,5,7]``|
| ``L3H6-8.k@5``| key input of the key/value head serving query heads 6–8 | ``hook_k_input[b,5,g]``|
|               | (grouped-query attention; ``L3H7.k@5`` without grouping)|                        |
| ``L3H7@5``    | head 7's output at query position 5                     | ``hook_z[b, 5, 7]``    |
| ``MLP5@5``    | the MLP's output                                        | ``hook_mlp_out[b, 5]`` |

A label without ``@position`` (``L3H7``, ``MLP5``) is the component at every position (what an
ablation removes).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from gradgraph.arch import names
from gradgraph.errors import GradGraphError
from gradgraph.graph import GradGraph

KINDS = ("embed", "q", "k", "v", "head", "mlp")
_NODE_KIND = {"q_input": "q", "k_input": "k", "v_input": "v", "z": "head", "mlp_out": "mlp"}
_LABEL = re.compile(r"^(?:embed|MLP(\d+)|L(\d+)H(\d+)(?:-(\d+))?(?:\.([qkv]))?)(?:@(\d+))?$")


@dataclass(frozen=True)
class Component:
    """``kind`` in ``KINDS``; ``head`` is the query head (q, head) or key/value head (k, v);
    ``position`` None means every position."""

    kind: str
    layer: int | None = None
    head: int | None = None
    position: int | None = None


@dataclass(frozen=True)
class Registry:
    """The components of a model shape; ``Registry.of(graph or model)``."""

    n_layers: int
    n_heads: int
    n_key_value_heads: int
    embeds: tuple[str, ...]  # the embedding nodes: hook_embed (and hook_pos_embed)
    mlps: bool = True  # False: attention-only blocks
    sequential: bool = True  # False: attention and MLP read the same resid_pre (no hook_resid_mid)

    @staticmethod
    def of(source) -> "Registry":
        if isinstance(source, GradGraph):
            return Registry(source.n_layers, source.n_heads, source.n_key_value_heads, tuple(source.sources),
                            names.name("mlp_out", 0) in source.shapes, names.name("resid_mid", 0) in source.shapes)
        cfg = getattr(source, "cfg", source)
        embeds = names.inputs(cfg)
        return Registry(cfg.n_layers, cfg.n_heads, cfg.n_key_value_heads or cfg.n_heads, embeds, not cfg.attn_only,
                        not (cfg.attn_only or cfg.parallel_attn_mlp))

    # ---------------------------------------------------------------- enumeration and labels

    def copies(self, kind: str) -> int:
        """Heads of a kind: query heads for q and head outputs, key/value heads for k and v."""
        return self.n_key_value_heads if kind in ("k", "v") else self.n_heads

    def group(self, kv_head: int) -> range:
        """The query heads served by key/value head ``kv_head``."""
        per = self.n_heads // self.n_key_value_heads
        return range(kv_head * per, (kv_head + 1) * per)

    def components(self, kinds=KINDS, positions=None) -> list[Component]:
        """Every component of ``kinds`` (embed first, then layer by layer), at each of ``positions``
        (an int, an iterable, or None for the position-less components)."""
        where = [None] if positions is None else ([positions] if isinstance(positions, int) else list(positions))
        out = []
        for p in where:
            if "embed" in kinds and p is not None:
                out.append(Component("embed", position=p))
        for layer in range(self.n_layers):
            for kind in ("q", "k", "v", "head", "mlp"):
                if kind not in kinds or (kind == "mlp" and not self.mlps):
                    continue
                heads = [None] if kind == "mlp" else range(self.copies(kind))
                out += [Component(kind, layer, h, p) for p in where for h in heads]
        return out

    def label(self, c: Component) -> str:
        at = "" if c.position is None else f"@{c.position}"
        if c.kind == "embed":
            return f"embed{at}"
        if c.kind == "mlp":
            return f"MLP{c.layer}{at}"
        if c.kind == "head":
            return f"L{c.layer}H{c.head}{at}"
        if c.kind == "q" or self.n_key_value_heads == self.n_heads:
            return f"L{c.layer}H{c.head}.{c.kind}{at}"
        group = self.group(c.head)
        return f"L{c.layer}H{group.start}-{group.stop - 1}.{c.kind}{at}"

    def everywhere(self, label: str) -> str:
        """The label of the component ``label`` names at every position: ``L3H7@5`` → ``L3H7``."""
        return self.label(dataclasses.replace(self.parse(label), position=None))

    def parse(self, label: str) -> Component:
        """The component a label names (inverse of ``label``)."""
        match = _LABEL.match(label)
        if match is None:
            raise GradGraphError(f"{label!r} is not a component label (e.g. 'L3H7', 'L3H7.q@5', 'MLP2@4', 'embed@0')")
        mlp, layer, first, last, branch, position = match.groups()
        position = None if position is None else int(position)
        if label.startswith("embed"):
            component = Component("embed", position=position)
        elif mlp is not None:
            if not self.mlps:
                raise GradGraphError(f"{label!r}: this model's blocks are attention only")
            component = Component("mlp", int(mlp), None, position)
        elif branch in ("k", "v") and self.n_key_value_heads != self.n_heads:
            per = self.n_heads // self.n_key_value_heads
            if last is None or int(first) % per or int(last) != int(first) + per - 1:
                raise GradGraphError(f"{label!r}: key/value heads serve query heads in groups of {per}, "
                                     f"e.g. 'L{layer}H0-{per - 1}.{branch}'")
            component = Component(branch, int(layer), int(first) // per, position)
        elif last is not None:
            raise GradGraphError(f"{label!r}: only key and value inputs of grouped-query heads span heads")
        else:
            component = Component(branch or "head", int(layer), int(first), position)
        self._check(component, label)
        return component

    def _check(self, c: Component, label: str) -> None:
        if c.layer is not None and not 0 <= c.layer < self.n_layers:
            raise GradGraphError(f"{label!r}: the model has layers 0-{self.n_layers - 1}")
        if c.head is not None and not 0 <= c.head < self.copies(c.kind):
            raise GradGraphError(f"{label!r}: head outside 0-{self.copies(c.kind) - 1}")

    # ---------------------------------------------------------------- nodes

    def nodes(self, c: Component) -> tuple[str, ...]:
        """The graph nodes (hook names) holding the component."""
        if c.kind == "embed":
            return self.embeds
        kind = {"q": "q_input", "k": "k_input", "v": "v_input", "head": "z", "mlp": "mlp_out"}[c.kind]
        return (names.name(kind, c.layer),)

    def index(self, c: Component) -> tuple:
        """The index into each node's ``[batch, pos, ...]`` tensor (all batch items)."""
        position = slice(None) if c.position is None else c.position
        return (slice(None), position) + (() if c.head is None else (c.head,))

    def branch_nodes(self, layer: int) -> dict[str, str]:
        """The readers of a layer's attention input: the q/k/v input copies (one per query or
        key/value head) and the skip past attention (``hook_resid_mid``; ``hook_resid_post`` where
        attention and MLP read the same input, whose MLP branch is then not among them)."""
        skip = names.name("resid_mid" if self.sequential else "resid_post", layer)
        return {"q": names.name("q_input", layer), "k": names.name("k_input", layer),
                "v": names.name("v_input", layer), "skip": skip}

    def skip_edge(self, layer: int) -> tuple[str, str]:
        """The residual skip past a layer's attention: (``hook_resid_pre``, the skip node), a
        weight-1 edge of the residual sum."""
        return names.name("resid_pre", layer), self.branch_nodes(layer)["skip"]

    def skip_sources(self) -> dict[str, str]:
        """``{skip node: hook_resid_pre}`` for every layer: the residual each skip carries."""
        return {skip: pre for pre, skip in map(self.skip_edge, range(self.n_layers))}

    def kind_of_node(self, node: str) -> tuple[str, int | None] | None:
        """``(kind, layer)`` when ``node`` holds components (a head's z, an MLP's output, ...), else None."""
        if node in self.embeds:
            return "embed", None
        return self._node_kinds().get(node)

    def _node_kinds(self) -> dict[str, tuple[str, int]]:
        return {names.name(node, layer): (kind, layer) for layer in range(self.n_layers)
                for node, kind in _NODE_KIND.items()}


__all__ = ["KINDS", "Component", "Registry"]
