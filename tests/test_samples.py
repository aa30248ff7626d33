"""The bundled sample arrays load with the documented shapes, dtypes, ranges and masks."""

import numpy as np
import pytest

from napari_pdcr.samples import (
    colin27_split,
    load_sample,
    sample_layers_2d,
    sample_layers_3d,
    sample_names,
)

EXPECTED_SHAPES = {
    "colin27_slice": (217, 181),
    "colin27_slices": (None, 217, 181),
    "colin27_volume": (91, 109, 91),
    "itk_slices": (None, 217, 181),
    "itk_volume": (91, 109, 91),
}
EXPECTED_SPACING = {
    "colin27_slice": (1.0, 1.0),
    "colin27_slices": (1.0, 1.0),
    "colin27_volume": (2.0, 2.0, 2.0),
    "itk_slices": (1.0, 1.0),
    "itk_volume": (2.0, 2.0, 2.0),
}


def test_sample_names_cover_the_documented_samples():
    assert set(EXPECTED_SHAPES) <= set(sample_names())


@pytest.mark.parametrize("name", sorted(EXPECTED_SHAPES))
def test_sample_shapes_dtypes_and_ranges(name):
    sample = load_sample(name)
    image, mask = sample["image"], sample["mask"]
    assert sample["name"] == name and sample["description"]
    assert image.dtype == np.float32 and mask.dtype == np.uint8
    assert image.shape == mask.shape
    expected = EXPECTED_SHAPES[name]
    assert len(image.shape) == len(expected)
    assert all(e is None or e == s for e, s in zip(expected, image.shape, strict=True))
    assert sample["spacing"] == EXPECTED_SPACING[name]
    assert all(isinstance(s, float) for s in sample["spacing"])
    assert 0.0 <= image.min() and image.max() <= 1.0
    assert image.max() > 0.5  # real contrast, not an all-dark array


@pytest.mark.parametrize("name", sorted(EXPECTED_SHAPES))
def test_mask_is_binary_nonempty_and_on_the_head(name):
    sample = load_sample(name)
    image, mask = sample["image"], sample["mask"].astype(bool)
    assert set(np.unique(sample["mask"])) == {0, 1}
    assert 0.05 < mask.mean() < 0.7  # brain is a sizeable part of the field of view, not all
    assert not mask[..., 0].any() and not mask[..., -1].any()  # brain does not touch the sides
    # brain tissue is brighter than the (mostly air) background outside the mask
    assert image[mask].mean() > 2 * image[~mask].mean()
    assert np.mean(image[mask] > 0.05) > 0.99  # the mask lies on the head, not on air


def test_slice_stacks_hold_every_fourth_slice_with_brain():
    for name in ("colin27_slices", "itk_slices"):
        sample = load_sample(name)
        index = sample["slice_index"]
        assert index.shape == (len(sample["image"]),)
        assert np.all(np.diff(index) == 4)
        assert all(m.any() for m in sample["mask"][1:-1])


def test_orientation_anterior_up_superior_last():
    """Rows run anterior->posterior and slices inferior->superior: the lowest quarter of the
    slices with brain (cerebellum, temporal poles) lies mostly in the posterior half."""
    volume = load_sample("colin27_volume")["mask"]
    rows_with_brain = np.flatnonzero(volume.any(axis=(0, 2)))
    assert rows_with_brain[0] > 0 and rows_with_brain[-1] < volume.shape[1] - 1
    # the cerebellum sits posterior and inferior: in the lowest quarter of slices with brain,
    # the brain lies in the posterior half of the rows
    slices_with_brain = np.flatnonzero(volume.any(axis=(1, 2)))
    low = volume[slices_with_brain[0] : slices_with_brain[0] + len(slices_with_brain) // 4]
    rows = np.nonzero(low)[1]
    assert rows.mean() > volume.shape[1] / 2


def test_colin27_split_is_interleaved_and_contains_the_2d_sample():
    train, heldout = colin27_split()
    stack = load_sample("colin27_slices")
    assert len(train) + len(heldout) == len(stack["image"])
    assert not set(train) & set(heldout)
    assert np.all(np.diff(heldout) == 4)
    assert len(heldout) >= 8
    slice_sample = load_sample("colin27_slice")
    assert slice_sample["slice_index"] in stack["slice_index"][heldout]
    position = int(np.flatnonzero(stack["slice_index"] == slice_sample["slice_index"])[0])
    np.testing.assert_array_equal(stack["image"][position], slice_sample["image"])


def test_subjects_differ():
    """The second subject is another head, not a copy of Colin27."""
    colin, itk = load_sample("colin27_volume"), load_sample("itk_volume")
    overlap = (
        np.logical_and(colin["mask"], itk["mask"]).sum()
        / np.logical_or(colin["mask"], itk["mask"]).sum()
    )
    assert 0.5 < overlap < 0.95  # brains placed alike, but not identical
    assert np.corrcoef(colin["image"].ravel(), itk["image"].ravel())[0, 1] < 0.9


def test_unknown_sample_name_lists_available():
    with pytest.raises(KeyError, match="colin27_slice"):
        load_sample("no-such-sample")


@pytest.mark.parametrize(("layers_fn", "ndim"), [(sample_layers_2d, 2), (sample_layers_3d, 3)])
def test_sample_layers_are_image_and_labels(layers_fn, ndim):
    layers = layers_fn()
    assert [layer_type for _, _, layer_type in layers] == ["image", "labels"]
    (image, image_kwargs, _), (mask, mask_kwargs, _) = layers
    assert image.ndim == ndim and image.shape == mask.shape
    assert image.dtype == np.float32 and mask.dtype == np.uint8
    assert image_kwargs["scale"] == mask_kwargs["scale"] and len(image_kwargs["scale"]) == ndim
    assert image_kwargs["colormap"] == "gray"
    assert image_kwargs["name"] != mask_kwargs["name"]
