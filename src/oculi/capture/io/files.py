"""Paths as users give them, and atomic writes that follow the umask.

A path may be a ``str`` or ``os.PathLike`` and may start with ``~``; errors name it as given
(with the expanded form beside it when ``~`` was expanded), never a temporary file. A file is
written whole to a temporary file in the target's own folder and then renamed over the target,
so a reader never sees half a file and a failed save leaves nothing behind. oculi does not
create folders: a missing folder is an error naming it.
"""

from __future__ import annotations

import os
import secrets
import stat
from collections.abc import Callable
from pathlib import Path

from oculi.errors import FileWriteError, OutputExistsError


def user_path(path: str | os.PathLike) -> tuple[Path, str]:
    """``(the path to open, the path as the user gave it, for messages)``; ``~`` expanded."""
    given = os.fsdecode(os.fspath(path))
    real = Path(given).expanduser()
    shown = f"'{given}'" + (f" ({real})" if given.startswith("~") else "")
    return real, shown


def write_atomically(
    path: str | os.PathLike, write: Callable[[Path], None], *, overwrite: bool, what: str
) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then move it to ``path``.

    The file gets the mode a new file gets from ``open`` (``0o666`` less the umask), whatever
    the writer does with the temporary file.

    Raises:
        FileWriteError: the folder is missing, not a folder or not writable, ``path`` is a
            folder, or the system refuses the write (disk full...); the message names ``path``.
        OutputExistsError: ``path`` exists and ``overwrite`` is false.
    """
    real, shown = user_path(path)
    prefix = f"cannot save {what} to {shown}"
    folder = real.parent
    if real.is_dir():
        raise FileWriteError(f"{prefix}: it is a folder; give a file name inside it")
    if not folder.exists():
        raise FileWriteError(
            f"{prefix}: the folder '{folder}' does not exist (oculi does not create folders; "
            "make it first, e.g. os.makedirs(folder, exist_ok=True))"
        )
    if not folder.is_dir():
        raise FileWriteError(f"{prefix}: '{folder}' is a file, not a folder")
    if not overwrite and real.exists():
        raise OutputExistsError(_exists(prefix))
    tmp = folder / f".{real.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp"
    try:
        # Created by us with 0o666: the system applies the umask (and any default ACL), which
        # gives the mode every new file in this folder gets; writers that replace the file
        # (safetensors writes 0600) get it back below.
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    except PermissionError:
        raise FileWriteError(f"{prefix}: the folder '{folder}' is not writable") from None
    except OSError as exc:
        raise FileWriteError(f"{prefix}: {exc.strerror or exc}") from None
    try:
        mode = stat.S_IMODE(os.stat(tmp).st_mode)
        write(tmp)
        os.chmod(tmp, mode)
        _place(tmp, real, overwrite=overwrite, prefix=prefix)
    except OSError as exc:
        if isinstance(exc, FileWriteError):
            raise
        raise FileWriteError(f"{prefix}: {exc.strerror or exc}") from exc
    finally:
        tmp.unlink(missing_ok=True)


def _place(tmp: Path, real: Path, *, overwrite: bool, prefix: str) -> None:
    if overwrite:
        os.replace(tmp, real)
        return
    try:
        os.link(tmp, real)  # fails if real exists, atomically: no other writer slips in
    except FileExistsError:
        raise OutputExistsError(_exists(prefix)) from None
    except OSError:  # a file system without hard links
        if real.exists():
            raise OutputExistsError(_exists(prefix)) from None
        os.replace(tmp, real)


def _exists(prefix: str) -> str:
    return f"{prefix}: the file exists and overwrite=False; pass overwrite=True to replace it"
