"""Write outputs safely: checked before any work, built under a temporary name, renamed into place.

What lowbit promises about an output path ``OUT``:

- it is checked before the slow work starts (:func:`check_output`): its parent can be
  created and written, the disk has room for the estimated size, and an existing ``OUT``
  is replaced only with ``overwrite`` *and* only when lowbit wrote it (its ``config.json``
  holds a lowbit manifest) *and* it is not (and does not hold) the model being read;
- a directory is written as ``.OUT.partial-PID`` beside ``OUT`` and renamed into place
  when complete (:func:`atomic_directory`); an existing ``OUT`` is first renamed to
  ``.OUT.old-PID`` and deleted only once the new one is in place; if that last rename
  fails, the old output is put back;
- leftovers of a run that was killed (``.OUT.partial-PID`` and ``.OUT.old-PID`` of a process
  that no longer exists) are cleaned up by the next run on the same output, with a warning:
  a partial directory is deleted, an old output whose replacement never arrived is put back;
- a single file (a JSON report) is checked the same way (:func:`check_file_output`) and
  written through a temporary file (:func:`write_text_atomically`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

from lowbit.errors import LowbitError

#: room kept free beyond an output's estimated size (tokenizer files, filesystem overhead)
SPACE_MARGIN_BYTES = 64 * 2**20


def is_lowbit_output(path: Path) -> bool:
    """Whether ``path`` is a directory lowbit wrote: its config.json holds a lowbit manifest
    (native checkpoints) or the ``lowbit_export`` record every other exporter adds."""
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(config, dict):
        return False
    if isinstance(config.get("lowbit_export"), dict):
        return True
    quantization = config.get("quantization_config")
    return isinstance(quantization, dict) and quantization.get("quant_method") == "lowbit"


def _existing_ancestor(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path(path.anchor)


def _check_parent(path: Path, needed_bytes: int | None) -> None:
    """The directory ``path`` goes in can be created and written, with room for ``needed_bytes``."""
    ancestor = _existing_ancestor(path.parent)
    if not ancestor.is_dir():
        raise LowbitError(f"cannot write {path}: {ancestor} is a file, not a directory")
    try:  # a real probe: permissions, read-only filesystems and root's exemptions all count
        tempfile.TemporaryFile(dir=ancestor).close()
    except OSError as error:
        raise LowbitError(f"cannot write {path}: {ancestor} is not writable ({error.strerror}); choose another output") from None
    if needed_bytes is not None:
        free = shutil.disk_usage(ancestor).free
        if needed_bytes + SPACE_MARGIN_BYTES > free:
            raise LowbitError(
                f"not enough disk space for {path}: it needs about {needed_bytes / 1e6:,.1f} MB and "
                f"{ancestor} has {free / 1e6:,.1f} MB free; free some space or choose another output"
            )


def _resolved(path: str | os.PathLike) -> Path:
    return Path(os.path.abspath(Path(path).expanduser()))


def check_output(
    path: str | os.PathLike, overwrite: bool, *, inputs: Iterable[str | os.PathLike | None] = (), needed_bytes: int | None = None
) -> Path:
    """Refuse an output directory lowbit must not write, before any work; return it as an absolute path.

    ``inputs``: the paths being read (never replaced, never inside what is replaced);
    ``needed_bytes``: the estimated size of what will be written.
    """
    path = _resolved(path)
    if path == Path(path.anchor):
        raise LowbitError(f"refusing to write a model over the root directory {path}")
    recover_leftovers(path)
    for source in inputs:
        if source is None:
            continue
        source = Path(os.path.realpath(Path(source).expanduser()))
        real = Path(os.path.realpath(path))
        if source == real or real in source.parents:
            raise LowbitError(f"the output {path} is (or holds) the model being read, {source}; choose another output")
    if path.exists() or path.is_symlink():
        if not overwrite:
            raise LowbitError(f"{path} already exists; choose another output or pass --overwrite (overwrite=True)")
        if not path.is_dir():
            raise LowbitError(f"{path} exists and is not a directory; refusing to replace it")
        if not is_lowbit_output(path):
            raise LowbitError(
                f"{path} was not written by lowbit (its config.json holds no lowbit manifest); --overwrite only "
                "replaces lowbit's own outputs: remove it yourself or choose another output"
            )
    _check_parent(path, needed_bytes)
    return path


def _leftover_pattern(name: str) -> re.Pattern:
    return re.compile(rf"^\.{re.escape(name)}\.(partial|old)-(\d+)$")


def _is_running(pid: int) -> bool:
    if pid == os.getpid():
        return True  # this very run's (an earlier failed call cleaned its own up)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover_leftovers(path: Path) -> list[str]:
    """Clean up what interrupted runs left beside ``path``; returns what was done (also warned).

    ``.NAME.partial-PID`` of a dead process is deleted; ``.NAME.old-PID`` is put back as
    ``NAME`` when ``NAME`` is missing (the run died between its two renames), else deleted.
    Leftovers of a process that is still running are left alone.
    """
    pattern = _leftover_pattern(path.name)
    done = []
    try:
        entries = sorted(path.parent.iterdir()) if path.parent.is_dir() else []
    except OSError:
        return done
    for entry in entries:
        match = pattern.match(entry.name)
        if not match or _is_running(int(match.group(2))):
            continue
        if match.group(1) == "old" and not path.exists() and not path.is_symlink() and is_lowbit_output(entry):
            entry.rename(path)
            done.append(f"restored {path} from {entry.name}, left by an interrupted run")
        else:
            _remove(entry)
            done.append(f"removed {entry}, left by an interrupted run")
    for message in done:
        warnings.warn(message, stacklevel=3)
    return done


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def atomic_directory(
    path: str | os.PathLike,
    overwrite: bool = False,
    *,
    inputs: Iterable[str | os.PathLike | None] = (),
    needed_bytes: int | None = None,
) -> Iterator[Path]:
    """Yield a temporary directory beside ``path``; on success it becomes ``path``.

    The output is checked first (:func:`check_output`) and again just before the rename (a
    directory that appeared meanwhile is replaced only if ``overwrite`` allows it).
    """
    inputs = list(inputs)
    path = check_output(path, overwrite, inputs=inputs, needed_bytes=needed_bytes)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise LowbitError(f"cannot create {path.parent}: {error.strerror}") from None
    temporary = path.parent / f".{path.name}.partial-{os.getpid()}"
    _remove(temporary)
    temporary.mkdir()
    try:
        yield temporary
        check_output(path, overwrite, inputs=inputs)
        _replace(temporary, path)
    except BaseException:
        _remove(temporary)
        raise


def _replace(temporary: Path, path: Path) -> None:
    """Rename ``temporary`` to ``path``; an existing ``path`` is kept aside until that worked."""
    if not (path.exists() or path.is_symlink()):
        temporary.rename(path)
        return
    old = path.parent / f".{path.name}.old-{os.getpid()}"
    _remove(old)
    path.rename(old)
    try:
        temporary.rename(path)
    except BaseException:
        old.rename(path)
        raise
    _remove(old)


def check_file_output(path: str | os.PathLike) -> Path:
    """Refuse a report file that cannot be written (a directory, an unwritable place), before any work."""
    path = _resolved(path)
    if path.is_dir():
        raise LowbitError(f"cannot write {path}: it is a directory; give a file name")
    _check_parent(path, None)
    return path


def write_text_atomically(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file beside it, renamed into place."""
    path = check_file_output(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.parent / f".{path.name}.partial-{os.getpid()}"
    try:
        temporary.write_text(text)
        temporary.replace(path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path
