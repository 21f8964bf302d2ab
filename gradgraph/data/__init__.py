"""Datasets for gradgraph experiments."""

from gradgraph.data.sva import SVAItem, sva_items

__all__ = ["SVAItem", "sva_items"]
