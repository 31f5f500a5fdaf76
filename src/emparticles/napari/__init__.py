"""The napari plugin: open ``analyze`` run folders and micrographs with their calibration, run
the analysis on an open image, and see, check and correct the particles (delete, merge, split,
paint), with the particle table and the size distribution following every edit.

A thin layer over the same functions as the command line: :mod:`emparticles.corrections` holds
the editing and saving, :mod:`emparticles.pipeline` the analysis.
"""
