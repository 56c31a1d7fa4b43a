"""Decoded media folders cached as memory-mapped uint8 / float arrays, decoded once.

Decoding 50,000 JPEGs takes most of a minute on two cores, and a run would repeat it at every
start. The arrays are written once under `<cache_dir>/<kind>/<key>/` and memory-mapped from
there afterwards, so a second run starts in seconds and reads only the pages it touches. The
key covers everything the arrays depend on: every file's path, size and modification time, and
the decoding parameters (image size, channels, sample rate, how bad files are handled). Change
any file, and the folder is decoded again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

Arrays = dict[str, np.ndarray]


def folder_key(kind: str, files: Sequence[Path], params: dict[str, Any]) -> str:
    """A digest of the files (path, size, mtime) and the parameters that shape the arrays."""
    h = hashlib.sha256(json.dumps([kind, params], sort_keys=True, default=str).encode())
    for f in files:
        st = os.stat(f)
        h.update(f"{os.path.abspath(f)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]


def cached_arrays(
    cache_dir: Path | None,
    kind: str,
    files: Sequence[Path],
    params: dict[str, Any],
    decode: Callable[[], tuple[Arrays, dict[str, Any]]],
    done: str = "decoded",
) -> tuple[Arrays, dict[str, Any]]:
    """`decode()` -> (arrays, plain-data meta), read back from the cache when it holds them.

    Arrays come back memory-mapped copy-on-write: writable for the caller, never written back;
    meta then has "cached": True. No cache_dir: decode every time. done: what `decode` does to
    the files, for the line that reports a cache hit ("decoded", "tokenized").
    """
    if cache_dir is None:
        return decode()
    entry = Path(cache_dir) / kind / folder_key(kind, files, params)
    hit = _read(entry)
    if hit is not None:
        n = f"{len(files)} file" + ("" if len(files) == 1 else "s")
        log.info(f"{kind}: {n} {done} earlier, memory-mapped from {entry}")
        return hit
    arrays, meta = decode()
    try:
        _write(entry, arrays, meta)
    except OSError as e:  # a full or read-only disk costs the cache, not the run
        log.warning(f"{kind}: could not cache the decoded files in {entry} ({e}); going on")
    return arrays, meta


def lookup(
    cache_dir: Path | None, kind: str, files: Sequence[Path], params: dict[str, Any]
) -> tuple[Arrays, dict[str, Any]] | None:
    """What `cached_arrays` would read back for these files and parameters; None: not cached."""
    if cache_dir is None:
        return None
    return _read(Path(cache_dir) / kind / folder_key(kind, files, params))


def _read(entry: Path) -> tuple[Arrays, dict[str, Any]] | None:
    try:
        meta = json.loads((entry / "meta.json").read_text())
        arrays = {n: np.load(entry / f"{n}.npy", mmap_mode="c") for n in meta["arrays"]}
    except (OSError, ValueError, KeyError):  # absent, or cut off: decode again
        return None
    return arrays, {**meta["meta"], "cached": True}


def _write(entry: Path, arrays: Arrays, meta: dict[str, Any]) -> None:
    """All files into a temporary folder, then one rename: a reader sees all or nothing."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=entry.parent))
    try:
        for name, a in arrays.items():
            np.save(tmp / f"{name}.npy", np.ascontiguousarray(a))
        (tmp / "meta.json").write_text(json.dumps({"arrays": list(arrays), "meta": meta}))
        os.replace(tmp, entry)
    except OSError:
        if entry.is_dir():  # another process wrote the same entry first: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
            return
        shutil.rmtree(tmp, ignore_errors=True)
        raise
