"""Neural-network layers built on itergrad's estimators (Equinox modules)."""

from ._deq import DEQ as DEQ

__all__ = ["DEQ"]
