"""The `itemsage` command line's shared parts: the Typer app, its global options, the choices, and the
helpers every command uses (refusals, progress, run-file values, error messages in flag names).
Each command group is its own module beside this one.

Heavy imports (torch, faiss, fastapi) happen inside each command so `itemsage --help` stays quick.
The CLI prints results; library code only logs.
"""

from __future__ import annotations

import enum
import logging
import re
import sys
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.text import Text
from typer.core import TyperGroup

from itemsage import __version__

# compare.RUNS, written out so `--help` does not import pyarrow (tests/test_cli.py checks they agree).
RUNS = ("itemsage", "image_only", "text_only", "sum_pooling", "concat_mlp", "single_task_click", "single_task_save",
        "single_task_add_to_cart", "single_task_checkout", "in_batch_negatives", "random_negatives", "no_graph",
        "concat_mlp_no_graph")

# click's exception classes, found from Typer's public BadParameter (Typer vendors its own click).
_CLICK_ERROR = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


class _Group(TyperGroup):
    """The command group, with click's usage errors (an unknown option, a bad choice, a missing
    argument) printed in the CLI's one refusal style, `error: ...` on one line, as `fail` prints every
    other refusal, instead of click's usage block and boxed message."""

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)  # typer.Exit(n) comes back as n
        except _CLICK_ERROR as err:
            ctx = getattr(err, "ctx", None)
            if type(err).__name__ == "NoArgsIsHelpError":  # `itemsage` alone: the help is already shown
                sys.exit(err.exit_code)
            hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
            console.print(Text.assemble(("error: ", "bold red"), err.format_message().rstrip(".") + hint))
            sys.exit(err.exit_code)
        except typer.Abort:
            console.print("aborted")
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    cls=_Group,
    name="itemsage",
    help="ItemSage: one product embedding for search, closeup and home, trained from engagement logs.\n\n"
         "Start with `itemsage demo`, or see the pipeline with `itemsage COMMAND --help`.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)
console = Console()
_STATE = {"quiet": False}


# ---- choices (each mirrors a library constant; tests/test_cli.py checks they agree) ----


class Preset(str, enum.Enum):  # model.PRESETS
    cpu = "cpu"
    paper = "paper"
    tiny = "tiny"


class Negatives(str, enum.Enum):  # losses.NEGATIVE_MODES
    mixed = "mixed"
    in_batch = "in_batch"
    random = "random"


class Aggregator(str, enum.Enum):  # model.AGGREGATORS
    transformer = "transformer"
    sum = "sum"
    concat = "concat"


class Modalities(str, enum.Enum):  # model.MODALITIES
    both = "both"
    image = "image"
    text = "text"


class Optimizer(str, enum.Enum):  # train.OPTIMIZERS
    adamw = "adamw"
    lamb = "lamb"


class Device(str, enum.Enum):  # train.TrainConfig.device (cuda:N only in a --config file)
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class EvalDevice(str, enum.Enum):
    cpu = "cpu"
    cuda = "cuda"


class Kind(str, enum.Enum):  # index.KINDS
    hnsw = "hnsw"
    flat = "flat"
    ivfpq = "ivfpq"


class Backend(str, enum.Enum):  # where the index lives: faiss files, or a Milvus collection
    faiss = "faiss"
    milvus = "milvus"


class Engine(str, enum.Enum):
    local = "local"
    ray = "ray"


class ProductQuery(str, enum.Enum):  # product_query.CHOICES
    auto = "auto"
    image = "image"
    text = "text"


def _version(value: bool) -> None:
    if value:
        console.print(f"itemsage {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def _main(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log debug messages."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only warnings and errors; no progress bars."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger().setLevel(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)
    # faiss logs "Could not load library with AVX512 support" at INFO on import; it then uses AVX2.
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    _STATE["quiet"] = quiet
    if quiet:
        no_third_party_bars()


def no_third_party_bars() -> None:
    """No progress bars from the libraries below us either: Hugging Face's (the "Loading weights" bar
    when MiniLM loads) and tqdm's. Environment switches for those not imported yet (the CLI sets them
    before any heavy import), and the libraries' own switch for those already imported."""
    import os
    import sys

    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    os.environ["TQDM_DISABLE"] = "1"
    if "huggingface_hub" in sys.modules:
        sys.modules["huggingface_hub"].utils.disable_progress_bars()
    if "transformers" in sys.modules:
        sys.modules["transformers"].utils.logging.disable_progress_bar()


def fail(message: str, code: int = 2) -> None:
    """Print a user-facing error (no traceback) and exit non-zero. The message is plain text: a
    [bracket] in it is shown, not read as markup."""
    console.print(Text.assemble(("error: ", "bold red"), message))
    raise typer.Exit(code)


def _progress(flag: bool) -> bool:
    """Whether to draw progress bars (`--progress/--no-progress`, and never under -q); when not, the
    third-party bars are switched off too."""
    shown = flag and not _STATE["quiet"]
    if not shown:
        no_third_party_bars()
    return shown


_PROGRESS_HELP = "Show progress bars (--no-progress: none, the libraries' included)."


# Config fields as the user typed them: `train.max_steps` is `--steps` on the command line.
_FLAGS: dict[str, dict[str, str]] = {
    "train": {"preset": "--preset", "max_steps": "--steps", "max_minutes": "--minutes",
              "batch_size": "--batch-size", "lr": "--lr", "negatives": "--negatives",
              "random_negatives_ratio": "--random-negatives-ratio", "optimizer": "--optimizer",
              "tasks": "--tasks", "upweight_conversions": "--upweight-conversions",
              "checkpoint_every": "--checkpoint-every", "eval_every": "--eval-every",
              "eval_sample": "--eval-sample", "patience": "--patience", "device": "--device", "seed": "--seed",
              "graph": "--graph"},
    "model": {"aggregator": "--aggregator", "modalities": "--modalities"},
    "compare": {"preset": "--preset", "steps": "--steps", "batch_size": "--batch-size", "runs": "--runs",
                "eval_sample": "--eval-sample", "seed": "--seed", "seeds": "--seeds", "eval_every": "--eval-every",
                "patience": "--patience", "graph": "--graph"},
    "demo": {"products": "--products", "train_minutes": "--minutes", "train_steps": "--steps", "preset": "--preset",
             "seed": "--seed", "out": "--out", "graph": "--graph"},
    "ingest": {"split": "--split", "validation_fraction": "--validation-fraction", "test_fraction": "--test-fraction",
               "validation_from": "--validation-from", "test_from": "--test-from", "gap_hours": "--gap-hours",
               "text_fields": "--text-fields",
               "max_unigrams": "--max-unigrams", "max_bigrams": "--max-bigrams", "max_trigrams": "--max-trigrams",
               "batch_rows": "--batch-rows", "image_dim": "--image-dim", "product_query": "--product-query",
               "max_reject_share": "--max-reject-share"},
    "index": {"kind": "--kind", "m": "--m", "ef_construction": "--ef-construction", "ef_search": "--ef-search",
              "nlist": "--nlist", "pq_m": "--pq-m", "pq_nbits": "--pq-nbits", "nprobe": "--nprobe",
              "refine_factor": "--refine-factor", "recall_target": "--recall-target"},
    "embed": {"batch_size": "--batch-size"},
}
_FIELD = re.compile(r"`?\b(train|model|compare|demo|ingest|index|embed|graph)\.([a-z_]+)\b(?!\.)`?")
_NOT_FIELDS = {"parquet", "jsonl", "json", "safetensors", "arrow", "py", "toml"}


def flag_names(message: str, config_file: Optional[Path] = None, names: Optional[dict[str, str]] = None) -> str:
    """A config error as the user sees the options: `train.preset` -> `--preset`; a value from the run
    file is named by its key as written there (`names`: "train.max_steps" -> "steps", see
    cli/run_files.py) and the file is named at the end; a field with no flag is named as its key in
    the run file ([train] weight_decay)."""
    names = names or {}
    used: list[str] = []

    def name(m: re.Match) -> str:
        section, field = m.groups()
        if field in _NOT_FIELDS:
            return m.group(0)
        if f"{section}.{field}" in names:
            used.append(names[f"{section}.{field}"])
            return f"`{used[-1]}`"
        flag = _FLAGS.get(section, {}).get(field)
        if flag:
            return flag
        table = "train.model" if section == "model" else section
        return f"`{field}` ([{table}] in the --config file)"
    text = _FIELD.sub(name, message)
    if used and config_file is not None:
        text += f" (`{'`, `'.join(dict.fromkeys(used))}` in --config {config_file})"
    return text


def _given(ctx: typer.Context, values: dict[str, Any]) -> dict[str, Any]:
    """The options typed on the command line (not left at their default), enum values unwrapped."""
    # By name: Typer may carry its own copy of click, whose ParameterSource is another class.
    return {k: v.value if isinstance(v, enum.Enum) else v for k, v in values.items()
            if getattr(ctx.get_parameter_source(k), "name", None) in ("COMMANDLINE", "ENVIRONMENT")}


_CONFIG_HELP = ("A run file (.toml; the [{0}] table) whose values replace the defaults; flags given here "
                "override it. Keys are the flags' names (steps, batch_size or batch-size, ...) and the options "
                "without a flag: see docs/ARCHITECTURE.md, 'Run files'.")


def _path(value: Any) -> Optional[Path]:
    return Path(value) if value is not None else None
