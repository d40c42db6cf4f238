"""The unit log ``units.jsonl``: one JSON line per committed unit, append-only, torn-write safe.

::

    done = read_unit_log(path)                 # {unit: record}; a torn last line is skipped
    done = read_unit_log(path, repair=True)    # ... and cut off the file (the writer, on resume)
    append_record(path, record)                # one whole line, synced, or nothing

A commit is one ``write`` of one line ending in a newline on an ``O_APPEND`` file, then
``fsync``. A kill or a full disk can still leave a partial last line (no newline): it was
never committed. Readers skip it; the writer cuts it off when it resumes, so the next commit
starts on a fresh line instead of being glued onto the torn one (and lost with it). A commit
that fails (``EFBIG``, ``ENOSPC``) truncates the file back to its size before the commit.
Every complete line must be a record (``unit``, ``rows``, ``crc32``, ``nbytes``); anything
else is an error naming the file and line. A unit recorded twice counts once, the last wins.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from oculi.errors import FileWriteError
from oculi.harvest.folder import HarvestStoreError

_KEYS = ("unit", "rows", "crc32", "nbytes")


def read_unit_log(path: Path, *, repair: bool = False) -> dict[int, dict[str, Any]]:
    """Committed units by index; each record also gets ``"line"``, its line number.

    Args:
        path: the log (a missing log is an empty one).
        repair: cut a torn last line off the file.

    Raises:
        HarvestStoreError: a complete line that is not a unit record (names file and line).
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return {}
    end = data.rfind(b"\n") + 1
    if end < len(data) and repair:
        os.truncate(path, end)
    done: dict[int, dict[str, Any]] = {}
    for n, line in enumerate(data[:end].split(b"\n")[:-1], start=1):
        if not line.strip():
            continue
        rec = _record(line, path, n)
        done[rec["unit"]] = {**rec, "line": n}
    return done


def _record(line: bytes, path: Path, n: int) -> dict[str, Any]:
    try:
        rec = json.loads(line)
    except ValueError as exc:
        raise HarvestStoreError(
            f"{path}:{n} is not a JSON unit record ({exc}); the unit log was edited or damaged: "
            "delete that line to redo its unit, or rebuild the store (resume=False)"
        ) from None
    missing = [k for k in _KEYS if not isinstance(rec, dict) or k not in rec]
    if missing:
        raise HarvestStoreError(
            f"{path}:{n} is not a unit record: it lacks {', '.join(map(repr, missing))}; delete "
            "that line to redo its unit, or rebuild the store (resume=False)"
        )
    ok = (
        isinstance(rec["unit"], int) and rec["unit"] >= 0
        and isinstance(rec["rows"], list) and len(rec["rows"]) == 2
        and all(isinstance(r, int) for r in rec["rows"])
        and isinstance(rec["crc32"], dict) and isinstance(rec["nbytes"], dict)
    )  # fmt: skip
    if not ok:
        raise HarvestStoreError(
            f"{path}:{n} is not a unit record: 'unit' must be an int >= 0, 'rows' [start, stop], "
            "'crc32' and 'nbytes' objects"
        )
    return rec


def append_record(path: Path, record: dict[str, Any]) -> None:
    """Append ``record`` as one line and fsync it; on failure the log is left as it was.

    Raises:
        FileWriteError: the write failed (full disk, file-size limit...); names the log.
    """
    line = (json.dumps(record, sort_keys=True) + "\n").encode()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    except OSError as exc:
        raise FileWriteError(
            f"cannot commit unit {record['unit']} to '{path}': {exc.strerror}"
        ) from None
    try:
        size = os.fstat(fd).st_size
        try:
            written = 0
            while written < len(line):
                written += os.write(fd, line[written:])
            os.fsync(fd)
        except OSError as exc:
            os.ftruncate(fd, size)  # no partial line for the next commit to be glued onto
            raise FileWriteError(
                f"cannot commit unit {record['unit']} to '{path}': {exc.strerror or exc}"
            ) from None
    finally:
        os.close(fd)
