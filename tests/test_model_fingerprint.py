"""A model's fingerprint covers what its weights are a function of, not timings: two identical
training runs give the same fingerprint (and the same bytes), so the embeddings and index of one
serve the other; and a saved model's bytes do not depend on the save."""

from __future__ import annotations

import json

import torch
from test_train import make_dataset, tiny

from itemsage import artifacts
from itemsage.data.text import Vocabulary
from itemsage.model.config import model_config
from itemsage.model.model import load_model, save_model
from itemsage.model.tower import ItemSage, QueryAdapters


def test_identical_runs_give_the_same_model_fingerprint(tmp_path):
    from itemsage.embed.shards import embed
    from itemsage.index.build import build_from_embeddings
    from itemsage.serve.service import Service
    from itemsage.train.loop import train

    dataset = make_dataset(tmp_path / "data")
    cfg = tiny(max_steps=4, eval_every=2)
    first = train(dataset, tmp_path / "one", cfg, progress=False)
    second = train(dataset, tmp_path / "two", cfg, progress=False)
    for name in ("model.safetensors", "config.json", "vocab.json"):
        assert (first.model_dir / name).read_bytes() == (second.model_dir / name).read_bytes(), name
    assert artifacts.fingerprint(first.model_dir) == artifacts.fingerprint(second.model_dir)
    # the run's speed is still recorded, outside what the fingerprint covers
    timings = artifacts.read_manifest(first.model_dir)["timings"]
    assert timings["pairs_per_s"] == first.pairs_per_s > 0
    assert "pairs_per_s" not in json.loads((first.model_dir / "config.json").read_text())["extra"]["training"]
    # so the index built from the first model's embeddings serves the second model
    embed(first.model_dir, dataset, tmp_path / "emb", progress=False)
    build_from_embeddings(tmp_path / "emb", tmp_path / "index")
    service = Service(second.model_dir, tmp_path / "index")
    assert service.model.fingerprint == artifacts.fingerprint(first.model_dir)


def test_saving_the_same_model_writes_the_same_bytes(tmp_path):
    """safetensors writes its metadata map in a random order: with two keys, 20 saves of one model
    came out in two byte orders (the chance of 20 equal ones is 2^-19)."""
    torch.manual_seed(0)
    cfg = model_config("tiny")
    vocab = Vocabulary.build([["oak chair"], ["pine table"]])
    tower, adapters = ItemSage(cfg, len(vocab), 8), QueryAdapters({"closeup": 8}, cfg.out_dim)
    saved = set()
    for i in range(20):
        save_model(tmp_path / f"m{i}", tower, adapters, cfg, vocab, image_dim=8, query_dims={"closeup": 8})
        saved.add(((tmp_path / f"m{i}" / "model.safetensors").read_bytes(), artifacts.fingerprint(tmp_path / f"m{i}")))
    assert len(saved) == 1


def test_a_model_saved_with_timings_in_its_config_still_loads(tmp_path):
    """Models saved before (config.json's extra.training.pairs_per_s, two metadata keys) load, and
    keep the fingerprint their embeddings and indexes recorded."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    cfg = model_config("tiny")
    vocab = Vocabulary.build([["oak chair"], ["pine table"]])
    directory = tmp_path / "old"
    save_model(directory, ItemSage(cfg, len(vocab), 8), QueryAdapters({"closeup": 8}, cfg.out_dim), cfg, vocab,
               image_dim=8, query_dims={"closeup": 8}, extra={"training": {"steps": 3}})
    tensors = {k: v for k, v in load_model(directory).model.state_dict().items()}
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt", "itemsage": "model"})
    config = json.loads((directory / "config.json").read_text())
    config["extra"]["training"]["pairs_per_s"] = 1234.5
    (directory / "config.json").write_text(json.dumps(config))
    manifest = artifacts.read_manifest(directory)
    artifacts.write_manifest(directory, "model", config=manifest["config"], inputs=manifest["inputs"],
                             counts=manifest["counts"], files=sorted(manifest["files"]))
    loaded = load_model(directory)
    assert loaded.fingerprint == artifacts.fingerprint(directory)
    assert loaded.extra["training"] == {"steps": 3, "pairs_per_s": 1234.5}
