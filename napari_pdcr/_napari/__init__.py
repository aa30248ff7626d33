"""napari glue: layers, reader/writer, sample data and the dock widget.

Only ``widget.py`` and ``plots.py`` need Qt; the other modules import napari's model
layer only, so they also work with a headless ``ViewerModel``.
"""
