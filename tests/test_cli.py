"""The command line: choices and defaults agree with the configs, help teaches, errors name flags,
run files (--config) are read, overridden by flags, and re-run a training run exactly."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from itemsage import __version__
from itemsage.cli import app
from itemsage.cli import common as cli

COMMANDS = ["demo-data", "ingest", "train", "embed", "index", "serve", "evaluate", "compare", "demo"]


def plain(text: str) -> str:
    """Help text without the box drawing and line breaks of Rich's layout."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)
    return re.sub(r"\s+", " ", re.sub(r"[│╭╮╰╯─]", " ", text))


def invoke(*args: str):
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "200", "TERM": "dumb"})


def test_choices_mirror_the_library():
    from itemsage.index.config import KINDS
    from itemsage.model.config import AGGREGATORS, MODALITIES, PRESETS
    from itemsage.train.config import OPTIMIZERS
    from itemsage.train.losses import NEGATIVE_MODES

    def values(enum):
        return tuple(e.value for e in enum)

    assert sorted(values(cli.Preset)) == sorted(PRESETS)
    assert values(cli.Negatives) == NEGATIVE_MODES
    assert values(cli.Aggregator) == AGGREGATORS
    assert values(cli.Modalities) == MODALITIES
    assert values(cli.Optimizer) == OPTIMIZERS
    assert values(cli.Kind) == KINDS
    from itemsage.evaluate.compare_runs import RUNS

    assert cli.RUNS == tuple(RUNS)


@pytest.mark.parametrize("command, config, flags", [
    ("train", "itemsage.train.config:TrainConfig",
     {"preset": "preset", "steps": "max_steps", "batch_size": "batch_size", "lr": "lr", "negatives": "negatives",
      "random_negatives_ratio": "random_negatives_ratio", "optimizer": "optimizer",
      "upweight_conversions": "upweight_conversions", "checkpoint_every": "checkpoint_every",
      "eval_every": "eval_every", "eval_sample": "eval_sample", "device": "device", "seed": "seed"}),
    ("compare", "itemsage.evaluate.compare_runs:CompareConfig",
     {"preset": "preset", "steps": "steps", "batch_size": "batch_size", "seed": "seed", "seeds": "seeds",
      "eval_every": "eval_every", "patience": "patience"}),
    ("demo", "itemsage.demo:DemoSettings",
     {"out": "out", "products": "products", "train_minutes": "train_minutes", "preset": "preset", "seed": "seed"}),
])
def test_flag_defaults_are_the_config_defaults(command, config, flags):
    import importlib

    import typer.main

    module, name = config.split(":")
    defaults = {f.name: f.default for f in dataclasses.fields(getattr(importlib.import_module(module), name))}
    params = {p.name: p.default for p in typer.main.get_command(app).commands[command].params}
    for flag, field in flags.items():
        shown = params[flag].value if hasattr(params[flag], "value") else params[flag]
        assert shown == defaults[field], (flag, shown, defaults[field])


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_an_example(command):
    result = invoke(command, "--help")
    assert result.exit_code == 0
    assert "Example" in result.output and f"itemsage {command} " in plain(result.output)


def test_help_lists_choices_defaults_and_run_names():
    from itemsage.evaluate.compare_runs import RUNS

    train = plain(invoke("train", "--help").output)
    for choices in ("cpu|paper|tiny", "mixed|in_batch|random", "transformer|sum|concat", "both|image|text",
                    "adamw|lamb", "auto|cpu|cuda"):
        assert choices in train.replace(" ", ""), choices
    assert "[default: 2000]" in train and "[default: 0.001]" in train
    assert "Random seed" in train
    compare = plain(invoke("compare", "--help").output)
    assert all(name in compare for name in RUNS)
    evaluate = plain(invoke("evaluate", "--help").output)
    assert "test-window pairs (default: all)" in evaluate  # not swallowed as markup
    assert "hnsw|flat" in plain(invoke("index", "--help").output).replace(" ", "")
    assert "local|ray" in plain(invoke("embed", "--help").output).replace(" ", "")


def test_version_and_quiet():
    result = invoke("--version")
    assert result.exit_code == 0 and result.output.strip() == f"itemsage {__version__}"
    assert "--quiet" in invoke("--help").output


def test_errors_name_the_flag_not_the_field():
    assert cli.flag_names("train.preset ('gpu') must be one of cpu, paper, tiny") == \
        "--preset ('gpu') must be one of cpu, paper, tiny"
    assert cli.flag_names("model.aggregator must be one of transformer, sum, concat, got 'mean'").startswith(
        "--aggregator must be")
    assert cli.flag_names("train.max_steps and train.max_minutes are both unset") == \
        "--steps and --minutes are both unset"
    assert "`weight_decay` ([train] in the --config file)" in cli.flag_names("train.weight_decay (-1.0) must be >= 0")
    assert cli.flag_names("see runs/train.parquet") == "see runs/train.parquet"  # a file name is not a field


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from test_train import make_dataset

    return make_dataset(tmp_path_factory.mktemp("data"))


def run_file(path, text: str):
    path.write_text(text)
    return path


def test_run_file_values_are_checked_with_flag_names(dataset, tmp_path):
    toml = run_file(tmp_path / "run.toml", '[train]\npreset = "gpu"\n')
    result = invoke("train", str(dataset), "--out", str(tmp_path / "a"), "--config", str(toml))
    assert result.exit_code == 2
    # a value from the file is named by its key there, and the file is named (issue 26, "One language")
    assert "`preset` ('gpu') must be one of paper, cpu, tiny" in plain(result.output)
    assert f"in --config {toml}" in plain(result.output)
    assert "train.preset" not in result.output
    toml = run_file(tmp_path / "typo.toml", '[train]\nbatchsize = 16\n')
    result = invoke("train", str(dataset), "--out", str(tmp_path / "b"), "--config", str(toml))
    assert result.exit_code == 2 and "`batchsize` in" in plain(result.output)
    assert "is not a key of this table. Did you mean `batch_size`?" in plain(result.output)
    toml = run_file(tmp_path / "types.toml", '[train]\nbatch_size = "16"\n')
    result = invoke("train", str(dataset), "--out", str(tmp_path / "c"), "--config", str(toml))
    assert result.exit_code == 2 and "`batch_size` in" in plain(result.output)
    assert "must be an integer, got '16'" in plain(result.output)  # a type error, not a range error
    result = invoke("train", str(dataset), "--out", str(tmp_path / "d"), "--preset", "gpu")
    assert result.exit_code == 2 and "'gpu' is not one of 'cpu', 'paper', 'tiny'" in plain(result.output)


def test_a_toml_run_rerun_from_its_saved_config_gives_the_same_weights(dataset, tmp_path):
    toml = run_file(tmp_path / "run.toml", f"""
[train]
dataset = "{dataset}"
out = "first"
preset = "tiny"
max_steps = 500
batch_size = 16
random_negatives_ratio = 2
warmup_steps = 2
lr = 0.003
eval_sample = 0
checkpoint_every = 0
device = "cpu"
seed = 3
[train.model]
aggregator = "sum"
""")
    # the flag overrides the file's step count
    result = invoke("train", "--config", str(toml), "--steps", "5", "--no-progress")
    assert result.exit_code == 0, result.output
    first = tmp_path / "first" / "model"  # `out` is relative to the run file
    saved = json.loads((first / "config.json").read_text())
    assert saved["extra"]["train_config"]["max_steps"] == 5 and saved["model"]["aggregator"] == "sum"
    assert saved["extra"]["train_config"]["lr"] == 0.003

    result = invoke("train", str(dataset), "--out", str(tmp_path / "again"), "--config", str(first / "config.json"),
                    "--no-progress")
    assert result.exit_code == 0, result.output
    a, b = load_file(str(first / "model.safetensors")), load_file(str(tmp_path / "again/model/model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    again = json.loads((tmp_path / "again/model/config.json").read_text())
    assert again["extra"]["train_config"] == saved["extra"]["train_config"]

    # a different seed gives different weights: the comparison above can fail
    result = invoke("train", str(dataset), "--out", str(tmp_path / "other"), "--config", str(first / "config.json"),
                    "--seed", "4", "--no-progress")
    assert result.exit_code == 0, result.output
    c = load_file(str(tmp_path / "other/model/model.safetensors"))
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_compare_and_demo_read_their_tables(tmp_path):
    toml = run_file(tmp_path / "run.toml", '[compare]\nruns = "itemsage,nope"\n[demo]\nproducts = 5\n')
    result = invoke("compare", "data", "--out", str(tmp_path / "c"), "--config", str(toml))
    assert result.exit_code == 2 and "`runs` has unknown run(s) ['nope']" in plain(result.output)
    result = invoke("demo", "--out", str(tmp_path / "d"), "--config", str(toml))
    assert result.exit_code == 2 and "`products` (5) must be an integer >= 100" in plain(result.output)
    result = invoke("demo", "--config", str(tmp_path / "run.toml"), "--products", "50", "--out", str(tmp_path / "d"))
    assert result.exit_code == 2 and "--products (50)" in plain(result.output)  # the flag wins
    result = invoke("demo", "--config", str(run_file(tmp_path / "x.toml", "[train]\nseed = 1\n")))
    assert result.exit_code == 2 and "has no [demo] table" in plain(result.output)


def test_a_catalog_without_images_trains_text_only_with_the_defaults(dataset, tmp_path):
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    from itemsage import schema

    text_only = tmp_path / "text-only"
    shutil.copytree(dataset, text_only)
    products = pq.read_table(text_only / schema.PRODUCTS_FILE)
    column = products.schema.get_field_index(schema.IMAGE_EMBEDDINGS)
    products = products.set_column(column, schema.IMAGE_EMBEDDINGS,
                                   pa.array([[]] * products.num_rows, pa.list_(pa.list_(pa.float32()))))
    pq.write_table(products, text_only / schema.PRODUCTS_FILE)
    # train verifies the dataset against its manifest: record the changed file as ingest would have
    from itemsage import artifacts

    manifest = artifacts.read_manifest(text_only)
    counts = {**manifest["counts"], **({"image_dim": 0} if "image_dim" in manifest["counts"] else {})}
    artifacts.write_manifest(text_only, "dataset", config=manifest["config"], inputs=manifest["inputs"],
                             counts=counts, files=sorted(manifest["files"]))
    # closeup queries were image-like vectors; they stay usable as query vectors of their own width
    result = invoke("train", str(text_only), "--out", str(tmp_path / "run"), "--preset", "tiny", "--steps", "2",
                    "--batch-size", "16", "--eval-sample", "0", "--device", "cpu", "--no-progress")
    assert result.exit_code == 0, result.output
    assert "note: the catalog has no image vectors" in plain(result.output)
    saved = json.loads((tmp_path / "run/model/config.json").read_text())
    assert saved["model"]["modalities"] == "text" and saved["image_dim"] == 0
    assert saved["extra"]["train_config"]["model"] == {"modalities": "text"}  # a re-run reads the same features
    # asked for explicitly, images are still refused with the reason
    result = invoke("train", str(text_only), "--out", str(tmp_path / "run2"), "--preset", "tiny", "--steps", "2",
                    "--batch-size", "16", "--eval-sample", "0", "--modalities", "both", "--no-progress")
    assert result.exit_code == 2 and "no image vectors" in plain(result.output)


def test_faiss_loader_info_is_silenced(tmp_path):
    import logging

    logging.getLogger("faiss.loader").setLevel(logging.NOTSET)
    result = invoke("index", str(tmp_path / "none"), "--out", str(tmp_path / "idx"))
    assert result.exit_code != 0  # no embeddings there; the callback ran all the same
    assert logging.getLogger("faiss.loader").level == logging.WARNING  # set, not inherited


def test_every_help_text_survives_the_markdown_rendering():
    """Typer renders help as Markdown: an unescaped `<version>` is an HTML tag and vanishes
    ("versions// and CURRENT"). Every command's and option's help must reach --help word for word."""
    import re

    from typer.main import get_command
    from typer.testing import CliRunner

    from itemsage.cli import app

    def words(text: str) -> str:
        return " ".join(re.findall(r"[A-Za-z0-9]+", text))

    group = get_command(app)
    runner = CliRunner()
    checked = 0
    for name, command in [(None, group), *group.commands.items()]:
        result = runner.invoke(app, [*([name] if name else []), "--help"], env={"COLUMNS": "2000"})
        assert result.exit_code == 0, result.output
        shown = words(result.output)
        for what, text in [("doc", command.help or ""), *((p.name, getattr(p, "help", None) or "")
                                                          for p in command.params)]:
            assert words(text) in shown, f"itemsage {name or ''} --help does not show {what}'s help {text!r}"
            checked += 1
    assert checked > 50
    output = runner.invoke(app, ["index", "--help"], env={"COLUMNS": "2000"}).output
    assert "versions/<version>/" in output and "<name>_<version>" in output


@pytest.mark.parametrize("args", [
    ["index", "{missing}", "--out", "{tmp}/idx"],
    ["evaluate", "{missing}", "{missing}", "--embeddings", "{missing}", "--out", "{tmp}/ev"],
    ["embed", "{missing}", "--catalog", "{missing}", "--out", "{tmp}/emb"],
    ["train", "{missing}", "--out", "{tmp}/run"],
    ["compare", "{missing}", "--out", "{tmp}/cmp"],
])
def test_a_missing_path_says_it_does_not_exist(tmp_path, args):
    """Not "has no manifest.json ... may have been killed": the path is simply not there."""
    missing = tmp_path / "no" / "such"
    result = invoke(*(a.format(missing=missing, tmp=tmp_path) for a in args))
    text = plain(result.output)
    assert result.exit_code == 2 and text.startswith("error: ") and f"{missing} does not exist" in text, text
    assert "killed" not in text
    assert [p.name for p in tmp_path.iterdir()] == []  # nothing was created


@pytest.mark.parametrize("args", [
    ["index", "{missing}", "--out", "{tmp}/idx"],
    ["evaluate", "{missing}", "{missing}", "--embeddings", "{missing}", "--out", "{tmp}/ev"],
    ["compare", "{missing}", "--out", "{tmp}/cmp"],
    ["serve", "--model", "{missing}", "--index", "{missing}"],
    ["demo", "--out", "{tmp}/demo", "--products", "5"],
])
def test_every_long_command_takes_no_progress(tmp_path, args):
    """--no-progress is accepted everywhere (it was "No such option" for these five): the command goes on
    to its own refusal of the missing input (or of --products 5)."""
    missing = tmp_path / "no" / "such"
    result = invoke(*(a.format(missing=missing, tmp=tmp_path) for a in args), "--no-progress")
    text = plain(result.output)
    assert result.exit_code == 2 and "No such option" not in text, text
    assert f"{missing} does not exist" in text or "--products (5) must be an integer >= 100" in text, text
    assert "--no-progress" in plain(invoke(args[0], "--help").output)


@pytest.mark.parametrize("args, expected", [
    (["index", "x", "--out", "y", "--bogus"], "error: No such option: --bogus"),
    (["index", "x", "--out", "y", "--kind", "nope"], "error: Invalid value for '--kind'"),
    (["evaluate"], "error: Missing argument 'model'"),
    (["nosuch"], "error: No such command 'nosuch'"),
])
def test_usage_errors_are_refused_in_the_one_style(args, expected):
    """Click's usage errors read like every other refusal: `error: ...`, one line, the help to read."""
    result = invoke(*args)
    text = plain(result.output).strip()
    assert result.exit_code == 2 and text.startswith(expected), text
    assert text.endswith("--help`)") and "Usage:" not in text and "╭" not in result.output


def test_quiet_leaves_only_warnings_and_errors(tmp_path):
    """-q: no INFO line and no progress bar, the libraries' included (MiniLM's "Loading weights" bar
    showed when ingest loaded the text encoder for a catalog without images)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    catalog = tmp_path / "catalog.jsonl"
    catalog.write_text("".join(json.dumps({"product_id": f"p{i}", "title": t}) + "\n"
                               for i, t in enumerate(["oak chair", "pine table", "wool rug"])))
    logs = tmp_path / "logs.jsonl"
    logs.write_text("".join(json.dumps({"surface": "search", "engagement": "click", "product_id": f"p{i % 3}",
                                        "timestamp": f"2024-01-01T0{i}:00:00Z", "query_text": "chair"}) + "\n"
                            for i in range(6)))
    env = {**os.environ, "COLUMNS": "200",
           "PYTHONPATH": os.pathsep.join([str(Path(cli.__file__).parents[2]), os.environ.get("PYTHONPATH", "")])}
    env.pop("HF_HUB_DISABLE_PROGRESS_BARS", None), env.pop("TQDM_DISABLE", None)
    proc = subprocess.run([sys.executable, "-m", "itemsage.cli", "-q", "ingest", "--catalog", str(catalog),
                           "--logs", str(logs), "--out", str(tmp_path / "ds")],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    assert manifest["product_query"]["source"] == "text"  # MiniLM was loaded: its bar would have shown
    shown = proc.stdout + proc.stderr
    assert "Loading weights" not in shown and "INFO" not in shown and "%|" not in shown, shown


def test_the_quantisers_root_logger_lines_go_to_debug(caplog):
    """onnxruntime's quantiser logs to the root logger (a line per node, and a warning to pre-process);
    during the export they are this module's DEBUG lines, and other records pass."""
    import logging

    from itemsage.encoders.onnx_text import _quantiser_logs_at_debug

    def record(path: str, level: int) -> logging.LogRecord:
        return logging.makeLogRecord({"name": "root", "levelno": level, "levelname": logging.getLevelName(level),
                                      "pathname": path, "msg": f"from {path}"})

    root = logging.getLogger()
    with caplog.at_level(logging.DEBUG), _quantiser_logs_at_debug():
        root.handle(record("/x/onnxruntime/quantization/quantize.py", logging.WARNING))
        root.handle(record("/x/mine.py", logging.WARNING))
    got = [(r.name, r.levelname, r.getMessage()) for r in caplog.records]
    assert got == [("itemsage.encoders.onnx_text", "DEBUG", "onnxruntime: from /x/onnxruntime/quantization/quantize.py"),
                   ("root", "WARNING", "from /x/mine.py")]
    assert root.filters == []  # removed after the export
