"""Statistics on particle tables: size distributions, edge handling, spatial arrangement, comparisons."""

from .compare import Comparison, compare_sizes
from .distribution import SizeDistribution, describe_sizes, histogram_edges, weighted_quantile
from .edges import EDGE_MODES, edge_weights
from .spatial import clark_evans, nnd_test, ripley_l, spatial_summary

__all__ = ["EDGE_MODES", "Comparison", "SizeDistribution", "clark_evans", "compare_sizes", "describe_sizes",
           "edge_weights", "histogram_edges", "nnd_test", "ripley_l", "spatial_summary", "weighted_quantile"]
