"""Atomic file writes: a temp file beside the target, then a rename, so a crash never leaves a
half-written file under the final name. Imports neither torch nor OpenCV (the runtime and the
TensorRT code use it)."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


def current_umask() -> int:
    """The process umask (reading it means setting it, so it is set straight back)."""
    umask = os.umask(0)
    os.umask(umask)
    return umask


@contextmanager
def atomic_file(path: Path, durable: bool = False) -> Iterator[IO[bytes]]:
    """A binary file to write `path` through; renamed into place only if the block succeeds.

    The file gets the permissions an ordinary ``open`` would give it (mkstemp makes it
    private). ``durable`` flushes it to disk before the rename (checkpoints: worth the fsync).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as f:
            yield f
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write(path: Path, data: bytes | str) -> None:
    """Write `data` (str as UTF-8) to `path` through a temp file in the same directory."""
    with atomic_file(path) as f:
        f.write(data.encode() if isinstance(data, str) else data)


def atomic_write_json(path: Path, obj: Any) -> None:
    """`obj` as indented JSON, written atomically."""
    atomic_write(path, json.dumps(obj, indent=2) + "\n")
