"""Publishing ingest's dataset directory atomically, and recovering what a killed ingest left.

The output directory is written as `<out>.tmp-<pid>` and renamed to `<out>` at the end, so a killed
run never leaves something that looks complete. An existing `<out>` is replaced only if it is an
itemsage dataset: it is first renamed to `<out>.old-<pid>`, the new one renamed into place, then the
old one removed. What a killed run (SIGKILL, power loss) leaves is cleaned up by the next run into
the same `<out>`, before it reads anything: if `<out>` is missing (a kill between the two renames),
the newest `<out>.tmp-<pid>` whose files match its manifest is put in place (else a complete
`<out>.old-<pid>`), and every other `<out>.tmp-*` / `<out>.old-*` of a process no longer running is
removed. Directories of a running process (another ingest into the same `<out>`) are left alone.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from itemsage import artifacts
from itemsage.config import ConfigError

log = logging.getLogger(__name__)


def check_out(out: Path) -> None:
    if not out.exists():
        return
    if not out.is_dir():
        raise ConfigError(f"--out {out} is a file; ingest writes a directory. Choose another --out.")
    manifest = out / artifacts.MANIFEST
    kind = None
    if manifest.is_file():
        try:
            kind = json.loads(manifest.read_text(encoding="utf-8")).get("kind")
        except (OSError, ValueError):
            kind = None
    if any(out.iterdir()) and kind != "dataset":
        raise ConfigError(f"--out {out} exists and is not an itemsage dataset; ingest will not overwrite "
                          "it. Choose another --out or remove the directory.")


def _complete(directory: Path) -> bool:
    try:
        artifacts.verify_manifest(directory, kind="dataset")
    except (artifacts.ArtifactError, OSError, KeyError, TypeError):
        return False
    return True


def recover_leftovers(out: Path) -> list[Path]:
    """Finish or remove what killed runs left beside `out` (see the module doc); returns what was removed."""
    leftovers = artifacts.leftovers(out)  # (kind, path) of dead runs' directories
    if not out.exists():
        # Killed between the two renames of `publish`: the new dataset is complete in a tmp dir.
        newest_first = sorted(leftovers, key=lambda kp: (kp[0] != "tmp", -kp[1].stat().st_mtime_ns))
        for kind, path in newest_first:
            if _complete(path):
                os.replace(path, out)
                artifacts._fsync_dir(out.parent)
                log.warning("recovered the dataset %s from %s, left by an ingest that was killed while "
                            "replacing it", out, path.name)
                leftovers.remove((kind, path))
                break
    removed = []
    for _, path in leftovers:
        shutil.rmtree(path, ignore_errors=True)
        log.info("removed %s, left by a killed ingest", path)
        removed.append(path)
    return removed


def publish(tmp: Path, out: Path) -> None:
    """Swap the finished temp directory into place (an old dataset there is removed)."""
    old = None
    if out.exists():
        old = out.parent / f"{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    os.replace(tmp, out)
    artifacts._fsync_dir(out.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
