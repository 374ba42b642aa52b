"""Atomic, durable writes of files and folders, and strict JSON.

Every file a run leaves behind (vocabularies, checkpoints, model folders, results, exports) goes through here, so a
reader never sees a half-written file: data is written to a temporary sibling, synced, then renamed into place in one
step. Files get the mode the process umask gives (as `open` would), so a shared model folder stays group-readable
even where a library wrote a private temporary file.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Union


PathLike = Union[str, os.PathLike]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_path(path: Path) -> None:
    """Flush a file, or a folder's entries, to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _settle_tree(folder: Path) -> None:
    """Give every file and folder below `folder` the umask's mode and sync it, deepest first."""
    mask = _umask()
    for root, dirs, files in os.walk(folder, topdown=False):
        for name in files:
            path = Path(root) / name
            os.chmod(path, 0o666 & ~mask)
            _fsync_path(path)
        for name in dirs:
            os.chmod(Path(root) / name, 0o777 & ~mask)
        _fsync_path(Path(root))
    os.chmod(folder, 0o777 & ~mask)


def atomic_write(path: PathLike, write: Callable[[str], Any]) -> Path:
    """
    Run `write(tmp_path)` on a temporary sibling of `path`, sync it, then rename it into place. A crash leaves the
    previous file (or none), never a truncated one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}-{uuid.uuid4().hex[:8]}")
    try:
        write(str(tmp))
        os.chmod(tmp, 0o666 & ~_umask())
        _fsync_path(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_path(path.parent)
    return path


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def atomic_write_text(path: PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def json_safe(value: Any) -> Any:
    """`value` with every non-finite float replaced by `None`: JSON has no NaN or infinity, and strict readers reject them."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value


def to_json(value: Any, **kwargs: Any) -> str:
    """Strict JSON text: non-finite floats become `null` instead of the bare `NaN` tokens of `json.dumps`."""
    return json.dumps(json_safe(value), allow_nan=False, **kwargs)


def atomic_write_json(path: PathLike, value: Any, *, indent: int | None = 2) -> Path:
    return atomic_write_text(path, to_json(value, indent=indent, ensure_ascii=False))


def read_json(path: PathLike) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


@contextmanager
def atomic_folder(final: PathLike) -> Iterator[Path]:
    """
    Yield a temporary folder to write into; on success every file is synced and given the umask's mode, and the
    folder replaces `final` by renames, so a run killed while saving leaves either the previous folder or the new one.
    On an exception the temporary folder is removed and `final` is left as it was.
    """
    final = Path(final)
    tmp = final.with_name(f".tmp-{final.name}")
    old = final.with_name(f".old-{final.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        _settle_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_path(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def settle_folder(folder: PathLike) -> None:
    """Sync every file below `folder` and give it the umask's mode (for folders a library wrote, e.g. checkpoints)."""
    _settle_tree(Path(folder))


__all__ = [
    "atomic_folder",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "json_safe",
    "read_json",
    "settle_folder",
    "to_json",
]
