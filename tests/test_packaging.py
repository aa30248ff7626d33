"""The package is a valid napari plugin whose core works without Qt."""

import subprocess
import sys

import pytest

BLOCK_QT = """
import sys
class BlockQt:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {'PyQt5', 'PyQt6', 'PySide2', 'PySide6', 'qtpy'}:
            raise ImportError(f'Qt is blocked in this test: {name}')
        return None
sys.meta_path.insert(0, BlockQt())
"""


def test_core_imports_and_runs_without_qt():
    code = BLOCK_QT + """
import numpy as np
import napari_pdcr
from napari_pdcr import RegionEffects, box_region
from napari_pdcr.models.demo import load_demo_model
from napari_pdcr.samples import load_sample
import napari_pdcr.components, napari_pdcr.studies.comparison, napari_pdcr.io, napari_pdcr.console, napari_pdcr.plotting
sample = load_sample('colin27_slice')
model = load_demo_model('unet2d')
region = box_region(sample['image'].shape, (100, 20), 16)
e = RegionEffects(model, intervention='zero', block_shape=32, device='cpu').attribute(sample['image'][None], region)
assert e.ate.shape == sample['image'].shape
assert not [m for m in sys.modules if m.split('.')[0] in {'PyQt5', 'PyQt6', 'PySide2', 'PySide6', 'qtpy'}]
print('ok')
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")


def test_manifest_is_valid_and_declares_contributions():
    npe2 = pytest.importorskip("npe2")
    manifest = npe2.PluginManifest.from_distribution("napari-pdcr")
    manifest.validate_imports()
    contributions = manifest.contributions
    assert contributions.widgets, "no dock widget declared"
    sample_keys = {s.key for s in contributions.sample_data}
    assert len(sample_keys) >= 2, sample_keys
    assert contributions.readers, "no reader for saved explanations"


def test_sample_data_dir_is_found():
    from napari_pdcr._resources import sample_data_dir

    assert sorted(p.name for p in sample_data_dir().glob("*.npz"))
