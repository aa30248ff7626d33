"""The base of every result: maps or values, parameters, provenance, one store format.

Every kind of explanation (region effects, component effects, and the methods that
come next) is an :class:`Explanation`: it carries the parameters of the run, the model's
identity (name, source, sha256), the provenance (versions, time, seed), timings, the
number of forward passes and a log; it summarises itself (:meth:`Explanation.summary`),
and it is saved and loaded through **one** zarr store format
(:mod:`napari_pdcr.io.results`), whose ``kind`` names the class that restores it
(:meth:`Explanation.load` works for every registered kind).

Showing a result in napari lives in the napari layer
(:mod:`napari_pdcr._napari.viewer`); :meth:`Explanation.add_to_viewer` reaches it lazily, so
importing the core never imports napari.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np

#: the fields every explanation stores besides its own (tests in :data:`COMMON_RULES`)
COMMON_FIELDS = ("parameters", "model_identity", "provenance", "timings", "forward_passes", "log")
EXTRAS, RELATED = "extras/", "related/"


@dataclass(kw_only=True)
class Explanation(ABC):
    """What every result holds besides its maps or values.

    Subclasses set :attr:`kind` (the store's ``kind``, which registers the class) and
    implement :meth:`arrays`, :meth:`meta`, :meth:`from_store`, :meth:`summary` and, for
    the store's checks on open, :meth:`check_store`.
    """

    parameters: dict = field(default_factory=dict)  #: every parameter of the method
    model_identity: dict = field(default_factory=dict)  #: name, source, sha256 of the model
    provenance: dict = field(default_factory=dict)  #: versions, creation time (UTC), seed
    timings: dict = field(default_factory=dict)  #: seconds per phase
    forward_passes: int = 0  #: images run through the model (each kind says what it counts)
    log: list[str] = field(default_factory=list)  #: notes of the run for the user
    extras: dict[str, np.ndarray] = field(default_factory=dict)  #: further arrays saved with the result
    #: other results saved with this one (e.g. the component effects of the same model and region)
    related: dict[str, Explanation] = field(default_factory=dict)

    #: the store ``kind`` of this class
    kind: ClassVar[str] = ""
    #: ``kind`` -> class, filled by subclassing
    registry: ClassVar[dict[str, type[Explanation]]] = {}

    def __init_subclass__(cls, **options):
        super().__init_subclass__(**options)
        if cls.__dict__.get("kind"):
            Explanation.registry[cls.kind] = cls

    # ---------------------------------------------------------------- the kind's own part
    @abstractmethod
    def arrays(self) -> dict[str, np.ndarray]:
        """The kind's own arrays, by name."""

    @abstractmethod
    def meta(self) -> dict:
        """The kind's own JSON fields (besides :data:`COMMON_FIELDS`)."""

    @classmethod
    @abstractmethod
    def from_store(cls, arrays: dict[str, np.ndarray], meta: dict, **common) -> Explanation:
        """Rebuild from the kind's own arrays and fields; ``common`` are the common fields."""

    @classmethod
    @abstractmethod
    def check_store(cls, path, arrays: dict[str, np.ndarray], meta: dict) -> None:
        """Raise :class:`~napari_pdcr.io.DamagedStoreError` unless the kind's arrays and fields agree."""

    @abstractmethod
    def summary(self) -> dict:
        """The result's summary figures, JSON-serialisable."""

    # ---------------------------------------------------------------- store contents
    def contents(self) -> tuple[dict[str, np.ndarray], dict]:
        """Everything saved: ``(arrays, fields)``, with the extras and the related results."""
        arrays = dict(self.arrays())
        arrays.update({EXTRAS + name: array for name, array in self.extras.items()})
        fields = {name: getattr(self, name) for name in COMMON_FIELDS}
        fields.update(self.meta(), summary=self.summary(), related={})
        for key, other in self.related.items():
            other_arrays, other_fields = other.contents()
            arrays.update({f"{RELATED}{key}/{name}": array for name, array in other_arrays.items()})
            fields["related"][key] = {"kind": other.kind, **other_fields}
        return arrays, fields

    @classmethod
    def check_contents(cls, path, arrays: dict[str, np.ndarray], fields: dict) -> None:
        """The store's checks on open: common fields, the kind's own, then each related result's."""
        from napari_pdcr.io.results import damaged, require_fields

        require_fields(path, fields, COMMON_RULES)
        own, related = _split(arrays)
        cls.check_store(path, own, fields)
        records = fields.get("related") or {}
        if not isinstance(records, dict):
            raise damaged(path, "the field 'related' is not a mapping")
        for key, record in records.items():
            other = Explanation.registry.get(record.get("kind") if isinstance(record, dict) else None)
            if other is None:
                raise damaged(path, f"the related result {key!r} is of no known kind")
            other.check_contents(path, related.get(key, {}), record)

    @classmethod
    def from_contents(cls, arrays: dict[str, np.ndarray], fields: dict) -> Explanation:
        """Rebuild from :meth:`contents` (checked by :meth:`check_contents`)."""
        own, related = _split(arrays)
        extras = {name[len(EXTRAS):]: a for name, a in own.items() if name.startswith(EXTRAS)}
        own = {name: a for name, a in own.items() if not name.startswith(EXTRAS)}
        common = {
            "parameters": dict(fields["parameters"]),
            "model_identity": dict(fields["model_identity"]),
            "provenance": dict(fields["provenance"]),
            "timings": dict(fields["timings"]),
            "forward_passes": int(fields["forward_passes"]),
            "log": list(fields["log"]),
            "extras": extras,
            "related": {
                key: Explanation.registry[record["kind"]].from_contents(related.get(key, {}), record)
                for key, record in (fields.get("related") or {}).items()
            },
        }
        return cls.from_store(own, fields, **common)

    # ---------------------------------------------------------------- I/O and viewer
    def save(self, path, overwrite: bool = True) -> Path:
        """Write to a result store (a ``.zarr`` folder) at ``path`` atomically; returns ``path``.

        A previous napari-pdcr result store at ``path`` is replaced unless ``overwrite`` is
        False; anything else there (a file, other folders, other zarr stores) is never
        touched: ``FileExistsError``. See :func:`napari_pdcr.io.results.write_store`.
        """
        from napari_pdcr.io.results import save_explanation

        return save_explanation(self, path, overwrite=overwrite)

    @classmethod
    def load(cls, path) -> Explanation:
        """Read a result store of any registered kind (of this class's kind on a subclass).

        Raises :class:`~napari_pdcr.io.DamagedStoreError` when the store is damaged.
        """
        from napari_pdcr.io.results import load_explanation

        return load_explanation(path, None if cls is Explanation else cls)

    def add_to_viewer(self, viewer, **options) -> list:
        """Add this result's layers to a napari ``viewer``; returns the new layers.

        See :func:`napari_pdcr._napari.viewer.add_to_viewer` for the options (e.g.
        ``source_layer``, the explained image layer, whose scale and translate are copied).
        """
        from napari_pdcr._napari.viewer import add_to_viewer

        return add_to_viewer(viewer, self, **options)


def _split(arrays: dict[str, np.ndarray]) -> tuple[dict, dict[str, dict]]:
    """``(own arrays, {related key: its arrays})`` of a store's arrays."""
    own, related = {}, {}
    for name, array in arrays.items():
        if name.startswith(RELATED):
            key, _, rest = name[len(RELATED):].partition("/")
            related.setdefault(key, {})[rest] = array
        else:
            own[name] = array
    return own, related


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_mapping(value) -> bool:
    return isinstance(value, dict)


#: name: (test, what it must be) for the common fields
COMMON_RULES = {
    "parameters": (_is_mapping, "a mapping"),
    "model_identity": (_is_mapping, "a mapping"),
    "provenance": (_is_mapping, "a mapping"),
    "timings": (_is_mapping, "a mapping"),
    "forward_passes": (lambda v: _is_int(v) and v >= 0, "a count"),
    "log": (lambda v: isinstance(v, list) and all(isinstance(line, str) for line in v), "a list of texts"),
}
