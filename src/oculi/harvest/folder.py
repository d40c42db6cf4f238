"""The store folder: the files oculi writes there, its marker, and removing only those.

::

    check_ours(root)            # refuses a non-empty folder without oculi's marker
    write_marker(root)          # first file of a new store: {"oculi_harvest": FORMAT, ...}
    clear_store(root)           # resume=False: remove what oculi wrote, refuse anything else

A store starts with ``oculi-harvest.json``, the marker, written before anything else and
holding the store format. Only a folder with the marker is ever replaced, and even then only
the files oculi writes are removed (the marker, lock, manifest, index, unit log, the root
``zarr.json``, the array folders ``<site>/<layer>/`` with their ``zarr.json`` and shards
``c/<k>/0``, and the temporary files of interrupted writes). A file oculi did not write
anywhere in the folder stops the replacement, naming it: oculi never deletes what it did not
create.
"""

from __future__ import annotations

import json
import os
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from oculi.errors import InputError
from oculi.harvest.plan import LATENT_PREFIX

FORMAT = 2
"""The store layout's version, recorded in its marker; another version is refused.

::

    json.loads((store / "oculi-harvest.json").read_text())["oculi_harvest"] == FORMAT
"""
MARKER, LOCK = "oculi-harvest.json", "oculi-harvest.lock"
MANIFEST, UNIT_LOG, INDEX, ZARR_META = "manifest.json", "units.jsonl", "index.parquet", "zarr.json"
_TOP_FILES = {MARKER, LOCK, MANIFEST, UNIT_LOG, INDEX, ZARR_META}
# write_atomically's temporary files (.name.<pid>-<hex>.tmp) and zarr's (name.<hex>.partial)
_TMP = re.compile(r"^\.(?P<name>[^/]+)\.\d+-[0-9a-f]+\.tmp$")
_PARTIAL = re.compile(r"^(?P<stem>[^/.]+)\.[0-9a-f]{32}\.partial$")


class HarvestStoreError(InputError):
    """A store that does not match the harvest asked for, or is incomplete or damaged.

    ::

        oculi.open_harvest("not-a-store")
        # HarvestStoreError: 'not-a-store' is not an oculi harvest store (no manifest.json)
    """


def read_json(path: Path, what: str) -> dict[str, Any]:
    """A JSON object from ``path``; an unreadable or non-JSON file is an error naming it."""
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise HarvestStoreError(f"{what} '{path}' is missing") from None
    except (ValueError, OSError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise HarvestStoreError(f"{what} '{path}' is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise HarvestStoreError(f"{what} '{path}' is not a JSON object")
    return data


def read_marker(root: Path) -> dict[str, Any] | None:
    """The marker's content, or ``None`` if the folder has none."""
    path = root / MARKER
    if not path.exists():
        return None
    data = read_json(path, "the store marker")
    if not isinstance(data.get("oculi_harvest"), int):
        raise HarvestStoreError(f"the store marker '{path}' has no integer 'oculi_harvest' format")
    return data


def write_marker(root: Path) -> None:
    """Write the marker (atomically): the first file of every store oculi creates."""
    import oculi

    data = {
        "oculi_harvest": FORMAT,
        "oculi": oculi.__version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    write_json(root / MARKER, data, "the harvest store marker")


def write_json(path: Path, data: Any, what: str) -> None:
    """Write ``data`` as JSON, whole or not at all (``write_atomically``)."""
    from oculi.capture.io.files import write_atomically

    blob = json.dumps(data, indent=1, sort_keys=True).encode()

    def write(tmp: Path) -> None:
        tmp.write_bytes(blob)

    write_atomically(path, write, overwrite=True, what=what)


def check_ours(root: Path) -> None:
    """Refuse ``root`` unless it is missing, empty (a lock file aside) or holds the marker."""
    if not root.exists():
        return
    if not root.is_dir():
        raise HarvestStoreError(f"'{root}' is a file, not a folder; give a folder for the store")
    if (root / MARKER).exists():
        return
    others = sorted(p.name for p in root.iterdir() if p.name != LOCK)
    if others and _old_store(root):
        raise HarvestStoreError(
            f"'{root}' looks like a harvest store of an older oculi (format 1, no {MARKER}); "
            "this oculi neither reads nor replaces it: move it away or delete it yourself, "
            "or harvest into another folder"
        )
    if others:
        shown = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
        raise HarvestStoreError(
            f"'{root}' exists and is not an oculi harvest store (no {MARKER}; it holds "
            f"{shown}); oculi only writes into an empty or new folder, or into a store it "
            "created, and never deletes a folder it did not create; choose another folder"
        )


def _old_store(root: Path) -> bool:
    """A format-1 store: its root ``zarr.json`` has the ``oculi_harvest`` attribute."""
    try:
        meta = json.loads((root / ZARR_META).read_bytes())
        return isinstance(meta, dict) and "oculi_harvest" in (meta.get("attributes") or {})
    except (OSError, ValueError):
        return False


def foreign_entries(root: Path) -> list[Path]:
    """Every file or folder under ``root`` that is not one oculi writes in a store."""
    from oculi.capture.sites import SITE_KINDS

    foreign: list[Path] = []
    for entry in root.iterdir():
        if entry.is_dir() and not entry.is_symlink() and _array_folder(entry.name, SITE_KINDS):
            foreign += _foreign_in_site(entry)
        elif not (_is_file(entry) and _own_top_file(entry.name)):
            foreign.append(entry)
    return foreign


def _array_folder(name: str, kinds: Any) -> bool:
    """A site's folder: a site kind, or ``sae.<name>`` (an SAE's latents)."""
    return name in kinds or name.startswith(LATENT_PREFIX)


def _is_file(path: Path) -> bool:
    return path.is_file() and not path.is_symlink()


def _own_top_file(name: str) -> bool:
    tmp = _TMP.match(name)
    return (
        name in _TOP_FILES or bool(tmp and tmp["name"] in _TOP_FILES) or _is_partial(name, "zarr")
    )


def _is_partial(name: str, stem: str) -> bool:
    m = _PARTIAL.match(name)
    return bool(m and m["stem"] == stem)


def _is_meta(entry: Path) -> bool:
    return _is_file(entry) and (entry.name == ZARR_META or _is_partial(entry.name, "zarr"))


def _foreign_in_site(site: Path) -> list[Path]:
    foreign: list[Path] = []
    for layer in site.iterdir():
        if _is_meta(layer):
            continue
        if not (layer.is_dir() and not layer.is_symlink() and layer.name.isdigit()):
            foreign.append(layer)
            continue
        for entry in layer.iterdir():
            if _is_meta(entry):
                continue
            if entry.name != "c" or not entry.is_dir() or entry.is_symlink():
                foreign.append(entry)
                continue
            for shard_dir in entry.iterdir():
                if not (
                    shard_dir.is_dir() and not shard_dir.is_symlink() and shard_dir.name.isdigit()
                ):
                    foreign.append(shard_dir)
                    continue
                foreign += [
                    f for f in shard_dir.iterdir()
                    if not (_is_file(f) and (f.name == "0" or _is_partial(f.name, "0")))
                ]  # fmt: skip
    return foreign


def clear_store(root: Path) -> None:
    """Remove what oculi wrote in the store at ``root`` (the marker and lock stay).

    Raises:
        HarvestStoreError: ``root`` has no marker, or holds something oculi did not write
            (nothing is removed then).
    """
    if read_marker(root) is None:
        raise HarvestStoreError(
            f"'{root}' is not an oculi harvest store (no {MARKER}); not replacing it"
        )
    foreign = foreign_entries(root)
    if foreign:
        shown = ", ".join(str(p.relative_to(root)) for p in foreign[:5])
        more = f" and {len(foreign) - 5} more" if len(foreign) > 5 else ""
        raise HarvestStoreError(
            f"cannot replace the store at '{root}': it holds files oculi did not write "
            f"({shown}{more}); move them out, or harvest into another folder"
        )
    (root / MANIFEST).unlink(missing_ok=True)  # first: a store without it is rebuilt
    for entry in sorted(root.iterdir()):
        if entry.name in (MARKER, LOCK):
            continue
        if entry.is_dir():
            _remove_tree(entry)
        else:
            entry.unlink()


def _remove_tree(folder: Path) -> None:
    """Remove a folder whose every entry was checked by :func:`foreign_entries`."""
    for dirpath, _, files in os.walk(folder, topdown=False):
        for name in files:
            os.unlink(os.path.join(dirpath, name))
        os.rmdir(dirpath)
