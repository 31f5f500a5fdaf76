"""emparticles: particle size and shape distributions from electron micrographs."""

__version__ = "0.1.0"

from .io import read_micrograph
from .measure import PARTICLE_COLUMNS, measure_labels
from .types import Micrograph, ProbabilityMap

__all__ = ["PARTICLE_COLUMNS", "Micrograph", "ProbabilityMap", "__version__", "measure_labels", "read_micrograph"]
