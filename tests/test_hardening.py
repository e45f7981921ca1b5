"""Hardening of the batch stages (issue 12): verified datasets, files named in errors, nothing
stranded after a kill, an index build that can be finished, images refused before decoding.

Corruptions are made by hand (one flipped byte with the file's mtime put back, a truncation, a
broken JSON file); kills are simulated by the directories a killed run leaves, and (slow) by
SIGKILL of a real `ingest` subprocess at random points.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image
from test_embed import make_products, model_dir, write_dataset  # noqa: F401 - model_dir is a fixture
from test_index import ids_for, unit_vectors, write_embeddings
from test_ingest import SMALL, catalog_rows, log_rows, write
from test_train import make_dataset, tiny

from itemsage import artifacts, schema
from itemsage.artifacts import ArtifactError
from itemsage.data.ingest import DataError, IngestConfig, ingest
from itemsage.index.build import build_from_embeddings
from itemsage.index.config import IndexConfig
from itemsage.index.versions import current_version, load_current

DEAD_PID = 99_999_999  # above Linux's pid_max (4,194,304): never a running process


def flip_byte(path: Path, offset: int) -> None:
    """Flip one byte in place, keeping the size and putting the modification time back."""
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns


# ---- 5. datasets are verified before use, with a record that skips unchanged files ---------------


def test_verify_dataset_hashes_once_and_catches_a_flip_behind_an_old_mtime(tmp_path, monkeypatch):
    monkeypatch.setattr(artifacts, "_RACY_NS", 0)  # the files were written a moment ago
    data = write_dataset(tmp_path / "data", make_products(30))
    hashed = []
    real = artifacts.sha256_file
    monkeypatch.setattr(artifacts, "sha256_file", lambda p, *a: hashed.append(Path(p).name) or real(p, *a))
    artifacts.verify_dataset(data)
    assert hashed == [schema.PRODUCTS_FILE]  # first use: in full
    record = json.loads((data / artifacts.VERIFIED).read_text())
    assert record["files"][schema.PRODUCTS_FILE]["sha256"] == real(data / schema.PRODUCTS_FILE)
    hashed.clear()
    artifacts.verify_dataset(data)
    assert hashed == []  # unchanged: size, mtime, ctime and inode as recorded
    assert artifacts.VERIFIED not in artifacts.read_manifest(data)["files"]
    flip_byte(data / schema.PRODUCTS_FILE, 100)
    with pytest.raises(ArtifactError, match=f"{schema.PRODUCTS_FILE} does not match its manifest checksum"):
        artifacts.verify_dataset(data)


def test_a_recent_file_is_not_recorded(tmp_path):
    data = write_dataset(tmp_path / "data", make_products(5))
    artifacts.verify_dataset(data)  # written just now: within the coarse file-time tick
    assert artifacts._read_record(data) == {}  # so the next use hashes it again


def test_embed_refuses_a_flipped_byte_in_products(tmp_path, model_dir):  # noqa: F811
    from itemsage.embed.shards import embed

    data = write_dataset(tmp_path / "data", make_products(30))
    flip_byte(data / schema.PRODUCTS_FILE, (data / schema.PRODUCTS_FILE).stat().st_size // 2)
    with pytest.raises(ArtifactError, match=schema.PRODUCTS_FILE):
        embed(model_dir, data, tmp_path / "emb", progress=False)
    assert not list((tmp_path / "emb").glob("part-*"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A dataset (with manifest) and a one-step model trained on it."""
    from itemsage.train.loop import train

    base = tmp_path_factory.mktemp("trained")
    data = make_dataset(base / "data")
    result = train(data, base / "run", tiny(max_steps=1, eval_sample=0), progress=False)
    return data, result.model_dir


def test_evaluate_refuses_a_dataset_without_a_manifest(trained, tmp_path):
    from itemsage.evaluate.evaluation import evaluate

    data, model = trained
    copy = shutil.copytree(data, tmp_path / "data")
    (copy / artifacts.MANIFEST).unlink()
    with pytest.raises(ArtifactError, match="no manifest.json"):
        evaluate(model, copy, tmp_path / "embeddings")  # the dataset is checked first


def logs_files(data: Path) -> list[str]:
    """Every Parquet file of the dataset but the catalog: the log splits, whatever they are called."""
    return sorted(n for n in artifacts.read_manifest(data)["files"] if n.endswith(".parquet") and n != schema.PRODUCTS_FILE)


def test_evaluate_and_train_name_a_truncated_file(trained, tmp_path):
    from itemsage.evaluate.evaluation import evaluate
    from itemsage.train.loop import train

    data, model = trained
    names = logs_files(data)
    assert names
    for name in names:
        copy = shutil.copytree(data, tmp_path / f"data-{name}")
        with open(copy / name, "r+b") as f:
            f.truncate((copy / name).stat().st_size - 9)
        with pytest.raises(ArtifactError, match=f"{name} is .* bytes, its manifest says"):
            evaluate(model, copy, tmp_path / "embeddings")  # the dataset is checked first
        with pytest.raises(ArtifactError, match=name):
            train(copy, tmp_path / f"run-{name}", tiny(max_steps=1, eval_sample=0), progress=False)


def test_a_broken_json_file_is_named(trained, tmp_path):
    from itemsage.model.model import load_model

    _, model = trained
    copy = shutil.copytree(model, tmp_path / "model")
    manifest = json.loads((copy / artifacts.MANIFEST).read_text())
    (copy / "config.json").write_text('{"model": {"preset" "tiny"}}')  # a missing colon
    artifacts.write_manifest(copy, "model", config=manifest["config"], inputs=manifest["inputs"],
                             counts=manifest["counts"], files=sorted(manifest["files"]))  # checksums now agree
    with pytest.raises(ArtifactError, match=r"config\.json is not valid JSON \(Expecting ':' delimiter"):
        load_model(copy)
    (copy / artifacts.MANIFEST).write_text('{"kind": "model" "files": {}}')
    with pytest.raises(ArtifactError, match=r"manifest\.json is not valid JSON"):
        load_model(copy)


# ---- 6. nothing stranded after a kill: ingest's temp dirs, the rename window, index, reload ------


def ingest_inputs(tmp_path: Path) -> tuple[Path, Path]:
    return write(catalog_rows(), tmp_path / "in/catalog.parquet"), write(log_rows(), tmp_path / "in/logs.parquet")


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(out.name + "."))


def test_ingest_sweeps_the_temp_dirs_of_killed_runs(tmp_path):
    cat, logs = ingest_inputs(tmp_path)
    out = tmp_path / "ds"
    for name in (f"ds.tmp-{DEAD_PID}", f"ds.tmp-{DEAD_PID - 1}", f"ds.old-{DEAD_PID - 2}"):
        (tmp_path / name / ".scratch").mkdir(parents=True)
        (tmp_path / name / ".scratch" / "slab-0.arrow").write_bytes(b"x" * 1000)
    live = tmp_path / f"ds.tmp-{os.getppid()}"  # a running process (this one's parent): not touched
    live.mkdir()
    (tmp_path / "ds.tmp-backup").mkdir()  # not a name ingest writes
    ingest(cat, logs, out, IngestConfig(**SMALL))
    artifacts.verify_manifest(out, kind="dataset")
    assert leftovers(out) == sorted([live.name, "ds.tmp-backup"])


def test_a_kill_between_the_two_renames_is_recovered(tmp_path):
    cat, logs = ingest_inputs(tmp_path)
    ingest(cat, logs, tmp_path / "old", IngestConfig(**SMALL, validation_fraction=0.2))
    ingest(cat, logs, tmp_path / "new", IngestConfig(**SMALL, validation_fraction=0.3))
    new_manifest = artifacts.read_manifest(tmp_path / "new")
    out = tmp_path / "ds"
    # What _publish leaves when killed after `out -> out.old-PID`, before `out.tmp-PID -> out`:
    os.rename(tmp_path / "old", tmp_path / f"ds.old-{DEAD_PID}")
    os.rename(tmp_path / "new", tmp_path / f"ds.tmp-{DEAD_PID}")
    assert not out.exists()
    # The next run recovers before it reads its inputs, so even a run that fails leaves the dataset.
    with pytest.raises(DataError):
        ingest(cat, tmp_path / "in/missing.parquet", out, IngestConfig(**SMALL))
    assert artifacts.verify_manifest(out, kind="dataset") == new_manifest  # the newer, complete one
    assert leftovers(out) == []


def test_a_torn_temp_dir_is_not_recovered(tmp_path):
    cat, logs = ingest_inputs(tmp_path)
    ingest(cat, logs, tmp_path / "old", IngestConfig(**SMALL))
    torn = shutil.copytree(tmp_path / "old", tmp_path / f"ds.tmp-{DEAD_PID}")
    flip_byte(torn / schema.VOCAB_FILE, 3)
    os.rename(tmp_path / "old", tmp_path / f"ds.old-{DEAD_PID - 1}")
    from itemsage.data.ingest import recover_leftovers

    recover_leftovers(tmp_path / "ds")
    artifacts.verify_manifest(tmp_path / "ds", kind="dataset")  # the complete old one, not the torn tmp
    assert leftovers(tmp_path / "ds") == []


def test_index_rerun_publishes_a_version_killed_before_current(tmp_path):
    write_embeddings(tmp_path / "emb", ids_for(40), unit_vectors(40, 8, seed=2))
    root = tmp_path / "idx"
    build_from_embeddings(tmp_path / "emb", root, IndexConfig(kind="flat"), version="a")
    # Killed after the manifest of "b", before CURRENT moved: the same as building without publishing.
    build_from_embeddings(tmp_path / "emb", root, IndexConfig(kind="flat"), version="b", publish_it=False)
    assert current_version(root).name == "a"
    index, vdir = build_from_embeddings(tmp_path / "emb", root, IndexConfig(kind="flat"), version="b")
    assert vdir.name == "b" and load_current(root).version == "b" and len(index) == 40
    # Not the same build: still refused, and a corrupted finished version is not published.
    with pytest.raises(ArtifactError, match="already exists, built from other index options"):
        build_from_embeddings(tmp_path / "emb", root, IndexConfig(kind="hnsw"), version="b")
    write_embeddings(tmp_path / "emb2", ids_for(40), unit_vectors(40, 8, seed=3))
    with pytest.raises(ArtifactError, match="already exists, built from other embeddings"):
        build_from_embeddings(tmp_path / "emb2", root, IndexConfig(kind="flat"), version="b")
    build_from_embeddings(tmp_path / "emb", root, IndexConfig(kind="flat"), version="c", publish_it=False)
    flip_byte(root / "versions" / "c" / "index.faiss", 60)
    with pytest.raises(ArtifactError, match="index.faiss does not match"):
        build_from_embeddings(tmp_path / "emb", root, IndexConfig(kind="flat"), version="c")
    assert current_version(root).name == "b"


# ---- 4. images over the pixel limit are refused from the header (ingest's image paths) ------------


def test_image_encoder_refuses_too_many_pixels_before_decoding(tmp_path, monkeypatch):
    from PIL import ImageFile

    from itemsage.encoders.image import ImageEncoder

    big = tmp_path / "big.png"
    Image.new("1", (3000, 2000)).save(big)
    decoded = []
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self, *a, **k: decoded.append(self.size))
    vectors, errors = ImageEncoder(max_pixels=5_000_000).encode_paths([big], progress=False)
    assert errors[0] is not None and "6,000,000 pixels, over the limit of 5,000,000" in errors[0]
    assert "big.png" in errors[0] and decoded == [] and not vectors.any()


# ---- slow: SIGKILL of a real ingest at random points, then a re-run ------------------------------


@pytest.mark.slow
def test_ingest_killed_at_random_points_then_rerun(tmp_path):
    from itemsage.data.demo_shop import CATALOG_FILE, ENGAGEMENTS_FILE, DemoConfig, generate_demo_data

    generate_demo_data(tmp_path / "demo", DemoConfig(products=3000, days=7, image_dim=16), progress=False)
    out = tmp_path / "ds"
    src = str(Path(__file__).resolve().parents[1] / "src")
    code = ("import sys; from itemsage.data.ingest import IngestConfig, ingest; "
            "ingest(sys.argv[1], sys.argv[2], sys.argv[3], IngestConfig(progress=False, sort_rows=5000, batch_rows=4096))")
    argv = [sys.executable, "-c", code, str(tmp_path / "demo" / CATALOG_FILE),
            str(tmp_path / "demo" / ENGAGEMENTS_FILE), str(out)]
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}

    start = time.monotonic()
    subprocess.run(argv, env=env, check=True, capture_output=True)
    full = time.monotonic() - start  # one whole run, imports included
    reference = artifacts.read_manifest(out)["files"]
    rng = random.Random(12)
    kills, stranded = 0, 0
    for attempt in range(10):
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.3, full))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
        stranded += bool(leftovers(out))  # what this kill left for the next run to clean up
    assert kills >= 5 and stranded >= 3  # most attempts were killed mid-run, leaving a temp directory
    subprocess.run(argv, env=env, check=True, capture_output=True)
    manifest = artifacts.verify_manifest(out, kind="dataset")
    assert {n: m["sha256"] for n, m in manifest["files"].items()} == {n: m["sha256"] for n, m in reference.items()}
    assert leftovers(out) == []


def test_index_rerun_publishes_an_ivfpq_version_whose_sizes_came_from_the_catalog(tmp_path):
    # IVF-PQ's nlist/pq_m/nprobe given as 0 are resolved from the catalog and saved resolved: the
    # same build again must still be recognised (it was refused as "other index options").
    write_embeddings(tmp_path / "emb", ids_for(1200), unit_vectors(1200, 16, seed=4))
    root = tmp_path / "idx"
    build_from_embeddings(tmp_path / "emb", root, IndexConfig(kind="flat"), version="a")
    build_from_embeddings(tmp_path / "emb", root, IndexConfig(kind="ivfpq"), version="b", publish_it=False)
    index, vdir = build_from_embeddings(tmp_path / "emb", root, IndexConfig(kind="ivfpq"), version="b")
    assert vdir.name == "b" and load_current(root).version == "b" and index.config.nlist > 0
    with pytest.raises(ArtifactError, match="already exists, built from other index options"):
        build_from_embeddings(tmp_path / "emb", root, IndexConfig(kind="ivfpq", nlist=8), version="b")
