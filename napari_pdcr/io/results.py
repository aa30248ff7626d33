"""Explanations as zarr stores: arrays plus JSON provenance, written atomically.

Layout (zarr v3 group)::

    <path>/                      attrs: {"napari_pdcr": {"kind": "region_explanation",
                                          "format_version": 1, "block_shape": ..., "base_outcome": ...,
                                          "parameters": {...}, "model_identity": {...},
                                          "provenance": {...}, "timings": {...}, ...}}
        block_effects            float32  grid shape
        block_standard_error     float32  grid shape
        block_draws              int32    grid shape
        block_status             int8     grid shape
        target_region            uint8    spatial shape
        prediction               uint8    spatial shape
        reference                uint8    spatial shape (only if a reference mask was given)
        extras/<name>            further arrays (e.g. component effects)

A store is first written to a hidden sibling folder and then renamed into place, so a
crash or a cancel never leaves a half-written store under ``path``.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import numpy as np
import zarr

FORMAT_VERSION = 1
_ARRAYS = ("block_effects", "block_standard_error", "block_draws", "block_status")
_MASKS = ("target_region", "prediction", "reference")


def _jsonable(value):
    """Round-trip ``value`` through JSON (numpy scalars/arrays become plain numbers/lists)."""
    return json.loads(json.dumps(value, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


def atomic_directory_write(path, write) -> Path:
    """Call ``write(tmp_path)`` on a hidden sibling folder, then move it to ``path``.

    An existing ``path`` is replaced only after the new content is complete.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        write(tmp)
        if path.exists():
            old = path.with_name(f".{path.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(path, old)
            try:
                os.replace(tmp, path)
            except BaseException:
                os.replace(old, path)  # put the old store back
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def save_explanation(explanation, path, extras: dict[str, np.ndarray] | None = None) -> Path:
    """Save a :class:`~napari_pdcr.explanation.RegionExplanation` to a zarr store at ``path``."""
    meta = {
        "kind": "region_explanation",
        "format_version": FORMAT_VERSION,
        "block_shape": list(explanation.block_shape),
        "base_outcome": explanation.base_outcome,
        "parameters": explanation.parameters,
        "model_identity": explanation.model_identity,
        "provenance": explanation.provenance,
        "timings": explanation.timings,
        "forward_passes": explanation.forward_passes,
        "spacing": list(explanation.spacing) if explanation.spacing is not None else None,
        "log": explanation.log,
        "summary": explanation.summary(),
    }
    extras = {**explanation.extras, **(extras or {})}

    def write(tmp: Path):
        root = zarr.open_group(str(tmp), mode="w")
        for name in _ARRAYS:
            root.create_array(name, data=np.ascontiguousarray(getattr(explanation, name)))
        for name in _MASKS:
            mask = getattr(explanation, name)
            if mask is not None:
                root.create_array(name, data=np.ascontiguousarray(mask, dtype=np.uint8))
        if extras:
            group = root.create_group("extras")
            for name, array in extras.items():
                group.create_array(name, data=np.ascontiguousarray(array))
        root.attrs["napari_pdcr"] = _jsonable(meta)

    return atomic_directory_write(path, write)


def is_explanation_store(path) -> bool:
    """True when ``path`` is a zarr store written by :func:`save_explanation`."""
    path = Path(path)
    if not path.is_dir() or not (path / "zarr.json").exists():
        return False
    try:
        return json.loads((path / "zarr.json").read_text())["attributes"]["napari_pdcr"]["kind"] == "region_explanation"
    except (KeyError, ValueError, OSError):
        return False


def load_explanation(path):
    """Load a :class:`~napari_pdcr.explanation.RegionExplanation` saved by :func:`save_explanation`."""
    from napari_pdcr.explanation import RegionExplanation

    if not is_explanation_store(path):
        raise ValueError(f"{path} is not a napari-pdcr explanation store")
    root = zarr.open_group(str(path), mode="r")
    meta = dict(root.attrs["napari_pdcr"])
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{path} was written by a newer napari-pdcr (format {meta['format_version']})")
    names = set(root.array_keys())
    arrays = {name: np.asarray(root[name][...]) for name in _ARRAYS}
    masks = {name: (np.asarray(root[name][...]).astype(bool) if name in names else None) for name in _MASKS}
    explanation = RegionExplanation(
        **arrays,
        **masks,
        block_shape=tuple(meta["block_shape"]),
        base_outcome=float(meta["base_outcome"]),
        parameters=meta.get("parameters", {}),
        model_identity=meta.get("model_identity", {}),
        provenance=meta.get("provenance", {}),
        timings=meta.get("timings", {}),
        forward_passes=int(meta.get("forward_passes", 0)),
        spacing=tuple(meta["spacing"]) if meta.get("spacing") else None,
        log=list(meta.get("log", [])),
    )
    if "extras" in set(root.group_keys()):
        explanation.extras = {k: np.asarray(v[...]) for k, v in root["extras"].arrays()}
    return explanation
