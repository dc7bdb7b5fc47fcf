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


def load_storage_choices(path: str | os.PathLike[str]) -> list[StorageChoice]:
    """The choices :func:`save_storage_choices` wrote, for ``squash(storage=...)``. A file that is not such a
    record is a ``ValueError`` naming what is wrong."""
    path = Path(os.fspath(path))
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not a storage choices file (not JSON: {err})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(
            f'{path}: not a storage choices file (no "format": {FORMAT!r}); write one with '
            "fxs.save_storage_choices(small.storage_choices, path)"
        )
    if data.get("version") != VERSION:
        raise ValueError(f"{path}: storage choices version {data.get('version')!r}; this fx_sparsify reads {VERSION}")
    out = []
    for i, row in enumerate(data.get("layers", [])):
        try:
            ratio = row.get("ratio")
            out.append(
                StorageChoice(
                    str(row["layer"]),
                    tuple(int(s) for s in row["shape"]),
                    float(row["sparsity"]),
                    str(row["storage"]),
                    str(row.get("why", "")),
                    None if ratio is None else float(ratio),
                )
            )
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise ValueError(
                f"{path}: layer entry {i} is malformed ({err!r}): each needs layer, shape, sparsity, storage"
            ) from None
    return out
