"""Ray Data engine (`itemsage embed ... --engine ray`, the optional `itemsage[ray]` extra): the same
engine-agnostic batch function (`embed_batch`) handed to Ray Data's `map_batches` to scale out across
machines. No resume: Ray re-runs failed tasks itself.
"""


from __future__ import annotations

import logging
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from itemsage import artifacts, schema
from itemsage.artifacts import ArtifactError
from itemsage.embed.graph_tokens import graph_inputs
from itemsage.embed.shards import EmbedSummary, _product_query, count_unreadable, embed_batch, shard_name

log = logging.getLogger(__name__)


class _RayEmbedder:
    """Ray actor UDF: loads the model once per actor, then embeds each batch with `embed_batch`."""

    def __init__(self, model_dir: str, dataset_dir: str, graph_dir: str | None = None, no_graph: bool = False) -> None:
        from itemsage.model.model import load_model

        self.model = load_model(model_dir)
        # A model that reads graph tokens: each actor reads the graph features once, as the model.
        self.graph, _ = graph_inputs(Path(model_dir), Path(dataset_dir), graph_dir, no_graph)

    def __call__(self, batch: pa.Table) -> pa.Table:
        return embed_batch(self.model, batch, self.graph)


def embed_with_ray(
    model_dir: str | Path,
    dataset_dir: str | Path,
    out_dir: str | Path,
    batch_size: int = 1024,
    *,
    concurrency: int = 2,
    num_gpus: float = 0,
    graph_dir: str | Path | None = None,
    no_graph: bool = False,
) -> EmbedSummary:
    """Embed the catalog with Ray Data: `read_parquet(...).map_batches(actor UDF, batch_format='pyarrow')`.

    Needs the optional extra: `pip install 'itemsage[ray]'`. Connects to the running Ray cluster, or
    starts a local one. Not resumable shard by shard (Ray retries failed tasks itself) and not
    incremental: `out_dir` must be empty or absent. Shards are renamed part-00000.parquet, ... and
    the manifest is written last, like `embed`.
    """
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as err:
        raise ImportError("embed_with_ray needs Ray Data, an optional extra: pip install 'itemsage[ray]' "
                          "(or use the local engine: itemsage embed --engine local).") from err
    started = time.perf_counter()
    model_dir, dataset_dir, out_dir = Path(model_dir), Path(dataset_dir), Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ArtifactError(f"{out_dir} is not empty; the Ray engine writes a fresh directory. Pass a new "
                            "--out directory (or use --engine local to resume or update).")
    model_fp = artifacts.fingerprint(model_dir)
    staged = artifacts.read_manifest(dataset_dir).get("kind") == "catalog"  # embed --catalog's checked copy
    # Refuses an unfinished or corrupted dataset, naming the file.
    artifacts.verify_dataset(dataset_dir, kind="catalog" if staged else "dataset")
    dataset_fp = artifacts.fingerprint(dataset_dir)
    artifacts.verify_manifest(model_dir, kind="model")
    config = artifacts.read_json(model_dir / "config.json")
    text_fields = config["model"]["text_fields"]
    products = dataset_dir / schema.PRODUCTS_FILE
    names = pq.ParquetFile(products).schema_arrow.names
    columns = [c for c in names if c in (schema.PRODUCT_ID, schema.IMAGE_EMBEDDINGS, schema.CONTENT_HASH,
                                         schema.QUERY_VECTOR, *text_fields)]
    product_query = _product_query(dataset_dir, pq.ParquetFile(products))
    _, graph_fp = graph_inputs(model_dir, dataset_dir, graph_dir, no_graph, staged)  # refuses before any work

    ray.init(ignore_reinit_error=True)
    staging = out_dir / ".ray-staging"
    dataset = ray.data.read_parquet(str(products), columns=columns)
    dataset.map_batches(
        _RayEmbedder, fn_constructor_args=(str(model_dir), str(dataset_dir), None if graph_dir is None else str(graph_dir),
                                           no_graph), batch_size=batch_size,
        batch_format="pyarrow", concurrency=concurrency, num_gpus=num_gpus,
    ).write_parquet(str(staging))

    written = sorted(staging.glob("*.parquet"))  # Ray's own names; order does not matter for an index
    shard_names = [shard_name(s) for s in range(len(written))]
    count, dim = 0, int(config["model"]["out_dim"])
    for path, name in zip(written, shard_names):
        count += pq.ParquetFile(path).metadata.num_rows
        path.replace(out_dir / name)
    for leftover in staging.glob("*"):
        leftover.unlink()
    staging.rmdir()
    from itemsage.model.model import load_model

    unreadable = count_unreadable(load_model(model_dir), pq.ParquetFile(products))  # as the local engine counts
    artifacts.write_manifest(
        out_dir, "embeddings",
        config={"batch_size": batch_size, "engine": "ray", "concurrency": concurrency},
        inputs={"model": model_fp, "dataset": dataset_fp, **({"graph": graph_fp} if graph_fp else {})},
        counts={"products": count, "unreadable": unreadable},
        files=shard_names,
        extra={"count": count, "dim": dim, "shards": shard_names, "generation": 0,
               "dataset_dir": str(dataset_dir.resolve()),  # itemsage index reads the attributes there
               **({schema.PRODUCT_QUERY: product_query} if product_query else {})},
    )
    seconds = time.perf_counter() - started
    return EmbedSummary(out_dir, count, dim, len(shard_names), count, 0, 0, 0, seconds, model_fp, dataset_fp, 0,
                        unreadable)
