"""Paths as users give them, and atomic writes that follow the umask.

A path may be a ``str`` or ``os.PathLike`` and may start with ``~``; errors name it as given
(with the expanded form beside it when ``~`` was expanded), never a temporary file. A file is
written whole to a temporary file in the target's own folder, flushed to disk (``fsync``), and
renamed over the target; the folder is then flushed too, where the system allows it. A reader
never sees half a file, a full disk or a file-size limit leaves the previous file intact, and a
failed save leaves no temporary file behind. oculi does not create folders: a missing folder is
an error naming it.

Every file oculi writes goes through :func:`write_atomically` (or :func:`write_text`, its form
for text); ``tests/test_writes.py`` checks that no other raw write exists in ``src/``.
"""

from __future__ import annotations

import os
import secrets
import stat
from collections.abc import Callable
from pathlib import Path

from oculi.errors import FileWriteError, OculiError, OutputExistsError


def user_path(path: str | os.PathLike) -> tuple[Path, str]:
    """``(the path to open, the path as the user gave it, for messages)``; ``~`` expanded."""
    given = os.fsdecode(os.fspath(path))
    real = Path(given).expanduser()
    shown = f"'{given}'" + (f" ({real})" if given.startswith("~") else "")
    return real, shown


def write_atomically(
    path: str | os.PathLike, write: Callable[[Path], object], *, overwrite: bool, what: str
) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then move it to ``path``.

    Example::

        write_atomically("out.pt", lambda tmp: torch.save(obj, tmp), overwrite=True,
                         what="records")

    ``write`` must write the whole file to the path it is given (a library's ``save(path)``
    call is fine); the file is then ``fsync``-ed, renamed over ``path`` and the folder
    ``fsync``-ed. It gets the mode a new file gets from ``open`` (``0o666`` less the umask),
    whatever the writer does with the temporary file. Returns ``path`` with ``~`` expanded.

    Raises:
        FileWriteError: the folder is missing, not a folder or not writable, ``path`` is a
            folder, or the write fails (disk full, file-size limit, or any error the writer
            raises while writing: a library's own error is kept as the cause); the message
            names ``path`` and the previous file, if any, is left as it was.
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
        try:
            write(tmp)
        except (OculiError, MemoryError):
            raise
        except Exception as exc:  # a library's serialiser failing on the write (torch: a
            # RuntimeError, safetensors: SafetensorError): the file was not written
            raise _failed(prefix, _reason(exc, tmp)) from exc
        os.chmod(tmp, mode)
        fsync_file(tmp)
        _place(tmp, real, overwrite=overwrite, prefix=prefix)
        fsync_folder(folder)
    except OSError as exc:
        if isinstance(exc, FileWriteError):
            raise
        raise _failed(prefix, _reason(exc, tmp)) from exc
    finally:
        tmp.unlink(missing_ok=True)
    return real


def _failed(prefix: str, reason: str) -> FileWriteError:
    err = FileWriteError(f"{prefix}: {reason}")
    err.reason = reason  # for callers that name another path (a run folder, a cache)
    return err


def write_text(path: str | os.PathLike, text: str, *, what: str, overwrite: bool = True) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; see :func:`write_atomically`."""
    data = text.encode("utf-8")
    return write_atomically(path, lambda tmp: tmp.write_bytes(data), overwrite=overwrite, what=what)


def fsync_file(path: Path) -> None:
    """Flush ``path``'s content to the disk (before it is renamed into place)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_folder(folder: Path) -> None:
    """Flush ``folder``'s entries (a rename inside it) to the disk, where the system allows
    opening a folder (not on Windows); a refusal is ignored: the rename itself is atomic."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """``fsync`` every file and folder under ``folder`` (before the folder is renamed into
    place, as a run folder or a model cache is)."""
    for path in sorted(folder.rglob("*")):
        if path.is_file() and not path.is_symlink():
            fsync_file(path)
    for sub in sorted((p for p in folder.rglob("*") if p.is_dir()), reverse=True):
        fsync_folder(sub)
    fsync_folder(folder)


def _reason(exc: BaseException, tmp: Path) -> str:
    """Why a write failed, in words: the errno's text when there is one (also when a library
    wrapped it in its own error); else a full disk or the file-size limit when either is what
    stopped it (torch reports those as "unexpected pos"); else the library's message."""
    for err in (exc, exc.__cause__, exc.__context__):
        if isinstance(err, OSError) and err.strerror:
            return err.strerror
    try:
        free = os.statvfs(tmp.parent).f_bavail if hasattr(os, "statvfs") else None
        size = tmp.stat().st_size if tmp.exists() else 0
    except OSError:
        free, size = None, 0
    if free == 0:
        return "No space left on device"
    try:
        import resource

        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        if limit != resource.RLIM_INFINITY and 2 * size >= limit:
            return f"File too large (the file-size limit, ulimit -f, is {limit} bytes)"
    except (ImportError, OSError, ValueError):
        pass
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"the write failed ({type(exc).__name__}: {text[:200]})"


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
