"""`itemsage index`: embeddings into a faiss or Milvus index version, or the live log compacted (index/).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from itemsage.cli.common import _PROGRESS_HELP, Backend, Kind, _progress, app, console, fail, flag_names


@app.command("index")
def index_cmd(
    embeddings_dir: Optional[Path] = typer.Argument(None, help="A finished embeddings directory (itemsage embed); "
                                                     "not with --compact."),
    out: Optional[Path] = typer.Option(None, "--out", show_default=False,
                                       help="Index root: `versions/<version>/` and `CURRENT` go here (faiss backend)."),
    kind: Kind = typer.Option(Kind.hnsw, "--kind", help="hnsw: approximate, fast; ivfpq: compressed codes with an "
                              "exact re-ranking; flat: exact."),
    m: int = typer.Option(32, "--m", help="HNSW links per node."),
    ef_construction: int = typer.Option(200, "--ef-construction", help="HNSW build candidate list."),
    ef_search: int = typer.Option(0, "--ef-search", help="HNSW unfiltered search candidate list (0: the smallest "
                                  "that reaches --recall-target, measured by the build)."),
    nlist: int = typer.Option(0, "--nlist", help="IVF-PQ lists (0: from the catalog size)."),
    pq_m: int = typer.Option(0, "--pq-m", help="IVF-PQ sub-quantizers (0: half the vector width)."),
    pq_nbits: int = typer.Option(4, "--pq-nbits", help="IVF-PQ bits per sub-quantizer code: 4 (fast-scan) or 8."),
    nprobe: int = typer.Option(0, "--nprobe", help="IVF-PQ lists probed per unfiltered query (0: tuned like "
                               "--ef-search)."),
    refine_factor: int = typer.Option(20, "--refine-factor", help="IVF-PQ re-ranks factor x k candidates exactly."),
    recall_target: float = typer.Option(0.95, "--recall-target", help="recall@10 against exact search that the "
                                        "build tunes ef / nprobe to reach, unfiltered and under filters."),
    attributes: Optional[Path] = typer.Option(None, "--attributes", show_default=False,
                                              help="Where the filterable attributes come from: a dataset or catalog "
                                              "(default: the dataset the embeddings were made from)."),
    filterable: Optional[str] = typer.Option(None, "--filterable", show_default=False,
                                             help="Comma-separated columns to store for filters ('none': none; "
                                             "default: every scalar column but ids, hashes and free text)."),
    backend: Backend = typer.Option(Backend.faiss, "--backend", help="faiss (a local index root, --out) or milvus (--uri)."),
    uri: Optional[str] = typer.Option(None, "--uri", show_default=False,
                                      help="Milvus URI: ./file.db (Milvus Lite) or http://host:19530."),
    collection: str = typer.Option("itemsage", "--collection", help="Milvus alias; versions are collections `<name>_<version>`."),
    milvus_index: str = typer.Option("HNSW", "--milvus-index", help="Milvus index type: HNSW, FLAT, IVF_FLAT, AUTOINDEX."),
    version: Optional[str] = typer.Option(None, "--version", show_default=False,
                                          help="Version name (default: the UTC time)."),
    publish: bool = typer.Option(True, "--publish/--no-publish",
                                 help="Point CURRENT (Milvus: the alias) at the new version."),
    compact: bool = typer.Option(False, "--compact", help="Fold the live updates logged under --out into a new "
                                 "version of CURRENT (same kind and parameters); then POST /admin/reload."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help=_PROGRESS_HELP),
) -> None:
    """Build an ANN index over product embeddings, report its recall@10 against exact search.

    Example:

        itemsage index runs/embeddings --out runs/index --kind hnsw --filterable category,brand,price
    """
    from itemsage.artifacts import ArtifactError
    from itemsage.config import ConfigError

    _progress(progress)  # no bar of its own; the flag (and -q) still silence the libraries'
    columns = None if filterable is None else [c.strip() for c in filterable.split(",")
                                                if c.strip() and c.strip() != "none"]
    if backend == Backend.milvus:
        if uri is None:
            fail("--backend milvus needs --uri (./file.db for Milvus Lite, http://host:19530 for a server)")
        if embeddings_dir is None or compact:
            fail("--backend milvus writes an EMBEDDINGS_DIR into a new collection (no --compact: live updates are "
                 "for the faiss backend)")
        from itemsage.index.milvus import MilvusConfig, build_milvus

        try:
            config = MilvusConfig(index_type=milvus_index, m=m, ef_construction=ef_construction,
                                  **({"ef_search": ef_search} if ef_search else {}))  # 0: Milvus's default
            index = build_milvus(embeddings_dir, uri, collection, config, version=version, publish_it=publish,
                                 attributes=attributes, filterable=columns)
        except (ConfigError, ArtifactError, ValueError, ImportError) as err:
            fail(str(err))
        stats = index.stats
        console.print(f"wrote Milvus collection {index.collection} ({milvus_index}) in {stats['build_seconds']:.1f} s: "
                      f"{len(index):,} vectors x {index.dim} dims")
        console.print(f"recall@10 vs exact search: {stats['neighbour_recall_at_10']:.4f} ({stats['recall_queries']} queries)")
        console.print("filterable: " + (", ".join(f"{c} ({k})" for c, k in sorted(index.kinds.items())) or "none"))
        console.print(f"version: {index.version}" + (f" (published as alias '{collection}')" if publish else ""))
        return
    if out is None:
        fail("--out is required with --backend faiss (the index root to write)")
    from itemsage.index.build import build_from_embeddings
    from itemsage.index.config import IndexConfig

    if compact:
        from itemsage.index.live import compact as compact_live

        if embeddings_dir is not None:
            fail("--compact rebuilds CURRENT's version with its live updates; give no EMBEDDINGS_DIR")
        try:
            result = compact_live(out, version=version, publish=publish)
        except (ConfigError, ArtifactError, ValueError) as err:
            fail(str(err))
        if result is None:
            console.print("no live updates to compact; CURRENT is unchanged")
            return
        index, version_dir, folded = result
        console.print(f"folded {folded:,} live updates: {len(index):,} vectors x {index.dim} dims in "
                      f"{index.stats['build_seconds']:.1f} s, recall@10 vs exact {index.stats['neighbour_recall_at_10']:.4f}")
        print_tuning(index)
        console.print(f"version: {version_dir}" + (" (published as CURRENT; POST /admin/reload to serve it)"
                                                   if publish else ""))
        return
    if embeddings_dir is None:
        fail("give the EMBEDDINGS_DIR to index (or --compact to fold live updates into CURRENT)")
    try:
        config = IndexConfig(kind=kind.value, m=m, ef_construction=ef_construction, ef_search=ef_search, nlist=nlist,
                             pq_m=pq_m, pq_nbits=pq_nbits, nprobe=nprobe, refine_factor=refine_factor,
                             recall_target=recall_target)
        index, version_dir = build_from_embeddings(
            embeddings_dir, out, config, version=version, publish_it=publish, attributes=attributes,
            filterable=columns)
    except ConfigError as err:
        fail(flag_names(str(err)))
    except (ArtifactError, ValueError) as err:
        fail(str(err))
    stats = index.stats
    console.print(f"built {kind.value} index in {stats['build_seconds']:.1f} s: {len(index):,} vectors x {index.dim} dims")
    if kind == Kind.ivfpq:
        c = index.config
        console.print(f"IVF-PQ: nlist {c.nlist}, pq_m {c.pq_m}, pq_nbits {c.pq_nbits}, nprobe {index.nprobe}, "
                      f"re-rank x{c.refine_factor} from vectors.faiss (memory-mapped)")
    console.print(f"recall@10 vs exact search: {stats['neighbour_recall_at_10']:.4f} ({stats['recall_queries']} queries)")
    print_tuning(index)
    console.print(f"version: {version_dir}" + (" (published as CURRENT)" if publish else ""))


def print_tuning(index: object) -> None:
    """The tuned search table and the filterable columns of a new version."""
    tuning = index.tuning  # type: ignore[attr-defined]
    if tuning.param:
        steps = ", ".join(f"{s:g}: {v}" for s, v in zip(tuning.selectivities, tuning.values))
        console.print(f"{tuning.param} by share of products a filter passes (recall@10 >= {tuning.target:g}): {steps}; "
                      f"exact search up to {tuning.exact_max_rows:,} passing products")
    store = index.attributes  # type: ignore[attr-defined]
    kinds = store.kinds if store is not None else {}
    console.print("filterable: " + (", ".join(f"{c} ({k})" for c, k in sorted(kinds.items())) or
                                    "none (give --attributes to add the catalog's columns)"))
