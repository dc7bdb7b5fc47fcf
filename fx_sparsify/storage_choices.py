"""Per-layer storage choices of ``squash(storage=...)`` as a JSON file, to reuse them (SPEC §18).

``storage="auto"`` times each layer on the machine it runs on; on a loaded machine the same layer can
come out sparse in one run and dense in the next. Record the choices once and reuse them::

    >>> small = sgm.squash(storage="auto", batch_size=1)                 # doctest: +SKIP
    >>> fxs.save_storage_choices(small.storage_choices, "choices.json")   # doctest: +SKIP
    >>> again = sgm.squash(storage=fxs.load_storage_choices("choices.json"))  # same layouts, no timing

The file holds, per layer, its name, shape, fraction of zeros, storage (``"dense"``, ``"csr"``,
``"bsr 16x16"``, ``"bitmask"``), the measured or modelled time ratio to dense (null where none was
taken) and why.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from .passes.sparse_storage import StorageChoice

__all__ = ["FORMAT", "load_storage_choices", "save_storage_choices"]

#: the format name written in the file
FORMAT = "fx_sparsify-storage-choices"
VERSION = 1


def save_storage_choices(choices: Iterable[StorageChoice], path: str | os.PathLike[str]) -> None:
    """Write ``choices`` (``small.storage_choices`` of a squash with ``storage=``) as JSON at ``path``
    (written to a temporary file beside it, then renamed: a failed write leaves no half file)."""
    rows = []
    for c in choices:
        if not isinstance(c, StorageChoice):
            raise TypeError(
                f"save_storage_choices(): expected the StorageChoice records of small.storage_choices, "
                f"got {type(c).__name__}"
            )
        rows.append(
            {
                "layer": c.layer,
                "shape": list(c.shape),
                "sparsity": c.sparsity,
                "storage": c.storage,
                "ratio": c.ratio,
                "why": c.why,
            }
        )
    path = Path(os.fspath(path))
    if not path.parent.is_dir():
        raise FileNotFoundError(f"save_storage_choices(): the folder {str(path.parent)!r} does not exist")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps({"format": FORMAT, "version": VERSION, "layers": rows}, indent=1) + "\n")
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _row(row: object) -> StorageChoice:
    """One layer entry as a StorageChoice; a ValueError saying which field is wrong."""
    if not isinstance(row, dict):
        raise ValueError(f"an object, got {type(row).__name__}")
    layer, shape, sparsity, storage = row.get("layer"), row.get("shape"), row.get("sparsity"), row.get("storage")
    ratio, why = row.get("ratio"), row.get("why", "")
    if not isinstance(layer, str) or not layer:
        raise ValueError(f"'layer' must be a layer name, got {layer!r:.60}")
    if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
        raise ValueError(f"'shape' must be a list of sizes >= 0, got {shape!r:.60}")
    if not isinstance(sparsity, (int, float)) or isinstance(sparsity, bool) or not 0.0 <= sparsity <= 1.0:  # and NaN
        raise ValueError(f"'sparsity' must be a fraction in [0, 1], got {sparsity!r:.60}")
    if not isinstance(storage, str):
        raise ValueError(f"'storage' must be a string such as 'dense' or 'bitmask', got {storage!r:.60}")
    if ratio is not None and not (_number(ratio) and ratio >= 0):  # NaN fails; Infinity (bitmask cannot pay) passes
        raise ValueError(f"'ratio' must be a number >= 0 or null (a time / dense), got {ratio!r:.60}")
    if not isinstance(why, str):
        raise ValueError(f"'why' must be a string, got {why!r:.60}")
    return StorageChoice(layer, tuple(shape), float(sparsity), storage, why, None if ratio is None else float(ratio))


def load_storage_choices(path: str | os.PathLike[str]) -> list[StorageChoice]:
    """The choices :func:`save_storage_choices` wrote, for ``squash(storage=...)``. A file that is not such a
    record (not JSON, another format, a malformed or repeated layer entry) is a ``ValueError`` naming the file and
    what is wrong."""
    path = Path(os.fspath(path))
    try:
        data = json.loads(path.read_bytes())
    except (ValueError, RecursionError) as err:  # JSON or UTF-8 decoding, an integer past Python's digit limit
        raise ValueError(f"{path}: not a storage choices file (not JSON: {str(err)[:200]})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(
            f'{path}: not a storage choices file (no "format": {FORMAT!r}); write one with '
            "fxs.save_storage_choices(small.storage_choices, path)"
        )
    if data.get("version") != VERSION:
        raise ValueError(f"{path}: storage choices version {data.get('version')!r}; this fx_sparsify reads {VERSION}")
    layers = data.get("layers", [])
    if not isinstance(layers, list):
        raise ValueError(f"{path}: 'layers' must be a list of layer entries, got {type(layers).__name__}")
    out: dict[str, StorageChoice] = {}
    for i, row in enumerate(layers):
        try:
            choice = _row(row)
        except ValueError as err:
            raise ValueError(
                f"{path}: layer entry {i} is malformed: {err}; each needs layer, shape, sparsity, storage"
            ) from None
        if choice.layer in out:
            raise ValueError(
                f"{path}: layer {choice.layer!r} has two entries (0-based {list(out).index(choice.layer)} "
                f"and {i}); a file records one storage per layer"
            )
        out[choice.layer] = choice
    return list(out.values())
