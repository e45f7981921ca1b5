"""Training loop tests on a tiny hand-written dataset directory (tiny preset, CPU, seconds)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from itemsage import artifacts, schema
from itemsage.config import ConfigError
from itemsage.data.text import Vocabulary
from itemsage.train.checkpoint import _flatten, _unflatten
from itemsage.train.config import TrainConfig
from itemsage.train.loop import Sampler, _loss_weights, _mixture, latest_checkpoint, load_pairs, train
from itemsage.train.optim import Lamb, advance, lr_at

IMAGE_DIM, SEARCH_DIM, HOME_DIM = 8, 12, 16  # home == tiny out_dim: an identity adapter
BRANDS = ["acme", "birch", "cobalt", "delta"]
COLOURS = ["red", "green", "blue"]


def make_dataset(root: Path, n_products: int = 48, n_train: int = 600, n_eval: int = 120, seed: int = 0,
                 n_test: int = 90) -> Path:
    """A dataset directory in the format `itemsage ingest` writes (docs/ARCHITECTURE.md), with
    queries that carry signal: closeup = a noisy copy of the product's main image, search and home =
    fixed random projections of a latent vector the images also depend on."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    latent = rng.normal(size=(n_products, 6)).astype(np.float32)
    to_image = rng.normal(size=(6, IMAGE_DIM)).astype(np.float32)
    ids = [f"p{i:03d}" for i in range(n_products)]
    products: dict[str, list] = {schema.PRODUCT_ID: ids}
    for f in schema.TEXT_FIELDS:
        products[f] = [[] for _ in ids]
    products["brand"] = [[BRANDS[i % 4]] for i in range(n_products)]
    products["colors"] = [[COLOURS[i % 3]] for i in range(n_products)]
    products["title"] = [[f"{BRANDS[i % 4]} {COLOURS[i % 3]} chair {i}"] for i in range(n_products)]
    images = []
    for i in range(n_products):
        k = 1 + i % 3
        main = latent[i] @ to_image
        images.append([(main + 0.1 * rng.normal(size=IMAGE_DIM)).astype(np.float32).tolist() for _ in range(k)])
    products[schema.IMAGE_EMBEDDINGS] = images
    products[schema.CONTENT_HASH] = [f"h{i}" for i in range(n_products)]
    table = pa.table(products, schema=pa.schema(
        [(schema.PRODUCT_ID, pa.string())] + [(f, pa.list_(pa.string())) for f in schema.TEXT_FIELDS]
        + [(schema.IMAGE_EMBEDDINGS, pa.list_(pa.list_(pa.float32()))), (schema.CONTENT_HASH, pa.string())]))
    pq.write_table(table, root / schema.PRODUCTS_FILE)
    Vocabulary.build(v for f in schema.TEXT_FIELDS for v in products[f]).save(root / schema.VOCAB_FILE)

    to_search = rng.normal(size=(6, SEARCH_DIM)).astype(np.float32)
    to_home = rng.normal(size=(6, HOME_DIM)).astype(np.float32)
    engagement_p = [0.7, 0.2, 0.07, 0.03]

    def logs(n: int, start_ms: int) -> pa.Table:
        surface = rng.choice(schema.SURFACES, n, p=[0.4, 0.4, 0.2])
        engagement = rng.choice(schema.ENGAGEMENTS, n, p=engagement_p)
        product = rng.integers(0, n_products, n)
        vectors = []
        for s, p in zip(surface, product):
            if s == "closeup":
                v = np.asarray(images[p][0]) + 0.2 * rng.normal(size=IMAGE_DIM)
            elif s == "search":  # few distinct queries: quantised latent, so queries repeat
                v = np.round(latent[p]) @ to_search
            else:
                v = latent[p] @ to_home + 0.3 * rng.normal(size=HOME_DIM)
            vectors.append(np.asarray(v, np.float32).tolist())
        return pa.table({
            schema.SURFACE: surface.tolist(), schema.ENGAGEMENT: engagement.tolist(),
            schema.PRODUCT_ID: [ids[p] for p in product],
            schema.TIMESTAMP: pa.array(start_ms + np.arange(n) * 1000, pa.timestamp("ms", tz="UTC")),
            schema.USER_ID: pa.array([None] * n, pa.string()),
            schema.WEIGHT: pa.array(np.ones(n, np.float32)),
            schema.QUERY_TEXT: pa.array([None] * n, pa.string()),
            schema.QUERY_EMBEDDING: pa.array(vectors, pa.list_(pa.float32())),
        })

    pq.write_table(logs(n_train, 0), root / schema.TRAIN_FILE)
    pq.write_table(logs(n_eval, 10**9), root / schema.VALIDATION_FILE)
    pq.write_table(logs(n_test, 2 * 10**9), root / schema.TEST_FILE)
    artifacts.write_manifest(root, "dataset")  # train verifies its dataset against the manifest
    return root


@contextlib.contextmanager
def killed_at_draw(monkeypatch, n: int):
    """Within the block, the n-th draw of a batch's positives raises KeyboardInterrupt (a kill)."""
    import itemsage.train.loop as train_module

    real, calls = train_module.Sampler.positives, {"n": 0}

    def dying(self, b):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt("killed")
        return real(self, b)

    monkeypatch.setattr(train_module.Sampler, "positives", dying)
    try:
        yield
    finally:
        monkeypatch.setattr(train_module.Sampler, "positives", real)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data"))


def tiny(**kw) -> TrainConfig:
    base = dict(preset="tiny", batch_size=16, random_negatives_ratio=2, max_steps=6, warmup_steps=2, lr=3e-3,
                checkpoint_every=0, eval_every=0, eval_sample=60, device="cpu", seed=3)
    return TrainConfig(**(base | kw))


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(model_dir / "model.safetensors"))


# ---- config --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw, option", [
    (dict(batch_size=0), "train.batch_size"),
    (dict(negatives="hard"), "train.negatives"),
    (dict(optimizer="sgd"), "train.optimizer"),
    (dict(lr=-1.0), "train.lr"),
    (dict(tasks=("search.like",)), "train.tasks"),
    (dict(max_steps=None, max_minutes=None), "train.max_steps"),
    (dict(upweight_conversions=0), "train.upweight_conversions"),
    (dict(engagement_weights={"purchase": 2.0}), "train.engagement_weights"),
    (dict(preset="huge"), "train.preset"),
    (dict(model={"aggregator": "mean"}), "model.aggregator"),
    (dict(random_negatives_ratio=0), "train.random_negatives_ratio"),
    (dict(patience=-1), "train.patience"),
])
def test_bad_config_is_refused_by_name(kw, option):
    with pytest.raises(ConfigError, match=option.replace(".", r"\.")):
        tiny(**kw)


def test_batch_size_error_message_shows_value():
    with pytest.raises(ConfigError, match=r"train\.batch_size \(0\) must be an integer >= 2"):
        tiny(batch_size=0)


# ---- pieces against references -------------------------------------------------------------------


def test_lr_schedule_hand_computed():
    assert lr_at(0, 20, 2, 1.0) == pytest.approx(0.5)
    assert lr_at(1, 20, 2, 1.0) == pytest.approx(1.0)
    assert lr_at(2, 20, 2, 1.0) == pytest.approx(1.0)  # cosine starts at the peak
    assert lr_at(11, 20, 2, 1.0) == pytest.approx(0.5)  # halfway through the decay
    assert lr_at(20, 20, 2, 1.0) == pytest.approx(0.0)
    # warm-up capped at a tenth of the run: 100 asked, 2 of 20 used
    assert lr_at(0, 20, 100, 1.0) == pytest.approx(0.5) and lr_at(11, 20, 100, 1.0) == pytest.approx(0.5)


def test_lamb_matches_numpy_reference():
    g = torch.Generator().manual_seed(0)
    p0 = torch.randn(5, 3, generator=g, dtype=torch.float64)
    grads = [torch.randn(5, 3, generator=g, dtype=torch.float64) for _ in range(3)]
    p = torch.nn.Parameter(p0.clone())
    opt = Lamb([p], lr=0.1, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.01)
    for grad in grads:
        p.grad = grad.clone()
        opt.step()
    # reference: the LAMB update written out in numpy
    x, m, v = p0.numpy().copy(), np.zeros((5, 3)), np.zeros((5, 3))
    for t, grad in enumerate(grads, start=1):
        gr = grad.numpy()
        m = 0.9 * m + 0.1 * gr
        v = 0.99 * v + 0.01 * gr**2
        u = (m / (1 - 0.9**t)) / (np.sqrt(v / (1 - 0.99**t)) + 1e-6) + 0.01 * x
        x = x - 0.1 * (np.linalg.norm(x) / np.linalg.norm(u)) * u
    np.testing.assert_allclose(p.detach().numpy(), x, rtol=1e-10)


def test_state_flatten_roundtrip_keeps_int_keys_and_tensors():
    param = torch.nn.Parameter(torch.randn(3))
    opt = torch.optim.AdamW([param])
    param.grad = torch.ones(3)
    opt.step()
    tensors: dict = {}
    skeleton = json.loads(json.dumps(_flatten(opt.state_dict(), "opt", tensors)))
    back = _unflatten(skeleton, tensors)
    assert list(back["state"]) == [0]
    torch.testing.assert_close(back["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    opt2 = torch.optim.AdamW([torch.nn.Parameter(torch.randn(3))])
    opt2.load_state_dict(back)  # loads without complaint, betas as a list included


def test_load_pairs_dedupes_queries_and_keys_them(dataset):
    from itemsage.model.batch import ProductStore

    vocab = Vocabulary.load(dataset / schema.VOCAB_FILE)
    store = ProductStore.from_dataset(dataset, vocab, schema.TEXT_FIELDS, 20, progress=False)
    pairs = load_pairs(dataset, schema.TRAIN_FILE, store)
    table = pq.read_table(dataset / schema.TRAIN_FILE)
    assert len(pairs) == table.num_rows
    vecs = table[schema.QUERY_EMBEDDING].to_pylist()
    for i in range(0, len(pairs), 37):  # each row's query vector is its own, exactly
        s = pairs.surface[i]
        np.testing.assert_array_equal(pairs.queries[s][pairs.query_row[i]].numpy(), np.float32(vecs[i]))
        assert store.ids[pairs.product_row[i]] == table[schema.PRODUCT_ID][i].as_py()
    # equal (surface, vector) <=> equal key; search queries repeat by construction
    seen = {}
    for i in range(len(pairs)):
        ident = (pairs.surface[i], tuple(vecs[i]))
        assert seen.setdefault(ident, pairs.query_key[i]) == pairs.query_key[i]
    assert len(set(seen.values())) == len(seen)
    assert len(pairs.queries["search"]) < (pairs.surface == "search").sum()


def test_tasks_filter_and_conversion_upweighting(dataset):
    from itemsage.model.batch import ProductStore

    vocab = Vocabulary.load(dataset / schema.VOCAB_FILE)
    store = ProductStore.from_dataset(dataset, vocab, schema.TEXT_FIELDS, 20, progress=False)
    only = load_pairs(dataset, schema.TRAIN_FILE, store, tasks=("closeup.click", "search.checkout"))
    assert set(only.task) <= {"closeup.click", "search.checkout"} and len(only) > 0

    pairs = load_pairs(dataset, schema.TRAIN_FILE, store)
    cfg = tiny(upweight_conversions=5.0, engagement_weights={"save": 2.0})
    probs = _mixture(pairs, cfg)
    conv = np.isin(pairs.engagement, ["add_to_cart", "checkout"])
    sampler = Sampler(probs, len(store), seed=0)
    draws = np.concatenate([sampler.positives(1000) for _ in range(40)])
    expected = 5 * conv.sum() / (5 * conv.sum() + (~conv).sum())
    assert abs(conv[draws].mean() - expected) < 0.01  # 40k draws: sd ~ 0.002
    w = _loss_weights(pairs, cfg)
    np.testing.assert_array_equal(w, np.where(pairs.engagement == "save", 2.0, 1.0).astype(np.float32))


# ---- the loop ------------------------------------------------------------------------------------


def test_train_writes_model_and_learns(dataset, tmp_path):
    cfg = tiny(max_steps=60, eval_sample=5000)  # more than the window: every validation pair
    result = train(dataset, tmp_path / "run", cfg, progress=False)
    assert result.steps == 60 and result.pairs_per_s > 0
    from itemsage.model.model import load_model

    loaded = load_model(result.model_dir)
    assert loaded.extra["train_config"]["batch_size"] == 16
    assert set(loaded.query_dims) == {"closeup", "home", "search"} and loaded.adapters.is_identity("home")
    assert (tmp_path / "run" / "tensorboard").is_dir()
    # Recall@10 among 48 products: random is 10/48 ~ 0.21; the queries carry strong signal.
    assert result.final_recall["all"]["recall@10"] > 0.5, result.final_recall
    # measured on the validation window (120 rows), never the test window (90)
    assert result.final_recall["all"]["n"] == 120
    assert loaded.extra["training"]["best_step"] == result.best_step == 60  # the only evaluation
    assert not (tmp_path / "run" / "best").exists()


def scripted_recall(monkeypatch, values: list[float]) -> list[float]:
    """held_out_recall returning `values` in turn (Recall@10 of `all`); returns the list it consumes."""
    import itemsage.train.loop as train_module

    queue = list(values)

    def fake(model, store, pairs, device, chunk=2048):
        r = queue.pop(0)
        return {"all": {"recall@1": r, "recall@10": r, "recall@100": r, "n": len(pairs)}}

    monkeypatch.setattr(train_module, "held_out_recall", fake)
    return queue


def test_early_stopping_keeps_the_best_checkpoint(dataset, tmp_path, monkeypatch):
    # evaluations after steps 1, 2, 3, ...: best at step 2, then 2 without a gain -> stop after step 4
    left = scripted_recall(monkeypatch, [0.1, 0.3, 0.2, 0.3, 0.9, 0.9])
    cfg = tiny(max_steps=20, eval_every=1, patience=2, checkpoint_every=1, keep_checkpoints=20)
    result = train(dataset, tmp_path / "run", cfg, progress=False)
    assert result.steps == 4 and result.stopped_early and result.best_step == 2
    assert left == [0.9, 0.9]  # no evaluation after the stop
    assert result.final_recall["all"]["recall@10"] == 0.3
    from itemsage.model.model import load_model

    summary = load_model(result.model_dir).extra["training"]
    assert summary["best_step"] == 2 and summary["steps"] == 4 and summary["stopped_early"]
    # model/ holds the step-2 weights, not the last step's
    at = {s: load_file(str(tmp_path / f"run/checkpoints/step-{s:08d}/state.safetensors")) for s in (2, 4)}
    saved = weights(result.model_dir)
    keys = [k for k in ("tower.head.fc2.weight", "adapters.search.weight") if k in saved]
    assert "tower.head.fc2.weight" in keys  # the comparison below must check something
    for key in keys:
        assert torch.equal(saved[key], at[2][f"state.model.{key}"]), key
        assert not torch.equal(saved[key], at[4][f"state.model.{key}"]), key
    # patience 0: no early stop, the run goes to its step budget and still keeps the best
    scripted_recall(monkeypatch, [0.5, 0.1, 0.1, 0.1, 0.1])
    result = train(dataset, tmp_path / "no_patience", tiny(max_steps=5, eval_every=1, patience=0), progress=False)
    assert result.steps == 5 and not result.stopped_early and result.best_step == 1


def test_an_empty_validation_window_keeps_the_last_step(dataset, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(dataset, data)
    validation = pq.read_table(data / schema.VALIDATION_FILE)
    pq.write_table(validation.slice(0, 0), data / schema.VALIDATION_FILE)
    artifacts.write_manifest(data, "dataset")  # the dataset as if ingest had written it so
    result = train(data, tmp_path / "run", tiny(max_steps=3, eval_every=1, checkpoint_every=3), progress=False)
    assert result.steps == 3 and result.best_step is None and result.final_recall == {}
    last = load_file(str(tmp_path / "run/checkpoints/step-00000003/state.safetensors"))
    saved = weights(result.model_dir)
    for key in saved:
        assert torch.equal(saved[key], last[f"state.model.{key}"]), key


def test_resume_keeps_the_best_so_far_and_the_patience_count(dataset, tmp_path, monkeypatch):
    recall = [0.1, 0.3, 0.2, 0.25, 0.2, 0.1, 0.1, 0.1]  # after steps 1..8; best at 2, patience 3 -> stop at 5
    cfg = tiny(max_steps=8, eval_every=1, patience=3, checkpoint_every=3)
    scripted_recall(monkeypatch, recall)
    straight = train(dataset, tmp_path / "straight", cfg, progress=False)
    assert (straight.steps, straight.best_step, straight.stopped_early) == (5, 2, True)

    scripted_recall(monkeypatch, recall[:3])  # killed while drawing step 4's batch: evaluations 1..3 done
    # The batches are drawn one step ahead (train.Prefetch): the 5th draw is step 4's start.
    with killed_at_draw(monkeypatch, 5), pytest.raises(KeyboardInterrupt):
        train(dataset, tmp_path / "killed", cfg, progress=False)
    scripted_recall(monkeypatch, recall[3:])
    resumed = train(dataset, tmp_path / "killed", cfg, progress=False, resume=True)
    assert (resumed.resumed_from, resumed.steps, resumed.best_step, resumed.stopped_early) == (3, 5, 2, True)
    a, b = weights(straight.model_dir), weights(resumed.model_dir)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # resuming a run that stopped early does not train on
    scripted_recall(monkeypatch, [0.0])
    again = train(dataset, tmp_path / "killed", cfg, progress=False, resume=True)
    assert again.steps == 5 and again.best_step == 2
    for k in a:
        assert torch.equal(a[k], weights(again.model_dir)[k]), k


def test_resume_after_kill_is_bit_identical(dataset, tmp_path, monkeypatch):
    cfg = tiny(max_steps=7, checkpoint_every=3, model={"dropout": 0.2}, eval_sample=0)
    straight = train(dataset, tmp_path / "straight", cfg, progress=False)

    # Kill the second run while it draws step 6's batch (after the step-3 checkpoint, before step 6's).
    # Batches are built in the background thread here (the harder case: the sampler runs a batch ahead).
    import itemsage.train.loop as train_module

    monkeypatch.setattr(train_module, "_PREFETCH_THREAD", True)

    with killed_at_draw(monkeypatch, 6), pytest.raises(KeyboardInterrupt):
        train(dataset, tmp_path / "killed", cfg, progress=False)
    assert latest_checkpoint(tmp_path / "killed").name == "step-00000003"
    # a torn newer checkpoint (no manifest) must be skipped
    (tmp_path / "killed" / "checkpoints" / "step-00000005").mkdir()
    with pytest.raises(ConfigError, match="--resume"):
        train(dataset, tmp_path / "killed", cfg, progress=False)
    resumed = train(dataset, tmp_path / "killed", cfg, progress=False, resume=True)
    assert resumed.resumed_from == 3 and resumed.steps == 7

    a, b = weights(straight.model_dir), weights(resumed.model_dir)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # and the runs really trained: weights moved from their initial values
    fresh = train(dataset, tmp_path / "short", tiny(max_steps=1, model={"dropout": 0.2}, eval_sample=0), progress=False)
    assert not torch.equal(weights(fresh.model_dir)["tower.head.fc2.weight"], a["tower.head.fc2.weight"])


def test_resume_with_more_steps_extends_an_unfinished_run(dataset, tmp_path, monkeypatch):
    """--resume --steps N (larger) continues a killed run to N steps; the rest of the cosine decay is
    spread over the steps now left, so the learning rate does not jump; a finished run says how."""
    cfg = tiny(max_steps=7, checkpoint_every=3, keep_checkpoints=9, eval_sample=0)
    with killed_at_draw(monkeypatch, 5), pytest.raises(KeyboardInterrupt):
        train(dataset, tmp_path / "run", cfg, progress=False)
    monkeypatch.undo()
    assert latest_checkpoint(tmp_path / "run").name == "step-00000003"
    longer = dataclasses.replace(cfg, max_steps=10)
    resumed = train(dataset, tmp_path / "run", longer, progress=False, resume=True)
    assert (resumed.resumed_from, resumed.steps) == (3, 10)

    def schedule(step: int) -> dict:
        return json.loads((tmp_path / f"run/checkpoints/step-{step:08d}/state.json").read_text())["schedule"]

    # Warm-up 0 (a tenth of 7 steps, rounded down): 3 steps of 7 done 3/7 of the decay; the 4/7 left is
    # spread over the 7 steps now left, 4/49 a step, so after step 6 it is 3/7 + 3 x 4/49 = 33/49.
    assert schedule(3)["progress"] == pytest.approx(3 / 7) and schedule(3)["total_steps"] == 7
    assert schedule(6)["progress"] == pytest.approx(33 / 49) and schedule(6)["total_steps"] == 10
    assert schedule(10)["progress"] == pytest.approx(1.0)
    saved = json.loads((resumed.model_dir / "config.json").read_text())["extra"]["train_config"]
    assert saved["max_steps"] == 10 and saved["warmup_steps"] == 0  # the warm-up the run had (not 2 again)
    # a finished run cannot be extended: the refusal says how to train longer (resumed as the CLI does,
    # from the checkpoint's options)
    from itemsage.train.config import checkpoint_config

    again = dataclasses.replace(checkpoint_config(tmp_path / "run"), max_steps=12)
    with pytest.raises(ConfigError, match=r"finished its schedule .* at step 10.*--config .*config.json --steps 12"):
        train(dataset, tmp_path / "run", again, progress=False, resume=True)


def test_background_batches_train_exactly_like_inline_ones(dataset, tmp_path, monkeypatch):
    import itemsage.train.loop as train_module

    results = {}
    for background in (True, False):
        monkeypatch.setattr(train_module, "_PREFETCH_THREAD", background)
        run = train(dataset, tmp_path / f"run-{background}", tiny(max_steps=4, eval_sample=0), progress=False)
        results[background] = weights(run.model_dir)
    for k in results[True]:
        assert torch.equal(results[True][k], results[False][k]), k


def test_resume_refuses_changed_options(dataset, tmp_path):
    train(dataset, tmp_path / "run", tiny(max_steps=2, eval_sample=0), progress=False)
    with pytest.raises(ConfigError, match=r"train\.lr"):
        train(dataset, tmp_path / "run", tiny(max_steps=2, eval_sample=0, lr=0.5), progress=False, resume=True)


@pytest.mark.parametrize("negatives, optimizer", [("in_batch", "lamb"), ("random", "adamw")])
def test_negative_modes_and_lamb_train(dataset, tmp_path, negatives, optimizer):
    """Each ablation takes only its own term of the loss, and the optimiser moves every weight."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from itemsage.model.model import ItemSageModel, load_model

    cfg = tiny(max_steps=3, negatives=negatives, optimizer=optimizer)
    result = train(dataset, tmp_path / "run", cfg, progress=False)
    assert result.steps == 3 and math.isfinite(result.final_loss)
    events = EventAccumulator(str(tmp_path / "run" / schema.TENSORBOARD_DIR)).Reload()
    series = {tag: [e.value for e in events.Scalars(tag)] for tag in ("loss/total", "loss/in_batch", "loss/random")}
    unused = "loss/random" if negatives == "in_batch" else "loss/in_batch"
    used = "loss/in_batch" if negatives == "in_batch" else "loss/random"
    assert len(series["loss/total"]) == 3 and all(v == 0 for v in series[unused])
    np.testing.assert_allclose(series[used], series["loss/total"], rtol=1e-6)
    assert all(v > 0 for v in series[used])
    loaded = load_model(result.model_dir)
    torch.manual_seed(cfg.seed)  # train's initial weights: the same seed, the same build
    initial = ItemSageModel.build(loaded.config, len(loaded.vocab), loaded.image_dim, loaded.query_dims).state_dict()
    moved = {k: not torch.equal(v, initial[k]) for k, v in loaded.model.state_dict().items() if v.is_floating_point()}
    assert moved["tower.head.fc2.weight"] and moved["logit_scale.log_scale"]
    assert sum(moved.values()) >= 0.8 * len(moved), [k for k, m in moved.items() if not m]


def test_clock_turns_minute_budget_into_steps_and_re_estimates():
    from itemsage.train.clock import Clock

    t = [0.0]
    clock = Clock(tiny(max_steps=None, max_minutes=1.0), world=1, device=torch.device("cpu"), calibrated=False,
                  now=lambda: t[0])
    total = None
    for step in range(1, 12):  # 0.5 s per step; the first step is not timed
        t[0] += 0.5
        total = clock.tick(step, total, 0.5)
    # 10 timed steps in 5 s = 2 steps/s; at 5.5 s, 98% of 60 s leaves 53.3 s -> 106 more steps
    assert total == 11 + 106
    assert clock.pairs_per_s == pytest.approx(16 / 0.5)
    for step in range(12, 22):  # the machine slows to 1 s a step: re-estimated after 10 more steps
        t[0] += 1.0
        total = clock.tick(step, total, 1.0)
    # 10 steps in the last 10 s = 1 step/s; at 15.5 s, 58.8 - 15.5 = 43.3 s left -> 43 more steps
    assert total == 21 + 43
    t[0] = 60.1  # past the budget: stop now, whatever the schedule says
    assert clock.tick(50, total, 0.5) == 50


def test_minute_budget_logs_its_first_estimate_not_every_re_estimate(caplog):
    """The demo's output had an INFO line every ~10 steps (each re-estimate moved the total by a few
    steps); only the first estimate is news at INFO, the rest go to DEBUG."""
    from itemsage.train.clock import Clock

    t = [0.0]
    clock = Clock(tiny(max_steps=None, max_minutes=1.0), world=1, device=torch.device("cpu"), calibrated=False,
                  now=lambda: t[0])
    total = None
    with caplog.at_level(logging.DEBUG, logger="itemsage.train"):
        for step in range(1, 60):  # a machine whose speed drifts: every re-estimate moves the total
            t[0] += 0.5 + 0.01 * step
            total = clock.tick(step, total, 0.5)
    budget = [r for r in caplog.records if r.getMessage().startswith("minute budget")]
    assert len(budget) >= 4  # the re-estimates are still there, for debugging
    assert [r.levelno for r in budget] == [logging.INFO] + [logging.DEBUG] * (len(budget) - 1)


@pytest.mark.parametrize("slow_after_s", [20.0, 1e9])
def test_minute_budget_run_uses_the_budget_and_ends_its_schedule(slow_after_s):
    # A simulated 2-minute run whose steps take 0.2 s, then 0.6 s after `slow_after_s` (a busy shared
    # machine). The run must use most of its budget, stop by itself (not at the hard stop), and the
    # cosine must end at the step it reaches, without the learning rate ever jumping up.
    from itemsage.train.clock import Clock

    cfg = tiny(max_steps=None, max_minutes=2.0, warmup_steps=5)
    t = [0.0]
    clock = Clock(cfg, world=1, device=torch.device("cpu"), calibrated=False, now=lambda: t[0])
    step, total, progress, lrs = 0, None, 0.0, []
    while total is None or step < total:
        lrs.append(lr_at(step, total or 10**9, cfg.warmup_steps, 1.0, progress))
        progress = advance(progress, step, total or 10**9, cfg.warmup_steps)
        dt = 0.2 if t[0] < slow_after_s else 0.6
        t[0] += dt
        step += 1
        total = clock.tick(step, total, dt)
    assert 0.9 * 120 <= t[0] <= 120, t[0]  # used the budget, and ended before the hard stop
    assert progress == pytest.approx(1.0)  # the decay is complete at the final step reached
    assert lrs[-1] < 0.01
    decay = lrs[5:]
    assert all(b <= a + 1e-12 for a, b in zip(decay, decay[1:]))  # monotone: no jump when the estimate moves


def test_advance_with_a_fixed_step_count_is_the_plain_cosine():
    progress = 0.0
    for step in range(20):
        assert lr_at(step, 20, 2, 1.0, progress) == pytest.approx(lr_at(step, 20, 2, 1.0))
        progress = advance(progress, step, 20, 2)
    assert progress == pytest.approx(1.0)


def test_minute_budget_wiring(dataset, tmp_path):
    # A budget far larger than the run: calibration after 10 timed steps keeps max_steps (12).
    result = train(dataset, tmp_path / "run", tiny(max_steps=12, max_minutes=10.0, eval_sample=0), progress=False)
    assert result.steps == 12
    state = json.loads((latest_checkpoint(tmp_path / "run") / "state.json").read_text())
    assert state["schedule"]["step"] == 12 and state["schedule"]["total_steps"] == 12
    assert state["schedule"]["calibrated"] and state["schedule"]["progress"] == pytest.approx(1.0)


def test_random_negatives_capped_at_catalog_and_progress_lines(dataset, tmp_path, monkeypatch, caplog):
    import itemsage.train.loop as train_module

    drawn = []
    real = train_module.Sampler.negatives

    def recording(self, r, *positives):
        drawn.append(r)
        return real(self, r, *positives)

    monkeypatch.setattr(train_module.Sampler, "negatives", recording)
    import itemsage.train.clock as clock_module

    monkeypatch.setattr(clock_module, "_LOG_EVERY_S", 0.0)  # a progress line every step
    caplog.set_level("INFO", logger="itemsage.train")
    # 16 positives x ratio 4 = 64 random negatives asked of a 48-product catalog
    result = train(dataset, tmp_path / "run", tiny(max_steps=3, random_negatives_ratio=4, eval_sample=0),
                   progress=False)
    assert result.steps == 3 and set(drawn) == {48}
    assert "random negatives capped at the catalog size: 48 a step, not 64" in caplog.text
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert any(line.startswith("step 3/3 ") and "pairs/s" in line and "loss" in line and "ETA" in line
               for line in lines), lines


def with_listed_at(dataset: Path, root: Path, listed_ms: list[int | None]) -> Path:
    """A copy of `dataset` whose catalog gives each product's `listed_at` (epoch ms; None: not given)."""
    shutil.copytree(dataset, root)
    products = pq.read_table(root / schema.PRODUCTS_FILE)
    listed = pa.array(listed_ms, pa.int64()).cast(pa.timestamp("ms", tz="UTC"))
    pq.write_table(products.append_column(schema.LISTED_AT, listed), root / schema.PRODUCTS_FILE)
    artifacts.write_manifest(root, "dataset")
    return root


def test_negative_pool_leaves_out_products_listed_after_the_train_window(dataset, tmp_path):
    from itemsage.model.batch import ProductStore
    from itemsage.train.pairs import negative_pool

    vocab = Vocabulary.load(dataset / schema.VOCAB_FILE)
    store = ProductStore.from_dataset(dataset, vocab, schema.TEXT_FIELDS, 20, progress=False)
    assert negative_pool(dataset, store) is None  # no listed_at: every product
    last = 599_000  # the train window's last engagement (600 rows, one a second from 0)
    listed = [None] * 40 + [last, last - 1, 0, None] + [last + 1, 10**9, 2 * 10**9, last + 1]
    data = with_listed_at(dataset, tmp_path / "listed", listed)
    np.testing.assert_array_equal(negative_pool(data, store), np.arange(44))
    early = with_listed_at(dataset, tmp_path / "early", [0] * 48)
    assert negative_pool(early, store) is None  # all on sale in time: no pool needed


def test_sampler_draws_negatives_from_its_pool_only():
    probs = np.ones(10)
    plain, again = Sampler(probs, 48, seed=5), Sampler(probs, 48, seed=5, pool=np.arange(48))
    np.testing.assert_array_equal(plain.negatives(500), again.negatives(500))  # a full pool changes nothing
    pooled = Sampler(probs, 48, seed=5, pool=np.array([3, 7, 40]))
    drawn = np.concatenate([pooled.negatives(64), pooled.fork().negatives(64)])
    assert set(drawn.tolist()) == {3, 7, 40}


def test_training_draws_no_product_listed_after_the_train_window(dataset, tmp_path, monkeypatch):
    import itemsage.train.loop as train_module

    data = with_listed_at(dataset, tmp_path / "listed", [None] * 40 + [10**9] * 8)
    drawn: list[np.ndarray] = []
    real = train_module.Sampler.negatives

    def recording(self, r, *positives):
        drawn.append(real(self, r, *positives))
        return drawn[-1]

    corrections: list[torch.Tensor] = []
    real_loss = train_module.MixedNegativeLoss.forward

    def loss_recording(self, *args, **kw):
        corrections.append(kw["log_q_neg"])
        return real_loss(self, *args, **kw)

    monkeypatch.setattr(train_module.Sampler, "negatives", recording)
    monkeypatch.setattr(train_module.MixedNegativeLoss, "forward", loss_recording)
    result = train(data, tmp_path / "run", tiny(max_steps=4, random_negatives_ratio=2, eval_sample=0),
                   progress=False)
    rows = np.concatenate(drawn)
    # 32 uniform draws a step from the 40 products on sale, never products 40..47
    assert {len(d) for d in drawn} == {32} and rows.max() < 40
    torch.testing.assert_close(corrections[0], torch.full((32,), math.log(32 / 40)))  # not log(32 / 48)
    assert any("40 of 48 products listed by the train window's last engagement" in n for n in result.notes)
    from itemsage.model.model import load_model

    assert load_model(result.model_dir).extra["training"]["negative_pool"] == 40


def test_cli_train_and_resume(dataset, tmp_path):
    from typer.testing import CliRunner

    from itemsage.cli import app

    runner = CliRunner()
    out = tmp_path / "run"
    args = ["train", str(dataset), "--out", str(out), "--preset", "tiny", "--steps", "4", "--batch-size", "16",
            "--checkpoint-every", "2", "--eval-sample", "60", "--device", "cpu", "--no-progress",
            "--tasks", "closeup.click,search.click,home.click", "--aggregator", "sum"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "Recall@10" in result.output and "closeup.click" in result.output and "model:" in result.output
    saved = json.loads((out / "model" / "config.json").read_text())
    assert saved["model"]["aggregator"] == "sum"
    assert saved["extra"]["train_config"]["tasks"] == ["closeup.click", "search.click", "home.click"]
    # --resume with only a longer --steps: the other options come from the checkpoint
    result = runner.invoke(app, ["train", str(dataset), "--out", str(out), "--resume", "--steps", "6",
                                 "--no-progress"])
    assert result.exit_code == 2 and "--steps" in result.output  # the schedule length is fixed
    result = runner.invoke(app, ["train", str(dataset), "--out", str(out), "--resume", "--no-progress"])
    assert result.exit_code == 0, result.output
    # bad option: refused by name, no traceback
    result = runner.invoke(app, ["train", str(dataset), "--out", str(tmp_path / "x"), "--batch-size", "1"])
    assert result.exit_code == 2 and "--batch-size (1) must be an integer >= 2" in result.output


def test_search_text_queries_use_cached_frozen_encoder(dataset, tmp_path, monkeypatch):
    """Search rows with text go through query_encoder.cached_text_embeddings (a fake encoder here),
    once per distinct text; equal texts share a query key."""
    import shutil

    import itemsage.encoders.text as qe
    from itemsage.model.batch import ProductStore

    calls: list[list[str]] = []

    class FakeEncoder:  # deterministic 384-d unit vectors from the text's bytes
        dim, name = qe.TextQueryEncoder.dim, qe.TextQueryEncoder.name

        def encode(self, texts, batch_size=256, progress=True):
            calls.append(list(texts))
            out = np.stack([np.random.default_rng(sum(t.encode())).normal(size=self.dim) for t in texts])
            return (out / np.linalg.norm(out, axis=1, keepdims=True)).astype(np.float32)

    monkeypatch.setattr(qe, "TextQueryEncoder", FakeEncoder)
    data = tmp_path / "data"
    shutil.copytree(dataset, data)
    logs = pq.read_table(data / schema.TRAIN_FILE)
    search = np.asarray(logs[schema.SURFACE].to_pylist()) == "search"
    texts = [f"{BRANDS[i % 4]} chair" if s else None for i, s in enumerate(search)]
    vectors = [None if s else v for s, v in zip(search, logs[schema.QUERY_EMBEDDING].to_pylist())]
    logs = logs.set_column(logs.schema.get_field_index(schema.QUERY_TEXT), schema.QUERY_TEXT,
                           pa.array(texts, pa.string()))
    logs = logs.set_column(logs.schema.get_field_index(schema.QUERY_EMBEDDING), schema.QUERY_EMBEDDING,
                           pa.array(vectors, pa.list_(pa.float32())))
    pq.write_table(logs, data / schema.TRAIN_FILE)

    store = ProductStore.from_dataset(data, Vocabulary.load(data / schema.VOCAB_FILE), schema.TEXT_FIELDS, 20,
                                      progress=False)
    pairs = load_pairs(data, schema.TRAIN_FILE, store)
    assert sorted(calls[0]) == sorted(set(t for t in texts if t))  # each distinct text encoded once
    assert pairs.queries["search"].shape == (4, 384)
    reference = FakeEncoder().encode(["acme chair"])[0]
    i = texts.index("acme chair")
    np.testing.assert_allclose(pairs.queries["search"][pairs.query_row[i]].numpy(), reference)
    same = [j for j, t in enumerate(texts) if t == "acme chair"]
    assert len({pairs.query_key[j] for j in same}) == 1
    n_calls = len(calls)
    load_pairs(data, schema.TRAIN_FILE, store)  # second load: served from the dataset's cache
    assert len(calls) == n_calls and (data / schema.QUERY_CACHE_DIR).is_dir()
