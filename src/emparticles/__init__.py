"""emparticles: particle size and shape distributions from electron micrographs."""

__version__ = "0.1.0"

__all__ = ["PARTICLE_COLUMNS", "Micrograph", "ProbabilityMap", "__version__", "measure_labels", "read_micrograph"]

#: Imported on first use, so that ``import emparticles`` (and every command's start) does not pay
#: for pandas and the readers before it needs them.
_LAZY = {"read_micrograph": ".io", "PARTICLE_COLUMNS": ".measure", "measure_labels": ".measure",
         "Micrograph": ".types", "ProbabilityMap": ".types"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'emparticles' has no attribute {name!r}")
