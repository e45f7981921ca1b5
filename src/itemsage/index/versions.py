"""Index versions on disk: INDEX_ROOT/versions/<version>/ (one directory per build, never changed after
publishing) and INDEX_ROOT/CURRENT, the served version's name, replaced atomically. `LocalVersions`
is the seam the service reloads through (Milvus has its own, index/milvus.py).
"""

from __future__ import annotations

import datetime as dt
import logging
import re
from pathlib import Path

from itemsage import artifacts
from itemsage.artifacts import ArtifactError
from itemsage.index.faiss_index import ProductIndex

log = logging.getLogger(__name__)


VERSIONS_DIR = "versions"
CURRENT_FILE = "CURRENT"


_VERSION_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


# ---- version directories and the CURRENT pointer ------------------------------------------------


class VersionNotFound(ArtifactError):
    """No such index version (or none published): the service answers 404, not 409."""


class LocalVersions:
    """The index versions under a local INDEX_ROOT, as the service loads and reloads them.

    The seam between the service and an index backend: `resolve(None)` follows CURRENT,
    `resolve("v2")` names versions/v2 (ValueError for a bad name, VersionNotFound for a missing
    one); `load(target)` verifies and loads it. index_milvus.MilvusVersions does the same for Milvus.
    """

    def __init__(self, index_root: str | Path) -> None:
        self.root = Path(index_root)

    def __str__(self) -> str:
        return str(self.root)

    def resolve(self, version: str | None) -> Path:
        version_dir = version_path(self.root, version) if version else current_version(self.root)
        if not version_dir.is_dir():
            known = sorted(p.name for p in (self.root / VERSIONS_DIR).glob("*") if p.is_dir())
            shown = ", ".join(known[:20]) + (f" (and {len(known) - 20} more)" if len(known) > 20 else "")
            raise VersionNotFound(f"index version '{version_dir.name}' does not exist; known "
                                  f"versions: {shown or 'none'}")
        return version_dir

    def load(self, target: Path) -> ProductIndex:
        return ProductIndex.load(target)


def version_path(index_root: str | Path, version: str) -> Path:
    if not _VERSION_NAME.match(version):
        raise ValueError(f"index version name '{version}' must be letters, digits, '.', '_' or '-' "
                         "(no slashes), starting with a letter or digit")
    return Path(index_root) / VERSIONS_DIR / version


def new_version_name() -> str:
    return "v" + dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")


def claim_new_version(index_root: str | Path) -> Path:
    """A new, empty version directory for a build given no --version: versions/v<UTC time>, or
    v<time>-2, -3, ... when another build took that name (in the same second, in any process). The
    directory's creation is the claim, so two builds never share a version."""
    versions = Path(index_root) / VERSIONS_DIR
    versions.mkdir(parents=True, exist_ok=True)
    base = new_version_name()
    for n in range(1, 10_000):
        candidate = versions / (base if n == 1 else f"{base}-{n}")
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        return candidate
    raise ArtifactError(f"{versions} holds 10,000 versions named {base}*; pass --version")


def release_claim(version_dir: Path) -> None:
    """Remove a claimed version directory whose build failed (only while it holds no manifest)."""
    import shutil

    if version_dir.is_dir() and not (version_dir / artifacts.MANIFEST).exists():
        shutil.rmtree(version_dir, ignore_errors=True)


def publish(index_root: str | Path, version_dir: str | Path) -> None:
    """Point INDEX_ROOT/CURRENT at `version_dir` (verified first); readers see the old or the new."""
    index_root, version_dir = Path(index_root), Path(version_dir)
    expected = version_path(index_root, version_dir.name)
    if version_dir.resolve() != expected.resolve():
        raise ValueError(f"{version_dir} is not under {index_root / VERSIONS_DIR}; publish only a "
                         "version written into this index root")
    artifacts.verify_manifest(version_dir, kind="index")
    point_current(index_root, version_dir.name)
    log.info("published index version %s", version_dir.name)


def point_current(index_root: str | Path, version: str) -> None:
    """Replace INDEX_ROOT/CURRENT atomically with `version` (checked by the caller; see `publish`)."""
    version_path(index_root, version)  # the name's rules
    artifacts.atomic_write_text(Path(index_root) / CURRENT_FILE, version + "\n")


def current_version(index_root: str | Path) -> Path:
    """The version directory CURRENT points at."""
    index_root = Path(index_root)
    pointer = index_root / CURRENT_FILE
    if not pointer.is_file():
        raise VersionNotFound(f"{index_root} has no {CURRENT_FILE} file: no index version is published "
                            "there. Build one with `itemsage index EMBEDDINGS_DIR --out INDEX_ROOT`.")
    return version_path(index_root, pointer.read_text().strip())


def load_current(index_root: str | Path, *, ef_search: int | None = None) -> ProductIndex:
    """Load the version CURRENT points at (verified like `ProductIndex.load`)."""
    return ProductIndex.load(current_version(index_root), ef_search=ef_search)
