"""Atomic files and manifests: every artifact directory is complete or absent (docs/ARCHITECTURE.md).

A write goes to a temp file in the same directory, is fsynced, then `os.replace`d over the target,
so a killed job never leaves a torn file. Each artifact directory ends with a `manifest.json`
written last: what produced it (config, inputs' fingerprints), counts, and the sha256 of every file.

Every stage verifies its inputs against their manifest before use (`verify_manifest`). Datasets,
which can be gigabytes and are read by several stages, are verified with a record of the last full
check (`verify_dataset`): `<dataset>/.verified.json` holds, per listed file, the sha256 it was found
to have and the file's size, mtime, ctime and inode at that time. A file whose four values are
unchanged and whose manifest sha256 is the recorded one is not hashed again; any other is hashed in
full (first use, a new dataset, a copy, any write). Setting mtime back does not hide a change:
ctime cannot be set from user space and moves on every write. The record is written atomically and
is a hidden file, so it is not part of the manifest; if the directory is read-only, every use hashes.
A file changed in the last two seconds is not recorded (file times tick coarsely: a second write in
the same tick would look unchanged), as git does with its index.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
VERIFIED = ".verified.json"  # a dataset's record of its last full verification (see the module doc)
_RACY_NS = 2_000_000_000  # a file changed this recently is not recorded: file times tick coarsely
_UMASK = os.umask(0)
os.umask(_UMASK)  # read once: os.umask can only be read by setting it
FORMAT_VERSION = 1


class ArtifactError(RuntimeError):
    """An artifact is missing, torn or does not match its manifest."""


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # some filesystems cannot fsync a directory
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temp path beside `target`; on success it is fsynced and renamed over `target`."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; artifacts get the usual permissions
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, target)
        _fsync_dir(target.parent)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_bytes(target: str | Path, data: bytes) -> None:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(target: str | Path, text: str) -> None:
    atomic_write_bytes(target, text.encode("utf-8"))


def atomic_write_json(target: str | Path, obj: Any) -> None:
    atomic_write_text(target, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def atomic_write_parquet(target: str | Path, table: pa.Table, **kwargs: Any) -> None:
    with atomic_path(target) as tmp:
        pq.write_table(table, tmp, **kwargs)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):  # numpy / torch scalars
        return obj.item()
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    raise TypeError(f"not JSON-serialisable: {type(obj).__name__}")


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_manifest(
    directory: str | Path,
    kind: str,
    *,
    config: dict[str, Any] | None = None,
    inputs: dict[str, str] | None = None,
    counts: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    files: list[str] | None = None,
) -> dict[str, Any]:
    """Checksum the directory's files (or `files`, relative paths) and write `manifest.json` last.

    `inputs` maps an input's name to its fingerprint (see `fingerprint`).
    """
    directory = Path(directory)
    if files is None:
        files = sorted(
            str(p.relative_to(directory))
            for p in directory.rglob("*")
            if p.is_file() and p.name != MANIFEST and not p.name.startswith(".")
        )
    from itemsage import __version__

    manifest = {
        "kind": kind,
        "format_version": FORMAT_VERSION,
        "itemsage_version": __version__,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "config": config or {},
        "inputs": inputs or {},
        "counts": counts or {},
        "files": {
            name: {"sha256": sha256_file(directory / name), "bytes": (directory / name).stat().st_size}
            for name in files
        },
    }
    if extra:
        manifest.update(extra)
    atomic_write_json(directory / MANIFEST, manifest)
    return manifest


def read_manifest(directory: str | Path, kind: str | None = None) -> dict[str, Any]:
    directory = Path(directory)
    path = directory / MANIFEST
    if not directory.exists():
        raise ArtifactError(f"{directory} does not exist.")
    if not directory.is_dir():
        raise ArtifactError(f"{directory} is a file; an itemsage artifact is a directory (with a {MANIFEST}).")
    if not path.is_file():
        raise ArtifactError(
            f"{directory} has no {MANIFEST}: it is not a finished itemsage artifact "
            "(the job that writes it may have been killed; run it again)."
        )
    manifest = read_json(path)
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise ArtifactError(f"{path} is not an itemsage manifest (no `files` table); the file is damaged. "
                            "Rebuild the artifact.")
    if kind is not None and manifest.get("kind") != kind:
        raise ArtifactError(f"{directory} holds a '{manifest.get('kind')}' artifact, expected '{kind}'.")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(
            f"{directory} has format_version {manifest.get('format_version')}, this itemsage reads "
            f"{FORMAT_VERSION}; rebuild it with this version."
        )
    return manifest


def read_json(path: str | Path) -> Any:
    """A JSON file's value; ArtifactError naming the file if it is unreadable or not valid JSON."""
    path = Path(path)
    try:
        return json.loads(path.read_bytes())
    except (UnicodeDecodeError, ValueError) as err:  # JSONDecodeError is a ValueError
        raise ArtifactError(f"{path} is not valid JSON ({err}); the file is damaged or was edited by hand. "
                            "Rebuild the artifact that holds it.") from None


def _stamp(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def _read_record(directory: Path) -> dict[str, Any]:
    try:
        record = json.loads((directory / VERIFIED).read_bytes())
    except (OSError, ValueError):
        return {}  # none yet, or damaged: hash everything
    return record.get("files", {}) if isinstance(record, dict) and isinstance(record.get("files"), dict) else {}


def verify_manifest(directory: str | Path, kind: str | None = None, *, record: bool = False) -> dict[str, Any]:
    """Read the manifest and check every listed file's size and sha256; raise on any mismatch.

    With `record`, files unchanged since the last full check recorded in `.verified.json` are not
    hashed again, and the record is updated (see the module doc).
    """
    directory = Path(directory)
    manifest = read_manifest(directory, kind)
    known = _read_record(directory) if record else {}
    checked: dict[str, Any] = {}
    for name, meta in manifest["files"].items():
        path = directory / name
        if not path.is_file():
            raise ArtifactError(f"{path} is listed in the manifest but missing; rebuild the artifact.")
        stamp = _stamp(path)
        if stamp[0] != meta["bytes"]:
            raise ArtifactError(f"{path} is {stamp[0]:,} bytes, its manifest says {meta['bytes']:,}: the file is "
                                "truncated or was changed after it was written. Rebuild the artifact.")
        entry = {"sha256": meta["sha256"], "stat": stamp}
        if known.get(name) != entry:
            if sha256_file(path) != meta["sha256"]:
                raise ArtifactError(f"{path} does not match its manifest checksum: the file is corrupted or was "
                                    "changed after it was written. Rebuild the artifact.")
            if _stamp(path) != stamp:  # written while we hashed: do not vouch for it
                raise ArtifactError(f"{path} changed while it was being verified; run again once nothing writes it.")
        if time.time_ns() - max(stamp[1], stamp[2]) > _RACY_NS:  # else a write in the same tick could hide
            checked[name] = entry
    if record and checked != known:
        try:
            atomic_write_json(directory / VERIFIED, {"format_version": FORMAT_VERSION, "files": checked})
        except OSError as err:
            log.debug("cannot record the verification of %s (%s); the next use hashes in full", directory, err)
    return manifest


def verify_dataset(dataset_dir: str | Path, kind: str = "dataset") -> dict[str, Any]:
    """Verify a dataset directory (every file its manifest lists) before a stage reads it.

    Refuses a directory without a finished manifest (an interrupted or hand-made dataset) and names
    the file that is missing, truncated or corrupted. Unchanged files are not re-hashed (module doc).
    `kind` "catalog": a catalog checked on its own (embed --catalog), which embed reads like a dataset.
    """
    return verify_manifest(dataset_dir, kind=kind, record=True)


def fingerprint(directory: str | Path) -> str:
    """A short, stable identity of a finished artifact: sha256 over its manifest's file checksums."""
    manifest = read_manifest(directory)
    h = hashlib.sha256()
    for name, meta in sorted(manifest["files"].items()):
        h.update(f"{name}:{meta['sha256']}\n".encode())
    return h.hexdigest()[:16]


# ---- a directory written whole, then renamed into place ---------------------------------------------
# (as ingest publishes a dataset, data/publish.py): a kill leaves `<out>` as it was, plus a temporary
# directory beside it that the next run into the same `<out>` removes.


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, under another user
    return True


def leftovers(out: str | Path) -> list[tuple[str, Path]]:
    """The `<out>.tmp-<pid>` / `<out>.old-<pid>` directories beside `out` that killed runs left (those
    of processes no longer running, and this process's own), as ("tmp" | "old", path)."""
    import re

    out = Path(out)
    if not out.parent.is_dir():
        return []
    pattern = re.compile(re.escape(out.name) + r"\.(tmp|old)-(\d+)")
    found = []
    for path in out.parent.iterdir():
        match = pattern.fullmatch(path.name)
        if match and path.is_dir() and (int(match.group(2)) == os.getpid() or not _running(int(match.group(2)))):
            found.append((match.group(1), path))
    return found


def temp_dir(out: str | Path) -> Path:
    """A new, empty `<out>.tmp-<pid>` beside `out`, to write a whole artifact directory into and
    `publish_dir` at the end. First removes the `<out>.tmp-*` / `<out>.old-*` directories that killed
    runs left (those of processes no longer running, and this process's own)."""
    import shutil

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for _, path in leftovers(out):
        shutil.rmtree(path, ignore_errors=True)
        log.info("removed %s, left by a killed run", path)
    tmp = out.parent / f"{out.name}.tmp-{os.getpid()}"
    tmp.mkdir()
    return tmp


def publish_dir(tmp: str | Path, out: str | Path) -> None:
    """Put the finished directory `tmp` (from `temp_dir`) in place of `out`: an earlier `out` is
    renamed aside, `tmp` renamed to `out`, then the earlier one removed. Readers see one or the other."""
    import shutil

    tmp, out = Path(tmp), Path(out)
    old = None
    if out.exists():
        old = out.parent / f"{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    os.replace(tmp, out)
    _fsync_dir(out.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
