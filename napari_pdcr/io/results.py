"""Result stores: zarr groups of arrays plus JSON provenance, saved safely and verified on open.

Every napari-pdcr result is one zarr v3 group (:func:`write_store`, :func:`read_store`)::

    <path>/      attrs: {"napari_pdcr": {"kind": "region_explanation", "format_version": 2,
                                         "arrays": {<name>: {"dtype", "shape", "sha256"}},
                                         "meta_sha256": ..., <the kind's own fields>}}
        <name>   one zarr array per entry of "arrays" ("extras/x" lies in group "extras")

Every kind of :class:`~napari_pdcr.explanations.Explanation` uses this one format
(:func:`save_explanation`, :func:`load_explanation`): its own arrays (e.g. a region
explanation's ``block_effects`` ... and masks; a component explanation's ``ate`` ...), its
``extras/<name>`` arrays, the arrays of related results under ``related/<key>/`` (e.g. the
component effects saved with a region explanation), and the fields ``parameters``,
``model_identity``, ``provenance``, ``timings``, ``forward_passes``, ``log``, ``summary``,
``related`` and the kind's own. The kind names the class that restores it.

Saving never destroys what napari-pdcr did not write: only a previous result store (or an
empty folder) is ever replaced, and the new store is complete before it takes the old one's
place (see :func:`atomic_directory_write`). Opening checks that the arrays are all there with
the recorded dtypes and shapes, that the fields have the right types and agree with the
arrays, and that every array and the fields match the sha256 recorded when they were saved;
any failure raises :class:`DamagedStoreError`. Stores of format 1 (before checksums) still
open, with the same checks except the checksums, and a warning.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import re
import reprlib
import shutil
import sys
import uuid
import warnings
from collections.abc import Callable, Collection, Mapping
from functools import cache
from pathlib import Path

import numpy as np
import zarr

#: 2: a sha256 of every array ("arrays") and of the fields ("meta_sha256")
FORMAT_VERSION = 2
STORE_KEY = "napari_pdcr"
_RESERVED = ("kind", "format_version", "arrays", "meta_sha256")
_DTYPES = {"bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
           "float16", "float32", "float64"}
#: the codecs napari-pdcr writes; nothing else is decoded
_CODECS = {"bytes", "zstd"}
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*(/[A-Za-z0-9_][A-Za-z0-9_.-]*)*")


class DamagedStoreError(ValueError):
    """A napari-pdcr result store whose arrays or fields are missing, altered or inconsistent."""


def damaged(path, problem: str) -> DamagedStoreError:
    """The error for the store at ``path`` with ``problem`` (a phrase saying what is wrong)."""
    return DamagedStoreError(
        f"this result store is damaged: {problem} ({path}); restore it from a backup or run the "
        "explanation again"
    )


def _jsonable(value):
    """Round-trip ``value`` through JSON (numpy scalars/arrays become plain numbers/lists)."""
    return json.loads(json.dumps(value, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


def _sha256(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).data).hexdigest()


def _sha256_json(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


# ---------------------------------------------------------------------------- replacing folders


@cache
def _renameat2():
    """Linux's ``renameat2`` from the C library, or None where there is none."""
    if not sys.platform.startswith("linux"):
        return None
    function = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if function is not None:
        function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return function


def _exchange(a: Path, b: Path) -> bool:
    """Swap folders ``a`` and ``b`` in one atomic step; False where the system or file system cannot."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    at_cwd, rename_exchange = -100, 2
    if renameat2(at_cwd, os.fsencode(a), at_cwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _sibling(path: Path, role: str) -> Path:
    """A hidden folder name beside ``path`` for a save's temporary (``tmp``) or backup (``old``)."""
    return path.with_name(f".{path.name}.{role}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _alive(pid: int) -> bool:
    if os.name != "posix":  # no harmless probe: treat every save as running
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _recover(path: Path) -> None:
    """Clear up after saves to ``path`` that were killed: put a backup whose store never came back
    at ``path``, and delete the other temporaries and backups of processes that no longer run."""
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(tmp|old)-(\d+)-[0-9a-f]{{8}}")
    if not path.parent.is_dir():
        return
    leftovers = [(entry, match) for entry in path.parent.iterdir() if (match := pattern.fullmatch(entry.name))]
    for entry, match in sorted(leftovers, key=lambda item: item[0].lstat().st_mtime, reverse=True):
        if _alive(int(match[2])):
            continue
        if match[1] == "old" and not os.path.lexists(path):
            os.replace(entry, path)  # the save died between its two renames
        else:
            shutil.rmtree(entry, ignore_errors=True)


def atomic_directory_write(path, write) -> Path:
    """Call ``write(tmp_path)`` on a hidden sibling folder, then move it to ``path``.

    A folder at ``path`` is replaced only after the new content is complete (the caller decides
    whether it may be). On Linux the two folders are swapped by one ``renameat2(RENAME_EXCHANGE)``,
    so ``path`` holds the old or the new content whenever the process dies. Where the system or
    file system cannot swap, the old folder is renamed to a backup first; a process killed
    between the two renames leaves ``path`` missing, and the next save or load puts the backup
    back. A killed save's temporary is deleted by the next save or load.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(path, "tmp")
    try:
        write(tmp)
        if not os.path.lexists(path):
            os.replace(tmp, path)
        elif not _exchange(tmp, path):  # swapped: tmp holds the old folder, deleted below
            backup = _sibling(path, "old")
            os.replace(path, backup)
            try:
                os.replace(tmp, path)
            except BaseException:
                os.replace(backup, path)  # put the old store back
                raise
            shutil.rmtree(backup, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _node_type(zarr_json: Path) -> str | None:
    try:
        return json.loads(zarr_json.read_text()).get("node_type")
    except (OSError, ValueError, AttributeError):
        return None


def _foreign_entries(root: Path) -> list[str]:
    """Entries under ``root`` that no zarr store holds (anything but metadata, nodes and chunks)."""
    foreign = []
    for folder, dirs, files in os.walk(root):
        here = Path(folder)
        node = _node_type(here / "zarr.json")
        if node == "array":
            foreign += [here / d for d in dirs if d != "c"] + [here / f for f in files if f != "zarr.json"]
            dirs.clear()  # below c/ lie the chunks
        elif node == "group":
            foreign += [here / f for f in files if f != "zarr.json"]
        else:
            foreign.append(here)
            dirs.clear()
    return sorted(str(entry.relative_to(root)) for entry in foreign)


def check_save_target(path, overwrite: bool = True) -> None:
    """Raise FileExistsError unless ``path`` is free, an empty folder or (with ``overwrite``) a
    previous result store holding nothing else (callers may check before a long run)."""
    path = Path(path)
    keep = "save to a new path (save() replaces only a previous napari-pdcr result store)"
    if path.is_symlink():
        raise FileExistsError(f"{path} is a symbolic link and was left untouched: {keep}")
    if not path.exists():
        return
    if not path.is_dir():
        raise FileExistsError(f"{path} is a file, not a napari-pdcr result store, and was left untouched: {keep}")
    if not any(path.iterdir()):
        return
    if store_kind(path) is None:
        what = "a zarr store that napari-pdcr did not write" if (path / "zarr.json").exists() else (
            "a folder that is not a napari-pdcr result store")
        raise FileExistsError(f"{path} is {what} and was left untouched: {keep}")
    foreign = _foreign_entries(path)
    if foreign:
        raise FileExistsError(
            f"{path} is a napari-pdcr result store that also holds other files "
            f"({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}) and was left untouched: "
            "move them out or save to a new path"
        )
    if not overwrite:
        raise FileExistsError(f"{path} already holds a napari-pdcr result: pass overwrite=True to replace it, "
                              "or save to a new path")


# ---------------------------------------------------------------------------- the generic store


def write_store(path, kind: str, arrays: Mapping[str, np.ndarray], meta: Mapping, overwrite: bool = True) -> Path:
    """Save ``arrays`` and the JSON fields ``meta`` as a result store of ``kind`` at ``path``.

    ``overwrite=True`` (the default) replaces a previous napari-pdcr result store at ``path``,
    as ``numpy.save`` or zarr's ``mode="w"`` would: a result is derived data, and re-running a
    script or the CLI should not fail on its own earlier output; ``overwrite=False`` refuses it,
    like xarray's ``mode="w-"``. Anything else at ``path`` - a file, a folder of other files, a
    zarr store napari-pdcr did not write, a result store with other files added, a symbolic
    link - is never touched, whatever ``overwrite`` says: ``FileExistsError``. An empty folder
    counts as free. Array names are ``/``-separated (groups); dtypes are boolean or numeric.
    """
    path = Path(path)
    checked = {}
    for name, array in arrays.items():
        array = np.asarray(array)
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ValueError(f"array name {name!r} cannot be saved in a result store: use letters, digits, "
                             "'_', '-' and '.' (groups separated by '/')")
        if array.dtype.name not in _DTYPES:
            raise ValueError(f"array {name!r} has dtype {array.dtype}, and a result store holds boolean or "
                             "numeric arrays only: convert it first (e.g. numpy.asarray(x, dtype=float))")
        checked[name] = array.astype(array.dtype.newbyteorder("="), copy=False)
    reserved = [key for key in _RESERVED if key in meta]
    if reserved:
        raise ValueError(f"field {reserved[0]!r} is the store's own: give the {kind} field another name")
    meta = _jsonable(dict(meta))
    record = {
        "kind": kind,
        "format_version": FORMAT_VERSION,
        "arrays": {name: {"dtype": a.dtype.name, "shape": list(a.shape), "sha256": _sha256(a)}
                   for name, a in checked.items()},
        "meta_sha256": _sha256_json(meta),
        **meta,
    }
    _recover(path)
    check_save_target(path, overwrite)

    def write(tmp: Path):
        root = zarr.open_group(str(tmp), mode="w-", zarr_format=3)
        for name, array in checked.items():
            # every chunk is written (also all-zero ones), so a missing chunk file is damage
            root.create_array(name, data=array, compressors=zarr.codecs.ZstdCodec(),
                              config={"write_empty_chunks": True})
        root.attrs[STORE_KEY] = record

    return atomic_directory_write(path, write)


def store_kind(path) -> str | None:
    """The kind of napari-pdcr result stored at ``path``, or None when ``path`` holds none."""
    try:
        kind = json.loads((Path(path) / "zarr.json").read_text())["attributes"][STORE_KEY]["kind"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return kind if isinstance(kind, str) else None


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _manifest(path: Path, root, record: dict, version: int) -> dict:
    """``{name: {"dtype", "shape"[, "sha256"]}}`` of the arrays the store must hold."""
    if version == 1:  # no record: the arrays there are the arrays
        try:
            members = root.members(max_depth=None)
        except Exception as error:  # noqa: BLE001 - zarr's many errors for unreadable metadata
            raise damaged(path, f"its arrays cannot be listed ({error})") from None
        return {name: {"dtype": a.metadata.to_dict().get("data_type"), "shape": list(a.shape)}
                for name, a in members if isinstance(a, zarr.Array)}
    manifest = record.get("arrays")
    entries_ok = isinstance(manifest, dict) and all(
        isinstance(name, str) and _NAME.fullmatch(name) and isinstance(entry, dict)
        and entry.get("dtype") in _DTYPES and isinstance(entry.get("sha256"), str)
        and isinstance(entry.get("shape"), list) and all(_is_int(n) and n >= 0 for n in entry["shape"])
        for name, entry in manifest.items()
    )
    if not entries_ok:
        raise damaged(path, "the record of its arrays ('arrays') is missing or malformed")
    return manifest


def _read_array(path: Path, root, name: str, entry: dict) -> np.ndarray:
    """The array ``name`` after checking it against its ``entry`` of the manifest."""
    try:
        array = root[name]
    except KeyError:
        raise damaged(path, f"array '{name}' is missing") from None
    except Exception as error:  # noqa: BLE001 - zarr's many errors for unreadable metadata
        raise damaged(path, f"array '{name}' has unreadable metadata ({error})") from None
    if not isinstance(array, zarr.Array):
        raise damaged(path, f"'{name}' is a group, not an array")
    described = array.metadata.to_dict()
    if described.get("data_type") not in _DTYPES:
        raise damaged(path, f"array '{name}' has data type {described.get('data_type')!r}, not a boolean or numeric one")
    if described.get("data_type") != entry["dtype"]:
        raise damaged(path, f"array '{name}' is {described.get('data_type')}, not the {entry['dtype']} it was saved as")
    if list(array.shape) != entry["shape"]:
        raise damaged(path, f"array '{name}' has shape {list(array.shape)}, not the {entry['shape']} it was saved with")
    for codec in described.get("codecs", []):
        if codec.get("name") not in _CODECS:
            raise damaged(path, f"array '{name}' uses codec {codec.get('name')!r}, which napari-pdcr never writes")
    if "sha256" in entry and array.nchunks_initialized < array.nchunks:
        missing = array.nchunks - array.nchunks_initialized
        raise damaged(path, f"array '{name}' is missing {missing} of its {array.nchunks} chunks")
    try:
        data = np.asarray(array[...])
    except Exception as error:  # noqa: BLE001 - whatever the codecs raise for corrupt bytes
        raise damaged(path, f"array '{name}' cannot be read ({str(error).splitlines()[0]})") from None
    if "sha256" in entry and _sha256(data) != entry["sha256"]:
        raise damaged(path, f"array '{name}' does not match the checksum recorded when it was saved "
                            "(its bytes were altered)")
    return data


def read_store(
    path,
    kinds: Collection[str] | None = None,
    check: Callable[[Path, str, dict, dict], None] | None = None,
) -> tuple[str, dict[str, np.ndarray], dict]:
    """Open the result store at ``path``: ``(kind, arrays, meta)`` as given to :func:`write_store`.

    ``kinds``: the kinds accepted (None: any). ``check(path, kind, arrays, meta)`` checks the
    kind's own arrays and fields (raising :func:`damaged`) before the fields' checksum is
    verified, so that it names the specific problem. Raises ``ValueError`` when ``path`` holds
    no result of ``kinds``, :class:`DamagedStoreError` when the store is damaged.
    """
    path = Path(path)
    _recover(path)
    kind = store_kind(path)
    if kind is None:
        raise ValueError(f"{path} is not a napari-pdcr explanation store (no zarr.json with napari-pdcr "
                         "attributes): open a folder written by save()")
    if kinds is not None and kind not in kinds:
        raise ValueError(f"{path} holds a napari-pdcr {kind!r} result, not {' or '.join(map(repr, kinds))}: "
                         "open it with the loader of its kind")
    try:
        root = zarr.open_group(str(path), mode="r", zarr_format=3)
        record = dict(root.attrs[STORE_KEY])
    except Exception as error:  # noqa: BLE001 - zarr's many errors for unreadable metadata
        raise damaged(path, f"its root metadata cannot be read ({error})") from None
    version = record.get("format_version")
    if not _is_int(version) or version < 1:
        raise damaged(path, f"'format_version' is {reprlib.repr(version)}, not a positive integer")
    if version > FORMAT_VERSION:
        raise ValueError(f"{path} was written by a newer napari-pdcr (format {version}): update napari-pdcr to open it")
    manifest = _manifest(path, root, record, version)
    arrays = {name: _read_array(path, root, name, entry) for name, entry in manifest.items()}
    meta = {key: value for key, value in record.items() if key not in _RESERVED}
    if check is not None:
        check(path, kind, arrays, meta)
    if version == 1:
        warnings.warn(f"{path} was saved by an older napari-pdcr without checksums, so a missing or altered "
                      "chunk cannot be detected: save it again to add them", UserWarning, stacklevel=3)
    elif record.get("meta_sha256") != _sha256_json(meta):
        raise damaged(path, "its fields (parameters, provenance, ...) do not match the checksum recorded "
                            "when they were saved (they were edited)")
    return kind, arrays, meta


def require_arrays(path, arrays: dict, dtypes: Mapping[str, type], optional: Collection[str] = ()) -> None:
    """Raise :func:`damaged` unless ``arrays`` holds each of ``dtypes`` (those in ``optional`` may be
    absent) with exactly that dtype."""
    for name, dtype in dtypes.items():
        if name not in arrays:
            if name in optional:
                continue
            raise damaged(path, f"array '{name}' is missing")
        if arrays[name].dtype != dtype:
            raise damaged(path, f"array '{name}' is {arrays[name].dtype}, not {np.dtype(dtype)}")


def require_fields(path, meta: dict, rules: Mapping[str, tuple[Callable[[object], bool], str]]) -> None:
    """Raise :func:`damaged` unless each field of ``rules`` (name: (test, description)) is in
    ``meta`` and passes its test."""
    for name, (test, description) in rules.items():
        if name not in meta:
            raise damaged(path, f"the field '{name}' is missing")
        if not test(meta[name]):
            raise damaged(path, f"the field '{name}' is {reprlib.repr(meta[name])}, not {description}")


# ---------------------------------------------------------------------------- field tests
def is_number(value) -> bool:
    """A JSON number (not a bool)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def positive_list(test):
    """A test: a non-empty list whose items pass ``test`` and are > 0."""
    return lambda value: isinstance(value, list) and len(value) > 0 and all(test(v) and v > 0 for v in value)


# ---------------------------------------------------------------------------- explanations
def save_explanation(explanation, path, overwrite: bool = True) -> Path:
    """Save any :class:`~napari_pdcr.explanations.Explanation` to a result store at ``path``.

    ``overwrite``: see :func:`write_store` (a previous result store is replaced unless it is
    False; anything else at ``path`` is never touched).
    """
    arrays, fields = explanation.contents()
    return write_store(path, explanation.kind, arrays, fields, overwrite=overwrite)


def is_explanation_store(path) -> bool:
    """True when ``path`` is a result store of a known kind (intact or not)."""
    from napari_pdcr.explanations import Explanation

    return store_kind(path) in Explanation.registry


def load_explanation(path, expected: type | None = None):
    """Load the :class:`~napari_pdcr.explanations.Explanation` saved at ``path``, of whatever kind.

    ``expected``: a class the result must be an instance of (None: any kind). Raises
    :class:`DamagedStoreError` when the store is damaged (see :func:`read_store`).
    """
    from napari_pdcr.explanations import Explanation

    _recover(Path(path))  # a save killed between its two renames left the store in its backup
    kind = store_kind(path)
    known = Explanation.registry.get(kind) if kind is not None else None
    if known is not None and expected is not None and not issubclass(known, expected):
        raise ValueError(f"{path} holds a napari-pdcr {kind!r} result, not {expected.kind!r}: "
                         f"open it with {known.__name__}.load (or Explanation.load for any kind)")
    kinds = tuple(Explanation.registry) if known is None else (kind,)
    _, arrays, fields = read_store(path, kinds=kinds, check=lambda p, k, a, f: known.check_contents(p, a, f))
    return known.from_contents(arrays, fields)
