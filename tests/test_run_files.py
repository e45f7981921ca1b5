"""Run files (--config): every malformed one is refused with exit 2 and one line that names the key
as written and the file, before any directory is created; keys are the flags' names in every
command (the old field names still accepted); absurd values are refused by a stated bound."""

from __future__ import annotations

import re

import pytest
from typer.testing import CliRunner

from itemsage.cli import app


def invoke(*args: str):
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "200", "TERM": "dumb"})


def plain(text: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"\x1b\[[0-9;]*m", "", text))


def refused(result, *expected: str) -> str:
    """The one-line refusal: exit 2, `error:`, no traceback, each expected piece in it."""
    text = plain(result.output)
    assert result.exit_code == 2, result.output
    assert text.startswith("error: ") and "Traceback" not in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    for piece in expected:
        assert piece in text, (piece, text)
    return text


def command(section: str, toml, out) -> list[str]:
    """The command that reads `toml`'s [section]; `out` the directory it would create."""
    if section == "train":
        return ["train", "data", "--out", str(out), "--config", str(toml)]
    if section == "compare":
        return ["compare", "data", "--out", str(out), "--config", str(toml)]
    return ["demo", "--out", str(out), "--config", str(toml)]


# (section, the run file's text, pieces the refusal must hold besides the file's name)
CASES = [
    # issue 25.1: each of these ended in a traceback
    ("compare", "[compare]\ntrain_overrides = {max_stepz = 1}\n", ["`train_overrides.max_stepz`", "Did you mean `steps`?"]),
    ("compare", "[compare]\ntrain_overrides = 5\n", ["`train_overrides`", "must be a table, got 5"]),
    ("compare", "[compare]\nruns = 5\n", ["`runs`", "must be a list of strings, got 5"]),
    ("demo", '[demo]\ntrain_minutes = "six"\n', ["`train_minutes`", "must be a finite number, got 'six'"]),
    ("demo", '[demo]\nproducts = "many"\n', ["`products`", "must be an integer, got 'many'"]),
    ("demo", '[demo]\nmodel = "x"\n', ["`model`", "must be a table, got 'x'"]),
    ("demo", "[demo]\nout = 5\n", ["`out`", "must be a string (a path), got 5"]),
    ("train", "[train]\nmodel = 5\n", ["`model`", "must be a table, got 5"]),
    ("train", "[train]\nmodel = {dropout = [1]}\n", ["`model.dropout`", "must be a finite number, got [1]"]),
    # issue 25.2: a type error worded as a type error, the key and the file named
    ("compare", "[compare]\nsteps = 2.5\n", ["`steps`", "must be an integer, got 2.5"]),
    ("compare", '[compare]\nseeds = "three"\n', ["`seeds`", "must be an integer, got 'three'"]),
    ("train", '[train]\nengagement_weights = {click = "x"}\n', ["`engagement_weights.click`", "got 'x'"]),
    ("train", "[train]\nmax_steps = 99999999999999999999999\n", ["`max_steps`", "must be an integer <= 10,000,000"]),
    ("train", "[train]\nsteps = 10000001\n", ["`steps`", "<= 10,000,000"]),
    ("train", "[train]\nlr = nan\n", ["`lr`", "must be a finite number, got nan"]),
    ("train", "[train]\nbatch_size = true\n", ["`batch_size`", "must be an integer, got True"]),
    ("train", "[train]\nminutes = 1e9\n", ["`minutes`", "(30 days)"]),
    ("train", '[train]\ntasks = "search.like"\n', ["`tasks`", "unknown task(s)"]),
    ("compare", "[compare]\nseeds = 1000\n", ["`seeds`", "<= 100"]),
    ("demo", "[demo]\nproducts = 5\n", ["`products`", "(5) must be an integer >= 100"]),
    ("demo", "[demo]\nproducts = 1e3\n", ["`products`", "must be an integer, got 1000.0"]),
    # unknown keys: every valid key listed (dataset and out too), a near miss suggested
    ("train", "[train]\nstepz = 5\n", ["`stepz`", "Did you mean `steps`?", "dataset", "out", "weight_decay"]),
    ("compare", "[compare]\nbogus = 1\n", ["`bogus`", "dataset, out, random_negatives_ratio"]),
    ("train", "[train]\nsteps = 5\nmax_steps = 6\n", ["`steps` and `max_steps`", "set the same option"]),
    ("train", "[train.model]\nwidht = 3\n", ["`model.widht`", "the `model` table"]),
    # what the file holds as a whole
    ("train", '[train]\ndataset = 5\n', ["`dataset`", "must be a string (a path), got 5"]),
    ("train", "[train]\nx = [" * 1 + "[" * 5000 + "]" * 5001 + "\n", ["nested too deep"]),
    ("train", "[train\nsteps = 5\n", ["is not valid TOML"]),
    ("train", "train = 5\n", ["`train` must be a table"]),
]


@pytest.mark.parametrize("section, text, pieces", CASES, ids=[f"{c[0]}:{c[1][:40]}" for c in CASES])
def test_a_malformed_run_file_is_refused_by_key_and_file(tmp_path, section, text, pieces):
    toml = tmp_path / "run.toml"
    toml.write_text(text)
    out = tmp_path / "out"
    result = invoke(*command(section, toml, out))
    shown = refused(result, *pieces)
    assert str(toml) in shown
    assert len(result.output.strip().splitlines()) <= 5  # a line, not a traceback
    assert not out.exists()  # refused before any directory was made


def test_missing_run_file_directory_and_unknown_format(tmp_path):
    refused(invoke("train", "data", "--out", str(tmp_path / "o"), "--config", str(tmp_path / "nope.toml")),
            "does not exist")
    refused(invoke("train", "data", "--out", str(tmp_path / "o"), "--config", str(tmp_path)), "is a directory")
    (tmp_path / "run.yaml").write_text("steps: 5\n")
    refused(invoke("train", "data", "--out", str(tmp_path / "o"), "--config", str(tmp_path / "run.yaml")),
            "unknown format '.yaml'")


def test_a_dataset_from_the_run_file_that_does_not_exist_says_so(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('[train]\ndataset = "does/not/exist"\nout = "o"\n')
    shown = refused(invoke("train", "--config", str(toml)), f"{tmp_path / 'does/not/exist'} does not exist",
                    "`dataset`")
    assert "killed" not in shown and not (tmp_path / "o").exists()
    toml.write_text('[compare]\ndataset = "nope"\n')
    refused(invoke("compare", "--out", str(tmp_path / "c"), "--config", str(toml)), "does not exist")


@pytest.mark.parametrize("section, text, key", [
    ("train", "[train]\nsteps = 7\nlr = 50\n", "lr"),  # `steps` is --steps: accepted
    ("train", "[train]\nminutes = 2\nlr = 50\n", "lr"),
    ("train", "[train]\nmax_steps = 7\nlr = 50\n", "lr"),  # the field's own name stays accepted
    ("train", "[train]\nbatch-size = 16\nlr = 50\n", "lr"),  # written as the flag is
    ("compare", "[compare]\nmax_steps = 7\npatience = -1\n", "patience"),
    ("compare", "[compare]\nrandom_negatives_ratio = -1\n", "random_negatives_ratio"),
    ("demo", "[demo]\nminutes = 2\nsteps = 5\nlr = 50\n", "lr"),
    ("demo", "[demo]\ntrain_minutes = 2\ntrain_steps = 5\nlr = 50\n", "lr"),
    ("demo", "[demo]\nmax_minutes = 2\nmax_steps = 5\nlr = 50\n", "lr"),  # [train]'s names too
])
def test_keys_are_the_flags_names_and_the_old_names_stay(tmp_path, section, text, key):
    """A key named as its flag is read: the refusal that follows is about another key, named as written."""
    toml = tmp_path / "run.toml"
    toml.write_text(text)
    shown = refused(invoke(*command(section, toml, tmp_path / "out")), f"`{key}` (")
    assert "not a key" not in shown and f"in --config {toml}" in shown


def test_a_range_error_names_the_key_as_written_and_a_flag_as_typed(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('[train]\nsteps = 0\n')
    shown = refused(invoke("train", "data", "--out", str(tmp_path / "o"), "--config", str(toml)), "`steps` (0)")
    assert "max_steps" not in shown
    toml.write_text('[train]\nsteps = 5\n[train.model]\ndropout = 1.5\n')
    refused(invoke("train", "data", "--out", str(tmp_path / "o"), "--config", str(toml)),
            "`model.dropout` must be in [0, 1), got 1.5", f"in --config {toml}")
    shown = refused(invoke("train", "data", "--out", str(tmp_path / "o"), "--config", str(toml), "--aggregator",
                           "sum", "--modalities", "text"), "`model.dropout`")
    toml.write_text('[train]\nsteps = 5\n')
    shown = refused(invoke("train", "data", "--out", str(tmp_path / "o"), "--config", str(toml), "--steps", "0"),
                    "--steps (0)")  # the flag replaced the file's value: the flag is named
    assert "in --config" not in shown


def test_compare_overrides_are_checked_before_the_out_directory_is_made(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text("[compare]\n[compare.train_overrides]\nlr = 50\n")
    refused(invoke("compare", "data", "--out", str(tmp_path / "c"), "--config", str(toml)),
            "`train_overrides.lr` (50)")
    assert not (tmp_path / "c").exists()


def test_check_table_reads_the_types_from_the_dataclass():
    """A field added to a config is a key at once, and checked (no list of keys to keep in step)."""
    import dataclasses

    from itemsage.config import ConfigError, Table, check_table

    @dataclasses.dataclass
    class Options:
        size: int = 1
        names: tuple[str, ...] = ()
        rate: float | None = None

    spec = Table(Options, "x", aliases={"n": "names"})
    values, names = check_table({"size": 3, "n": ["a"], "rate": None}, spec, where="f.toml [x]")
    assert values == {"size": 3, "names": ("a",), "rate": None}
    assert names == {"x.size": "size", "x.names": "n", "x.rate": "rate"}
    with pytest.raises(ConfigError, match=r"`rate` in f.toml \[x\] must be a finite number, got 'fast'"):
        check_table({"rate": "fast"}, spec, where="f.toml [x]")
    with pytest.raises(ConfigError, match=r"`n` in f.toml \[x\] must be a list of strings, got \[1\]"):
        check_table({"n": [1]}, spec, where="f.toml [x]")
