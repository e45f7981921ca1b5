"""The one-command demo: generate a shop, ingest, build the engagement graph, train, embed, index and
evaluate.

Ingest writes train, validation and test windows; training keeps its best model on the validation
window and the evaluation (the figures printed) is on the test window.

Each stage writes its own artifact under one directory and is skipped when that artifact is already
complete, so a killed demo resumes where it stopped.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from itemsage import artifacts
from itemsage.config import require, require_int, require_number

log = logging.getLogger(__name__)


@dataclass
class DemoSettings:
    out: Path = Path("runs/demo")
    products: int = 20_000
    # The training budget. The rest of the demo (data, MiniLM over the search texts, embed, index,
    # evaluate with the served paths) takes about 3 minutes on 2 cores, and the install about 2.3:
    # 6 keeps the demo under 12 minutes (quiet fresh clones in all: 12 min 15 s at 7, 12 min 7 s at 6.5).
    train_minutes: float = 6.0
    preset: str = "cpu"
    train_steps: int | None = None  # optional step cap on top of the minute budget (tests)
    # On two CPU cores a step costs about its product count (B positives + R random negatives through
    # the tower), so the budget buys steps, not pairs: 512 positives and 256 random negatives a step
    # (0.375x the products of 1,024 + 1,024, about 2.2-2.9x the steps) gave a better validation
    # Recall@10 than 1,024 + 1,024 at the same share of the budget, mostly on search (BENCHMARKS.md,
    # "The demo's training settings"). `itemsage train` keeps B = 1,024 and R = 4 B by default.
    batch_size: int = 512
    random_negatives_ratio: float = 0.5
    # Peak learning rate (linear warm-up, then cosine decay to 0 at the budget): 2e-3, twice
    # `itemsage train`'s, learned faster in a budget of minutes (with dropout off, below).
    lr: float = 2e-3
    # ModelConfig overrides on top of the preset. Dropout off: a run of minutes is far from
    # overfitting, and dropout only slowed its learning (BENCHMARKS.md).
    model: dict[str, Any] = field(default_factory=lambda: {"dropout": 0.0})
    # Validation Recall@10 every this many steps chooses the model (best evaluation, early stopping);
    # one evaluation embeds the whole catalog, a few seconds at 20,000 products on 2 cores.
    eval_every: int = 500
    seed: int = 0
    # The graph stage (itemsage/graph): the train window's co-engagement neighbourhoods as the tower's
    # graph tokens; about 4 s at 20,000 products. False: the tower reads content alone.
    graph: bool = True

    def __post_init__(self) -> None:
        from itemsage.model.config import PRESETS
        from itemsage.train.config import MAX_BATCH, MAX_MINUTES, MAX_NEGATIVES_RATIO, MAX_SEED, MAX_STEPS

        require(isinstance(self.out, (str, Path)), f"demo.out ({self.out!r}) must be a path")
        self.out = Path(self.out)
        require_int(self.products, "demo.products", 100, 10_000_000)
        require_number(self.train_minutes, "demo.train_minutes", 0, MAX_MINUTES, above=True, unit=" (30 days)")
        if self.train_steps is not None:
            require_int(self.train_steps, "demo.train_steps", 1, MAX_STEPS)
        require_int(self.batch_size, "demo.batch_size", 2, MAX_BATCH)
        require_int(self.eval_every, "demo.eval_every", 1, MAX_STEPS)
        require_int(self.seed, "demo.seed", 0, MAX_SEED)
        require(isinstance(self.graph, bool), f"demo.graph ({self.graph!r}) must be true or false")
        require(isinstance(self.lr, (int, float)) and not isinstance(self.lr, bool) and 0 < self.lr < 10,
                f"demo.lr ({self.lr!r}) must be in (0, 10)")
        require_number(self.random_negatives_ratio, "demo.random_negatives_ratio", 0, MAX_NEGATIVES_RATIO)
        require(self.preset in PRESETS, f"demo.preset ({self.preset!r}) must be one of {', '.join(PRESETS)}")
        require(isinstance(self.model, dict), f"demo.model ({self.model!r}) must be a table of model options")
        self.model = dict(self.model)
        self.train_config()  # a bad preset, model option or ratio fails now, not after ingest

    def train_config(self) -> Any:
        """The TrainConfig of the demo's training stage."""
        from itemsage.train.config import TrainConfig

        return TrainConfig(preset=self.preset, model=dict(self.model), max_steps=self.train_steps,
                           max_minutes=self.train_minutes, seed=self.seed, lr=self.lr, batch_size=self.batch_size,
                           random_negatives_ratio=self.random_negatives_ratio, checkpoint_every=200,
                           eval_every=self.eval_every, graph=self.graph)


@dataclass
class DemoResult:
    shop: Path
    dataset: Path
    model: Path
    embeddings: Path
    index: Path
    report: Path
    evaluation: dict[str, Any]
    seconds: dict[str, float] = field(default_factory=dict)


def _done(directory: Path) -> bool:
    return (directory / artifacts.MANIFEST).is_file()


def _evaluated(report_dir: Path, model: Path, embeddings: Path) -> bool:
    """The evaluation report is complete (verified) and of this model and these embeddings."""
    try:
        inputs = artifacts.verify_manifest(report_dir, kind="evaluation")["inputs"]
    except (artifacts.ArtifactError, OSError, KeyError):
        return False
    return inputs == {"model": artifacts.fingerprint(model), "embeddings": artifacts.fingerprint(embeddings)}


def run_demo(settings: DemoSettings, progress: bool = True, say: Callable[[str], None] = log.info) -> DemoResult:
    """Run every stage under settings.out; `say` reports each stage as it starts."""
    from itemsage.data.demo_shop import CATALOG_FILE, ENGAGEMENTS_FILE, DemoConfig, generate_demo_data
    from itemsage.data.ingest import IngestConfig, ingest
    from itemsage.embed.shards import embed
    from itemsage.evaluate.evaluation import evaluate
    from itemsage.graph import build_graph_features, graph_dir_of
    from itemsage.evaluate.report import write_report
    from itemsage.index.build import build_from_embeddings
    from itemsage.index.config import IndexConfig
    from itemsage.train.loop import MODEL_DIR, train

    out = settings.out
    shop, dataset, run = out / "shop", out / "dataset", out / "train"
    model, embeddings, index, report_dir = run / MODEL_DIR, out / "embeddings", out / "index", out / "evaluation"
    seconds: dict[str, float] = {}

    def stage(name: str, done: bool, work: Callable[[], Any]) -> None:
        if done:
            say(f"[{name}] already complete, skipped")
            return
        say(f"[{name}] ...")
        start = time.perf_counter()
        work()
        seconds[name] = round(time.perf_counter() - start, 1)

    stage("demo-data", _done(shop), lambda: generate_demo_data(
        shop, DemoConfig(products=settings.products, seed=settings.seed), progress=progress))
    stage("ingest", _done(dataset), lambda: ingest(
        shop / CATALOG_FILE, shop / ENGAGEMENTS_FILE, dataset, IngestConfig(progress=progress)))
    if settings.graph:
        stage("graph", _done(graph_dir_of(dataset)), lambda: build_graph_features(dataset, progress=progress))
    # A half-finished training run resumes from its newest checkpoint.
    resume = (run / "checkpoints").is_dir() and any((run / "checkpoints").iterdir())
    stage("train", _done(model), lambda: train(dataset, run, settings.train_config(), progress=progress,
                                               resume=resume))
    stage("embed", _done(embeddings), lambda: embed(model, dataset, embeddings, progress=progress))
    stage("index", (index / "CURRENT").is_file(), lambda: build_from_embeddings(embeddings, index, IndexConfig()))
    result: dict[str, Any] = {}

    def evaluation() -> None:
        result.update(evaluate(model, dataset, embeddings, index_root=index))
        write_report(result, report_dir, title="ItemSage demo: evaluation")

    evaluated = _evaluated(report_dir, model, embeddings)
    stage("evaluate", evaluated, evaluation)
    if evaluated:  # its figures, for the table the demo prints
        result.update(artifacts.read_json(report_dir / "evaluation.json"))
    return DemoResult(shop, dataset, model, embeddings, index, report_dir / "report.md", result, seconds)
