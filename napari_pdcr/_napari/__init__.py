"""napari glue: layers -> arrays, results -> layers, reader/writer, sample data and the docks.

Only the dock widgets (``base_widget.py``, ``widget.py``, ``components_widget.py``,
``runner.py``) and ``plots.py`` need Qt; the other modules import napari's model layer
only, so they also work with a headless ``ViewerModel``.
"""
