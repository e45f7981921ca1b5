"""`itemsage graph DATASET`: the whole stage on a dataset directory, published as one artifact.

Steps (each timed, wall and CPU, into the manifest's `timings`): verify the dataset; read
train.parquet (edges.read_train); build the graph (edges.build_graph); walk it (walks.neighbourhoods);
read the content vectors; pool and write features.parquet block by block (features.py, artifact.py);
write neighbours.parquet; write the manifest. Everything goes into `<out>.tmp-<pid>`, renamed to
`<out>` at the end (artifacts.temp_dir / publish_dir): a killed run leaves the earlier graph or
none, never a part of one, and the next run removes the dead run's temporary directory.

The result is a function of the dataset's files and the config (the seed included) on a given
numpy/scipy build; nothing depends on the machine's load, the thread count or `walk_chunk`.
"""

from __future__ import annotations

import datetime as dt
import logging
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import scipy.sparse as sp

from itemsage import artifacts, schema
from itemsage.artifacts import ArtifactError
from itemsage.graph import artifact
from itemsage.graph.config import GraphConfig
from itemsage.graph.edges import build_graph, read_train
from itemsage.graph.features import content_vectors, graph_hashes, pooled_blocks
from itemsage.graph.walks import neighbourhoods
from itemsage.progress import progress_bar

log = logging.getLogger(__name__)


def check_out(out: Path) -> None:
    """Refuse an `out` that is a file, or a non-empty directory that is not a graph artifact (nor one a
    killed run of an earlier itemsage left without its manifest)."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ArtifactError(f"--out {out} is a file; itemsage graph writes a directory. Choose another --out.")
    names = {p.name for p in out.iterdir()}
    try:
        kind = artifacts.read_json(out / artifacts.MANIFEST).get("kind") if artifacts.MANIFEST in names else None
    except (ArtifactError, AttributeError):
        kind = None
    if names and kind != artifact.KIND:
        raise ArtifactError(f"--out {out} exists and is not a graph artifact; itemsage graph replaces its --out "
                            "directory whole. Choose another --out or remove the directory.")


def _peak_rss_gib() -> float | None:
    """The process's peak resident memory so far (GiB), None where the platform does not say."""
    try:
        import resource
    except ImportError:  # not on Windows
        return None
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)  # Linux: KiB


class _Steps:
    """Wall and CPU seconds per step, and the process's peak memory so far at its end (the step where
    it grows set the peak), logged and kept for the manifest."""

    def __init__(self) -> None:
        self.timings: dict[str, dict[str, float | None]] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        wall, cpu = time.perf_counter(), time.process_time()
        yield
        step = {"wall_s": round(time.perf_counter() - wall, 3), "cpu_s": round(time.process_time() - cpu, 3),
                "peak_rss_gib": _peak_rss_gib()}
        self.timings[name] = step
        log.info("graph: %s in %.1f s (%.1f CPU s; peak memory so far %s GiB)", name, step["wall_s"], step["cpu_s"],
                 step["peak_rss_gib"])


def build_graph_features(dataset_dir: str | Path, out: str | Path | None = None,
                         config: GraphConfig | None = None, *, progress: bool = False) -> Path:
    """Build the graph stage's artifact for a dataset (see the module doc) and return its directory:
    `out`, or DATASET/graph by default. Raises ArtifactError (a dataset that fails its verification,
    an `out` that is not a graph artifact) or ConfigError (a content source the dataset lacks)."""
    cfg = config if config is not None else GraphConfig()
    dataset_dir = Path(dataset_dir)
    final = Path(out) if out is not None else artifact.graph_dir_of(dataset_dir)
    check_out(final)
    steps = _Steps()
    with steps("verify dataset"):
        artifacts.verify_dataset(dataset_dir)
        dataset_fp = artifacts.fingerprint(dataset_dir)
    tmp = artifacts.temp_dir(final)
    try:
        manifest = _build(dataset_dir, tmp, cfg, steps, progress)
        manifest["inputs"] = {"dataset": dataset_fp}
        manifest["config"] = cfg.to_dict()
        with steps("manifest"):
            artifacts.write_manifest(tmp, artifact.KIND, **manifest)
        artifacts.publish_dir(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone once published
    log.info("graph: wrote %s (%s)", final, ", ".join(f"{k} {v['wall_s']:.1f} s" for k, v in steps.timings.items()))
    return final


def _build(dataset_dir: Path, tmp: Path, cfg: GraphConfig, steps: _Steps, progress: bool) -> dict[str, Any]:
    """The stage's files into `tmp`; returns write_manifest's keyword arguments (less inputs and config)."""
    with progress_bar(progress, unit="products") as bar:
        task = bar.add_task("read", total=None)  # no count to show: a pulsing bar until done
        with steps("read train window"):
            ids = pq.read_table(dataset_dir / schema.PRODUCTS_FILE, columns=[schema.PRODUCT_ID])[schema.PRODUCT_ID]
            ids = ids.combine_chunks()
            n = len(ids)
            rows = read_train(dataset_dir, ids, cfg)
        bar.update(task, total=1, completed=1)
        task = bar.add_task("edges", total=None)
        with steps("edges and degree caps"):
            graph = build_graph(rows, n, cfg)
            del rows
        bar.update(task, total=1, completed=1)
        log.info("graph: %s", graph.stats)
        nb = None
        if cfg.walks:
            task = bar.add_task("walks", total=graph.stats["products_with_edges"])
            with steps("walks"):
                nb = neighbourhoods(graph.adjacency, cfg, advance=lambda k: bar.advance(task, k))
        graph.adjacency = sp.csr_matrix((n, n), dtype=np.float32)  # walked: free it before the vectors
        with steps("content vectors"):
            vectors = content_vectors(dataset_dir, cfg.content)
        empty = sp.csr_matrix((n, n), dtype=np.float32)  # a type without edges (e.g. its window is 0)
        weights = [nb.matrix if name == "walk" else graph.by_type.get(name, empty) for name in cfg.tokens]
        g, d = len(cfg.tokens), vectors.shape[1]
        task = bar.add_task("pool", total=n)

        def blocks(weights: list[Any], vectors: np.ndarray) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
            for lo, tokens, mask in pooled_blocks(weights, vectors):
                with_token[:-1] += mask.sum(axis=0)
                with_token[-1] += int(mask.any(axis=1).sum())
                yield lo, tokens, mask, graph_hashes(tokens, mask, cfg.tokens)
                bar.advance(task, len(mask))

        with_token = np.zeros(g + 1, np.int64)  # per token, then with any token
        with steps("pool and write features"):
            artifact.write_features(tmp / artifact.FEATURES_FILE, ids, blocks(weights, vectors), g, d)
        del vectors, weights
        if cfg.neighbours and nb is not None:
            with steps("write neighbours"):
                artifact.write_neighbours(tmp / artifact.NEIGHBOURS_FILE, ids, nb.matrix)
    last = graph.last_ms
    counts = {"products": n, "with_token": dict(zip(cfg.tokens, with_token[:-1].tolist())),
              "with_any_token": int(with_token[-1]),
              **graph.stats, "neighbours": int(nb.matrix.nnz) if nb is not None else 0}
    extra = {"graph_format": artifact.GRAPH_FORMAT, "tokens": list(cfg.tokens), "dim": int(d),
             "content": cfg.content, "train_last_ms": last,
             "train_last_timestamp": None if last is None else
             dt.datetime.fromtimestamp(last / 1000, dt.UTC).isoformat(timespec="milliseconds"),
             "timings": steps.timings}
    return {"counts": counts, "extra": extra}
