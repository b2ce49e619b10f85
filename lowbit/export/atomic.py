"""Write a directory atomically: build it under a temporary name, rename it into place.

An interrupted save (Ctrl-C, a full disk, a crash) leaves the temporary directory behind at
worst, never a half-written model under the name the user asked for; an existing output is
replaced only after the new one is complete, and only with ``overwrite``.
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from lowbit.errors import LowbitError


def check_output(path: Path, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise LowbitError(f"{path} already exists; choose another output or pass --overwrite (overwrite=True)")
    if path.exists() and not path.is_dir():
        raise LowbitError(f"{path} exists and is not a directory; refusing to replace it")


@contextmanager
def atomic_directory(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside ``path``; on success it becomes ``path``."""
    path = Path(path)
    check_output(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.parent / f".{path.name}.partial-{os.getpid()}"
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir()
    try:
        yield temporary
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    if path.exists():
        old = path.parent / f".{path.name}.old-{os.getpid()}"
        path.rename(old)
        temporary.rename(path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        temporary.rename(path)
