"""Fixtures shared by the GUI tests (the napari viewer comes from napari's pytest plugin)."""

from __future__ import annotations

import pytest


@pytest.fixture
def viewer_2d(make_napari_viewer):
    """A shown viewer with the 2D sample open and its brain mask hidden."""
    viewer = make_napari_viewer(show=True)
    viewer.window._qt_window.resize(1400, 900)
    viewer.open_sample("napari-pdcr", "colin27_slice")
    viewer.layers["colin27_slice brain mask"].visible = False
    return viewer
