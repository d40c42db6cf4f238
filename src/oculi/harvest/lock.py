"""One writer per store: an exclusive advisory lock held for the whole harvest.

::

    with StoreLock(root):           # refuses if another process holds it, naming pid and host
        ...                         # create or resume, compute, commit

The lock is ``fcntl.flock`` on ``oculi-harvest.lock`` inside the store, which holds the
holder's pid, host and start time for the refusal message. The kernel drops a flock when its
process dies, however it dies, so the lock of a killed harvest is stale by construction: the
next harvest takes it (the file still names the dead holder until then). The file is never
removed (removing a locked file lets two processes lock two different files), and it is
emptied when released. A second ``open`` of the file in the same process is refused too, so
two harvests in two threads cannot share a store either. NFSv4 and Lustre carry flock locks
across nodes; a file system without locks is an error, not a silent skip.
"""

from __future__ import annotations

import errno
import json
import os
import socket
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from oculi.harvest.folder import LOCK, HarvestStoreError


class HarvestLockedError(HarvestStoreError):
    """Another harvest holds the store's lock.

    ::

        oculi.harvest(adapter, prompts, sites=["resid_post"], layers=[6], out="acts")
        # HarvestLockedError while another process harvests into "acts" (the message names it)
    """


class StoreLock:
    """An exclusive lock on the store at ``root`` (a context manager; also ``acquire``/``release``).

    Attributes:
        path: the lock file.
        previous: what the lock file said when taken (a stale holder's pid and host), or None.
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.path = Path(root) / LOCK
        self.previous: dict[str, Any] | None = None
        self._fd: int | None = None

    def acquire(self) -> StoreLock:
        import fcntl

        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            raise HarvestStoreError(
                f"cannot open the lock file '{self.path}': {exc.strerror}"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(fd)
            os.close(fd)
            raise HarvestLockedError(
                f"'{self.path.parent}' is being written by another harvest ({_who(holder)}); "
                "one store takes one harvest at a time, resuming or not: wait for it to finish "
                "or stop it, or harvest into another folder"
            ) from None
        except OSError as exc:
            os.close(fd)
            unsupported = exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)
            why = "its file system does not support file locks (flock)" if unsupported else ""
            raise HarvestStoreError(
                f"cannot lock '{self.path}': {why or exc.strerror}; harvest into a folder on a "
                "file system with locks (local disks, NFSv4, Lustre)"
            ) from None
        self.previous = _read(fd) or None
        me = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        """Empty the lock file and drop the lock (idempotent)."""
        import fcntl

        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.ftruncate(fd, 0)
        except OSError:
            pass  # the lock is dropped below all the same; a stale name in the file is harmless
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> StoreLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read(fd: int) -> dict[str, Any]:
    try:
        data = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _who(holder: dict[str, Any]) -> str:
    if not holder.get("pid"):
        return "a process that has not written its name yet"
    return (
        f"pid {holder['pid']} on host {holder.get('host', '?')}, since {holder.get('since', '?')}"
    )
