"""Secrets generated once into the data dir (the JWT secret, the encryption
key): created whole and 0600 or not at all, and the same for every process
that starts at once."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


def secret_file(path: Path, generate) -> bytes:
    """The contents of ``path``; created with ``generate()`` (bytes) when it
    does not exist. The secret is written to a private temporary file and
    linked into place, so no process ever reads a half-written or empty
    file, and when several start at once, the first link wins and every
    process uses that one."""
    path = Path(path)
    try:
        return path.read_bytes()
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # 0600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(generate())
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # atomic: fails if another process made it first
        except FileExistsError:
            pass
    finally:
        os.unlink(tmp)
    return path.read_bytes()
