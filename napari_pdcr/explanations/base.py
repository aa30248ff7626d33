"""The base of every result: maps or values, parameters, provenance, one store format.

Every kind of explanation (region effects, component effects, and the methods that
come next) is an :class:`Explanation`: it carries the parameters of the run, the model's
identity (name, source, sha256), the provenance (versions, time, seed), timings, the
number of forward passes and a log; it summarises itself (:meth:`Explanation.summary`),
and it is saved and loaded through **one** zarr store format
(:mod:`napari_pdcr.io.results`), whose ``kind`` names the class that restores it
(:meth:`Explanation.load` works for every registered kind).

Showing a result in napari lives in the napari layer
(:mod:`napari_pdcr._napari.viewer`); :meth:`Explanation.show` reaches it lazily, so
importing the core never imports napari.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np

#: the meta fields every explanation stores, besides its own
COMMON_FIELDS = ("parameters", "model_identity", "provenance", "timings", "forward_passes", "log")


@dataclass(kw_only=True)
class Explanation:
    """What every result holds besides its maps or values.

    Subclasses set :attr:`kind` (the store's ``kind``; registering the class) and
    implement :meth:`arrays`, :meth:`meta`, :meth:`from_store` and :meth:`summary`.
    """

    parameters: dict = field(default_factory=dict)  #: every parameter of the method
    model_identity: dict = field(default_factory=dict)  #: name, source, sha256 of the model
    provenance: dict = field(default_factory=dict)  #: versions, creation time (UTC), seed
    timings: dict = field(default_factory=dict)  #: seconds per phase
    forward_passes: int = 0  #: images run through the model (see each kind for what is counted)
    log: list[str] = field(default_factory=list)  #: notes of the run for the user

    #: the store ``kind`` of this class
    kind: ClassVar[str] = ""
    #: ``kind`` -> class, filled by subclassing
    registry: ClassVar[dict[str, type[Explanation]]] = {}

    def __init_subclass__(cls, **options):
        super().__init_subclass__(**options)
        if cls.__dict__.get("kind"):
            Explanation.registry[cls.kind] = cls

    # ---------------------------------------------------------------- for the store
    def arrays(self) -> dict[str, np.ndarray]:
        """The arrays saved with the result, by name."""
        raise NotImplementedError

    def meta(self) -> dict:
        """JSON fields saved with the result besides :data:`COMMON_FIELDS`."""
        raise NotImplementedError

    @classmethod
    def from_store(cls, arrays: dict[str, np.ndarray], meta: dict) -> Explanation:
        """Rebuild from what :meth:`arrays` and :meth:`meta` (plus the common fields) saved."""
        raise NotImplementedError

    def summary(self) -> dict:
        """The result's summary figures, JSON-serialisable."""
        raise NotImplementedError

    def common_fields(self) -> dict:
        """The :data:`COMMON_FIELDS` of this result."""
        return {name: getattr(self, name) for name in COMMON_FIELDS}

    @staticmethod
    def common_from_meta(meta: dict) -> dict:
        """Keyword arguments of the common fields from a store's meta."""
        return {
            "parameters": dict(meta.get("parameters") or {}),
            "model_identity": dict(meta.get("model_identity") or {}),
            "provenance": dict(meta.get("provenance") or {}),
            "timings": dict(meta.get("timings") or {}),
            "forward_passes": int(meta.get("forward_passes") or 0),
            "log": list(meta.get("log") or []),
        }

    # ---------------------------------------------------------------- I/O and viewer
    def save(self, path, overwrite: bool = False) -> Path:
        """Write to a zarr store at ``path`` atomically; see :func:`napari_pdcr.io.results.save`."""
        from napari_pdcr.io.results import save

        return save(self, path, overwrite=overwrite)

    @classmethod
    def load(cls, path) -> Explanation:
        """Load a saved result of any registered kind (of this class's kind when called on a subclass)."""
        from napari_pdcr.io.results import load

        return load(path, cls)

    def show(self, viewer, **options) -> list:
        """Add this result's layers to a napari ``viewer``; returns the new layers.

        See :func:`napari_pdcr._napari.viewer.show` for the options.
        """
        from napari_pdcr._napari.viewer import show

        return show(viewer, self, **options)
