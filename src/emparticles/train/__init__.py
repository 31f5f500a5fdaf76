"""Training segmentation networks on annotated micrographs."""
