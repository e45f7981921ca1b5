"""Atomic files and manifests: every artifact directory is complete or absent (SPEC §2).

A write goes to a temp file in the same directory, is fsynced, then `os.replace`d over the target,
so a killed job never leaves a torn file. Each artifact directory ends with a `manifest.json`
written last: what produced it (config, inputs' fingerprints), counts, and the sha256 of every file.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

MANIFEST = "manifest.json"
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
    if not path.is_file():
        raise ArtifactError(
            f"{directory} has no {MANIFEST}: it is not a finished itemsage artifact "
            "(the job that writes it may have been killed; run it again)."
        )
    manifest = json.loads(path.read_text())
    if kind is not None and manifest.get("kind") != kind:
        raise ArtifactError(f"{directory} holds a '{manifest.get('kind')}' artifact, expected '{kind}'.")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(
            f"{directory} has format_version {manifest.get('format_version')}, this itemsage reads "
            f"{FORMAT_VERSION}; rebuild it with this version."
        )
    return manifest


def verify_manifest(directory: str | Path, kind: str | None = None) -> dict[str, Any]:
    """Read the manifest and check every listed file's size and sha256; raise on any mismatch."""
    directory = Path(directory)
    manifest = read_manifest(directory, kind)
    for name, meta in manifest["files"].items():
        path = directory / name
        if not path.is_file():
            raise ArtifactError(f"{path} is listed in the manifest but missing.")
        if path.stat().st_size != meta["bytes"] or sha256_file(path) != meta["sha256"]:
            raise ArtifactError(
                f"{path} does not match its manifest checksum: the file is corrupted or was changed "
                "after it was written. Rebuild the artifact."
            )
    return manifest


def fingerprint(directory: str | Path) -> str:
    """A short, stable identity of a finished artifact: sha256 over its manifest's file checksums."""
    manifest = read_manifest(directory)
    h = hashlib.sha256()
    for name, meta in sorted(manifest["files"].items()):
        h.update(f"{name}:{meta['sha256']}\n".encode())
    return h.hexdigest()[:16]
