"""Show what a user sees when `itemsage ingest` meets bad input (docs/ARCHITECTURE.md: reported, never dropped),
and when `itemsage train`, `compare` or `demo` meets a malformed run file (`--config`).

In a temporary directory this builds a small valid catalog and engagement log (Parquet), then, for
each kind of bad input, a copy holding exactly that one defect. It runs the real command line on
each copy and records what a user sees: for a bad ROW, the printed summary and the rejects.jsonl
record, plus the "nothing lost" check (rows read = kept + rejected); for a bad FILE, the exit code
and the message. Then each malformed run file of RUN_FILES goes to the command that reads it: it
must be refused with exit 2 and one line naming the file and the key. The result is a Markdown
document (docs/BAD_INPUT.md).

    python benchmarks/show_bad_inputs.py                        # print the document
    python benchmarks/show_bad_inputs.py --write docs/BAD_INPUT.md
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq

T0 = dt.datetime(2024, 3, 1, tzinfo=dt.timezone.utc)
CATALOG_SCHEMA = pa.schema([("product_id", pa.string()), ("title", pa.string()), ("brand", pa.string()),
                            ("image_embeddings", pa.list_(pa.list_(pa.float32()))),
                            ("image_paths", pa.list_(pa.string()))])
LOG_SCHEMA = pa.schema([("surface", pa.string()), ("engagement", pa.string()), ("product_id", pa.string()),
                        ("timestamp", pa.timestamp("ms", tz="UTC")), ("user_id", pa.string()),
                        ("weight", pa.float32()), ("query_text", pa.string()),
                        ("query_embedding", pa.list_(pa.float32())), ("query_product_id", pa.string())])


def vec(seed: int, width: int = 8) -> list[float]:
    return [round(((seed * 7 + j * 3) % 11) / 10 - 0.5, 2) for j in range(width)]


def product(pid: str | None, title: str, images: list[list[float]] | None = None, paths=None) -> dict:
    return {"product_id": pid, "title": title, "brand": "Acme", "image_embeddings": images, "image_paths": paths}


def log_row(surface: str, engagement: str, pid: str | None, hours: float, /, **extra) -> dict:
    """A valid row of `surface` (search: query_text; else an 8-d query_embedding), then `extra` over it."""
    query = {"query_text": "oak chair"} if surface == "search" else {"query_embedding": vec(int(hours))}
    row = {"surface": surface, "engagement": engagement, "product_id": pid, "user_id": f"u{int(hours) % 3}",
           "timestamp": T0 + dt.timedelta(hours=hours), "weight": 1.0, **query}
    return {**row, **extra}


@dataclass
class Inputs:
    """One run's input files; a case edits a copy of the valid ones."""
    catalog: list[dict] = field(default_factory=lambda: [
        product(f"p{i}", t, [vec(i), vec(i + 20)]) for i, t in enumerate(
            ["Oak chair", "Pine table", "Linen sofa", "Wool rug", "Brass lamp", "Glass vase"])])
    logs: list[dict] = field(default_factory=lambda: [
        log_row(s, e, f"p{i % 6}", 12.0 * i) for i, (s, e) in enumerate(
            [("closeup", "click"), ("home", "save"), ("search", "click"), ("search", "add_to_cart"),
             ("closeup", "checkout"), ("home", "click"), ("closeup", "save"), ("search", "checkout")])])
    catalog_schema: pa.Schema = CATALOG_SCHEMA
    log_schema: pa.Schema = LOG_SCHEMA
    catalog_name: str = "catalog.parquet"
    files: dict[str, bytes] = field(default_factory=dict)  # extra files (images), relative path -> bytes

    def write(self, where: Path) -> None:
        for name, rows, sch in ((self.catalog_name, self.catalog, self.catalog_schema),
                                ("logs.parquet", self.logs, self.log_schema)):
            if name.endswith(".jsonl"):  # as json.dumps writes it: a lone surrogate stays its \ud800 escape
                (where / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
                continue
            table = pa.Table.from_pylist(rows, schema=sch)
            if name.endswith(".csv"):
                import pyarrow.csv as pacsv
                pacsv.write_csv(table.drop_columns(["image_embeddings", "image_paths"]), where / name)
            else:
                pq.write_table(table, where / name)
        for name, data in self.files.items():
            (where / name).parent.mkdir(parents=True, exist_ok=True)
            (where / name).write_bytes(data)


def rename(sch: pa.Schema, old: str, new: str, rows: list[dict]) -> pa.Schema:
    for r in rows:
        r[new] = r.pop(old)
    return sch.set(sch.get_field_index(old), pa.field(new, sch.field(old).type))


def retype(sch: pa.Schema, name: str, typ: pa.DataType) -> pa.Schema:
    return sch.set(sch.get_field_index(name), pa.field(name, typ))


def ts_as_text(i: Inputs, bad: str) -> None:
    """Timestamps as ISO strings (a Parquet timestamp cannot hold an unreadable value), one bad."""
    for r in i.logs:
        r["timestamp"] = r["timestamp"].isoformat().replace("+00:00", "Z")
    i.log_schema = retype(i.log_schema, "timestamp", pa.string())
    i.logs.append(log_row("search", "click", "p1", 30, timestamp=bad))


def listed_as_text(i: Inputs, bad: str) -> None:
    """Every product gets a `listed_at` as ISO text; one extra product's is unreadable."""
    for r in i.catalog:
        r["listed_at"] = "2024-01-01T00:00:00Z"
    i.catalog_schema = i.catalog_schema.append(pa.field("listed_at", pa.string()))
    i.catalog.append({**product("p9", "Teak bench", [vec(9), vec(10)]), "listed_at": bad})


MANY = " (most rows, with a warning)"  # suffix of an expected reason: the good rows are rejected too

# (title, the defect in words, expected reject reason or None = the file must be refused, edit)
CASES: list[tuple[str, str, str | None, Callable[[Inputs], None]]] = [
    ("Missing product_id", "one extra catalog row has product_id null", "missing_product_id",
     lambda i: i.catalog.append(product(None, "Nameless stool", [vec(9), vec(10)]))),
    ("Duplicate product_id", "one extra catalog row reuses product_id 'p2'", "duplicate_product_id",
     lambda i: i.catalog.append(product("p2", "Linen sofa, again", [vec(2), vec(3)]))),
    ("Image vector of the wrong width", "product p9's second image vector has 7 numbers, the others 8",
     "bad_vector_width", lambda i: i.catalog.append(product("p9", "Teak bench", [vec(9), vec(10, 7)]))),
    # The documented rule (the first valid vector fixes the width) rejects the good rows here; the run
    # must say so loudly: a warning in the summary, and details naming the width's origin and --image-dim.
    ("Wrong width in the first catalog row", "product p0 (row 0) has one 7-d image vector, every other one is 8-d",
     "bad_vector_width" + MANY, lambda i: i.catalog[0].update(image_embeddings=[vec(0, 7)])),
    ("Image vector with NaN", "product p9's first image vector holds a NaN", "non_finite_vector",
     lambda i: i.catalog.append(product("p9", "Teak bench", [vec(9)[:3] + [float("nan")] + vec(9)[4:]]))),
    ("Image vector with inf", "product p9's second image vector holds +inf", "non_finite_vector",
     lambda i: i.catalog.append(product("p9", "Teak bench", [vec(9), [float("inf")] + vec(10)[1:]]))),
    ("Unreadable listed_at", "the catalog gives listed_at as ISO strings; product p9's is 'spring 2024'",
     "bad_timestamp", lambda i: listed_as_text(i, "spring 2024")),
    ("Unknown surface", "one extra log row has surface 'Search' (capital S)", "unknown_surface",
     lambda i: i.logs.append(log_row("search", "click", "p1", 30, surface="Search"))),
    ("Unknown engagement", "one extra log row has engagement 'purchase'", "unknown_engagement",
     lambda i: i.logs.append(log_row("search", "purchase", "p1", 30))),
    ("Log row whose product is not in the catalog", "one extra log row names product 'p404'",
     "unknown_product", lambda i: i.logs.append(log_row("closeup", "click", "p404", 30))),
    ("Unreadable timestamp", "timestamps are ISO strings; one extra log row has '2024-02-30T10:00:00Z'",
     "bad_timestamp", lambda i: ts_as_text(i, "2024-02-30T10:00:00Z")),
    ("Missing query", "one extra search row has neither query_text nor query_embedding", "missing_query",
     lambda i: i.logs.append(log_row("search", "click", "p1", 30, query_text=None))),
    ("Query product not in the catalog",
     "one extra closeup row gives query_product_id 'p404' (no such product) instead of a query_embedding",
     "unknown_query_product",
     lambda i: i.logs.append(log_row("closeup", "click", "p1", 30, query_embedding=None, query_product_id="p404"))),
    ("Query vector of the wrong width", "one extra home row has a 5-d query_embedding (other home rows: 8-d)",
     "bad_vector_width", lambda i: i.logs.append(log_row("home", "click", "p1", 30, query_embedding=vec(1, 5)))),
    ("Negative weight", "one extra log row has weight -1", "bad_weight",
     lambda i: i.logs.append(log_row("search", "click", "p1", 30, weight=-1.0))),
    ("Image file that does not exist", "product p9 has no vectors, image_paths ['img/missing.jpg'] (no such file)",
     "unreadable_image", lambda i: i.catalog.append(product("p9", "Teak bench", None, ["img/missing.jpg"]))),
    ("Image file that is not an image", "product p9's image_paths ['img/corrupt.jpg'] holds 16 bytes of text",
     "unreadable_image", lambda i: (i.catalog.append(product("p9", "Teak bench", None, ["img/corrupt.jpg"])),
                                    i.files.update({"img/corrupt.jpg": b"this is no jpeg\n"}))),
    ("Text that is not Unicode", "the catalog is JSON Lines; product p9's title is \"Teak \\ud800 bench\" (a lone "
     "surrogate escape: no character)", "bad_text_encoding",
     lambda i: (setattr(i, "catalog_name", "catalog.jsonl"),
                i.catalog.append(product("p9", "Teak \ud800 bench", [vec(9), vec(10)])))),
    ("Logs from another shop", "1,000 extra log rows name products p1000..p1999, which the 6-product catalog "
     "does not have (99% of the log rows rejected as unknown_product)", None,
     lambda i: i.logs.extend(log_row("closeup", "click", f"p{1000 + k}", 30 + k / 100) for k in range(1000))),
    ("Catalog without a product_id column", "the id column is called 'sku'", None,
     lambda i: setattr(i, "catalog_schema", rename(i.catalog_schema, "product_id", "sku", i.catalog))),
    ("product_id stored as floats", "catalog product_id is a float64 column (1.0, 2.0, ...)", None,
     lambda i: (setattr(i, "catalog_schema", retype(i.catalog_schema, "product_id", pa.float64())),
                [r.update(product_id=float(n)) for n, r in enumerate(i.catalog)])),
    ("Logs without a timestamp column", "the time column is called 'event_time'", None,
     lambda i: setattr(i, "log_schema", rename(i.log_schema, "timestamp", "event_time", i.logs))),
    ("Catalog with no rows", "catalog.parquet has the right columns and zero rows", None,
     lambda i: i.catalog.clear()),
    ("Catalog as CSV", "the catalog is catalog.csv (text columns only)", None,
     lambda i: setattr(i, "catalog_name", "catalog.csv")),
]

def child_env() -> dict[str, str]:
    """The environment of the commands run: each runs in its own scratch directory, so a relative
    PYTHONPATH (`PYTHONPATH=src`) is made absolute, or they would import another itemsage."""
    path = os.pathsep.join(str(Path(p).resolve()) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p)
    return {**os.environ, "COLUMNS": "1000", **({"PYTHONPATH": path} if path else {})}  # no wrapping: one line


LOG_PREFIX = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ ")  # the CLI's logging format


def run_case(root: Path, n: int, edit: Callable[[Inputs], None] | None) -> dict:
    """Write the inputs into root/case-n, run `itemsage ingest` there, collect what a user sees."""
    where = root / f"case-{n:02d}"
    where.mkdir()
    inputs = Inputs()
    if edit:
        edit(inputs)
    inputs.write(where)
    cmd = ["itemsage", "ingest", "--catalog", inputs.catalog_name, "--logs", "logs.parquet",
           "--out", "dataset", "--no-progress"]
    env = child_env()
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "itemsage.cli", *cmd[1:]], cwd=where, env=env,
                          capture_output=True, text=True)
    result = {"cmd": " ".join(cmd), "rc": proc.returncode, "seconds": time.perf_counter() - start,
              "stdout": proc.stdout.replace(str(where), "."),
              "stderr": "\n".join(LOG_PREFIX.sub("", ln) for ln in proc.stderr.replace(str(where), ".").splitlines()),
              "written": (where / "dataset").exists()}
    if result["written"]:
        result["manifest"] = json.loads((where / "dataset" / "manifest.json").read_text())
        result["rejects"] = [json.loads(ln) for ln in (where / "dataset" / "rejects.jsonl").read_text().splitlines()]
    return result


def summary_lines(stdout: str) -> str:
    """The printed inputs and rejects tables (everything before 'pairs per task')."""
    head = stdout.split("pairs per task")[0].rstrip().splitlines()
    return "\n".join(ln.rstrip() for ln in head)


def row_section(r: dict, expect: str) -> tuple[list[str], bool]:
    if not r["written"]:
        return [f"**NOT HANDLED: exit code {r['rc']}, no dataset written.**", "```text",
                (r["stdout"] + r["stderr"]).strip()[-3000:], "```"], False
    c = r["manifest"]["counts"]
    read, kept = c["catalog_rows"] + c["log_rows"], c["products"] + c["train"] + c["validation"] + c["test"] + c["gap_rows"]
    lost_ok = read == kept + c["rejected"] and len(r["rejects"]) == c["rejected"]
    if expect.endswith(MANY):
        expect = expect[: -len(MANY)]
        details = [rec["detail"] for rec in r["rejects"] if rec["reason"] == expect]
        caught = (c["rejects"][expect] >= 1 and "WARNING" in summary_lines(r["stdout"])
                  and all("fixed by" in d and "--image-dim" in d for d in details))
    else:
        caught = c["rejected"] == 1 and c["rejects"][expect] == 1
    out = [f"Printed summary (exit code {r['rc']}):", "```text", summary_lines(r["stdout"]), "```"]
    warnings = [ln for ln in r["stderr"].splitlines() if ln.startswith(("WARNING", "ERROR"))]
    if warnings:
        out += ["Also logged:", "```text", *warnings, "```"]
    out += ["rejects.jsonl (each record's `record` copy of the input row left out here):", "```json"]
    out += [json.dumps({k: v for k, v in rec.items() if k != "record"}, ensure_ascii=False) for rec in r["rejects"][:4]]
    out += [f"... and {len(r['rejects']) - 4} more"] * (len(r["rejects"]) > 4)
    got = {k: v for k, v in c["rejects"].items() if v}
    out += ["```", f"Nothing lost: read {read} = kept {kept} + rejected {c['rejected']}: "
            f"{'yes' if lost_ok else '**NO**'}; rejects.jsonl lines: {len(r['rejects'])}.",
            "Verdict: " + ("caught." if caught else f"**PROBLEM: expected exactly the defective row rejected "
                                                    f"as `{expect}`, got {got}.**")]
    if caught and c["rejected"] > 1:
        out[-1] = ("Verdict: caught, loudly: by the documented rule the odd first row fixed the width, so the "
                   "good rows were rejected; the summary warns, and each detail names where the width was "
                   "fixed and `--image-dim`.")
    return out, caught and lost_ok and "Traceback" not in r["stderr"]


def file_section(r: dict) -> tuple[list[str], bool]:
    shown = (r["stdout"].rstrip() + "\n" + r["stderr"]).strip()
    ok = r["rc"] != 0 and not r["written"] and "Traceback" not in shown
    verdict = ("refused, no traceback, nothing written" if ok else
               f"**NOT REFUSED CLEANLY** (exit {r['rc']}, dataset written: {r['written']}, "
               f"traceback: {'Traceback' in shown})")
    return [f"Exit code {r['rc']}. Printed:", "```text", shown[-3000:], "```", f"Verdict: {verdict}."], ok


# ---- run files (`--config`) ----------------------------------------------------------------------

DEEP = "x = " + "[" * 5000 + "]" * 5000 + "\n"  # nested 5,000 deep (tomllib recurses once per level)
# (command, run file name, its text (None: no file; "<dir>": a directory), the key the refusal must name
# or None (the file as a whole), extra arguments). Every case must exit 2 with one line that names the
# file (and the key as written), with no traceback and no directory made.
RUN_FILES: list[tuple[str, str, str | None, str | None, list[str]]] = [
    # issue 25.1: each ended in a traceback
    ("compare", "run.toml", "[compare]\ntrain_overrides = {max_stepz = 1}\n", "train_overrides.max_stepz", []),
    ("compare", "run.toml", "[compare]\ntrain_overrides = 5\n", "train_overrides", []),
    ("compare", "run.toml", "[compare]\nruns = 5\n", "runs", []),
    ("demo", "run.toml", '[demo]\ntrain_minutes = "six"\n', "train_minutes", []),
    ("demo", "run.toml", '[demo]\nproducts = "many"\n', "products", []),
    ("demo", "run.toml", '[demo]\nmodel = "x"\n', "model", []),
    ("demo", "run.toml", "[demo]\nout = 5\n", "out", ["<no --out>"]),
    ("train", "run.toml", "[train]\nmodel = 5\n", "model", []),
    ("train", "run.toml", "[train]\ndataset = 5\n", "dataset", ["<no dataset>"]),
    ("train", "run.toml", DEEP, None, []),
    # issue 25.2: unclear refusals, and absurd values that were accepted
    ("compare", "run.toml", "[compare]\nsteps = 2.5\n", "steps", []),
    ("compare", "run.toml", '[compare]\nseeds = "three"\n', "seeds", []),
    ("train", "run.toml", '[train]\nengagement_weights = {click = "x"}\n', "engagement_weights.click", []),
    ("train", "run.toml", '[train]\ndataset = "does/not/exist"\n', "dataset", ["<no dataset>"]),
    ("train", "run.toml", "[train]\nmax_steps = 99999999999999999999999\n", "max_steps", []),
    ("train", "run.toml", "[train]\nminutes = 1e9\n", "minutes", []),
    ("train", "run.toml", "[train]\nbatch_size = 100000000\n", "batch_size", []),
    ("train", "run.toml", "[train.model]\nhash_buckets = 10000000000\n", "model.hash_buckets", []),
    ("compare", "run.toml", "[compare]\nseeds = 1000\n", "seeds", []),
    ("demo", "run.toml", "[demo]\nproducts = 1000000000\n", "products", []),
    ("train", "run.toml", "[train]\nlr = nan\n", "lr", []),
    # keys named as the flags are: read, so the refusal is about their value, named as written
    ("train", "run.toml", "[train]\nsteps = 0\n", "steps", []),
    ("train", "run.toml", "[train]\nbatch-size = 1\n", "batch-size", []),
    ("compare", "run.toml", "[compare]\nmax_steps = 0\n", "max_steps", []),
    ("demo", "run.toml", "[demo]\nminutes = -1\n", "minutes", []),
    ("train", "run.toml", "[train]\nsteps = 5\nmax_steps = 6\n", "max_steps", []),
    # a value of the wrong type, for every kind of key of each table
    ("train", "run.toml", "[train]\npreset = 5\n", "preset", []),
    ("train", "run.toml", '[train]\nbatch_size = "16"\n', "batch_size", []),
    ("train", "run.toml", '[train]\nlr = "fast"\n', "lr", []),
    ("train", "run.toml", "[train]\nsteps = 1.5\n", "steps", []),
    ("train", "run.toml", '[train]\nminutes = "ten"\n', "minutes", []),
    ("train", "run.toml", "[train]\ntasks = [1, 2]\n", "tasks", []),
    ("train", "run.toml", "[train]\nengagement_weights = 5\n", "engagement_weights", []),
    ("train", "run.toml", '[train]\namp = "yes"\n', "amp", []),
    ("train", "run.toml", "[train]\nout = 5\n", "out", ["<no --out>"]),
    ("train", "run.toml", '[train.model]\nd_model = "big"\n', "model.d_model", []),
    ("train", "run.toml", '[train.model]\ndropout = "none"\n', "model.dropout", []),
    ("train", "run.toml", "[train.model]\naggregator = 1\n", "model.aggregator", []),
    ("train", "run.toml", "[train.model]\ntype_embedding = 1\n", "model.type_embedding", []),
    ("train", "run.toml", "[train.model]\ntext_fields = 3\n", "model.text_fields", []),
    ("compare", "run.toml", "[compare]\npreset = true\n", "preset", []),
    ("compare", "run.toml", "[compare]\nbatch_size = 1.5\n", "batch_size", []),
    ("compare", "run.toml", '[compare]\neval_sample = "all"\n', "eval_sample", []),
    ("compare", "run.toml", '[compare]\nrandom_negatives_ratio = "four"\n', "random_negatives_ratio", []),
    ("compare", "run.toml", "[compare]\nout = []\n", "out", ["<no --out>"]),
    ("compare", "run.toml", '[compare]\ntrain_overrides = {model = {dropout = "x"}}\n',
     "train_overrides.model.dropout", []),
    ("demo", "run.toml", "[demo]\npreset = 0\n", "preset", []),
    ("demo", "run.toml", '[demo]\nsteps = "many"\n', "steps", []),
    ("demo", "run.toml", '[demo]\nlr = "high"\n', "lr", []),
    ("demo", "run.toml", "[demo]\nseed = 1.5\n", "seed", []),
    # unknown keys: every valid key listed, a near miss suggested
    ("train", "run.toml", "[train]\nstepz = 5\n", "stepz", []),
    ("compare", "run.toml", "[compare]\nbogus = 1\n", "bogus", []),
    ("demo", "run.toml", '[demo]\ndataset = "x"\n', "dataset", []),
    ("train", "run.toml", "[train.model]\nwidht = 3\n", "model.widht", []),
    # the file as a whole
    ("train", "run.toml", "[train\nsteps = 5\n", None, []),
    ("train", "run.toml", None, None, []),
    ("train", "run.toml", "<dir>", None, []),
    ("train", "run.yaml", "steps: 5\n", None, []),
    ("train", "run.toml", "train = 5\n", "train", []),
    ("demo", "run.toml", "[train]\nseed = 1\n", None, []),
    ("train", "run.json", '{"train": {"steps": "x"}}', "steps", []),
    ("train", "run.toml", b"\xff\xfe[train]\n".decode("latin-1"), None, []),
]


def run_config_case(root: Path, n: int, case: tuple) -> dict:
    """Write one run file into root/config-n and run its command there; what a user sees."""
    command, name, text, _, extra = case
    where = root / f"config-{n:02d}"
    where.mkdir()
    if text == "<dir>":
        (where / name).mkdir()
    elif text is not None:
        (where / name).write_text(text, encoding="latin-1" if "\xff" in text else "utf-8")
    args = [command] + (["data"] if command in ("train", "compare") and "<no dataset>" not in extra else [])
    args += ["--config", name] + ([] if "<no --out>" in extra else ["--out", "out"])
    proc = subprocess.run([sys.executable, "-m", "itemsage.cli", *args], cwd=where, capture_output=True, text=True,
                          env=child_env(), timeout=600)
    return {"cmd": "itemsage " + " ".join(args), "rc": proc.returncode, "shown": (proc.stdout + proc.stderr).strip(),
            "made": any(p.name not in (name,) for p in where.iterdir())}


def config_section(cases: list[tuple], results: list[dict]) -> tuple[list[str], int]:
    """The run-file table and the number of cases refused cleanly."""
    rows = ["| # | run file | command | exit | what it says | verdict |", "|---|---|---|---|---|---|"]
    ok_count = 0
    for n, (case, r) in enumerate(zip(cases, results), start=1):
        command, name, text, key, _ = case
        lines = r["shown"].splitlines()
        ok = (r["rc"] == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r["shown"]
              and name in lines[0] and (key is None or f"`{key}`" in lines[0]) and not r["made"])
        ok_count += ok
        shown_file = ("(no such file)" if text is None else "(a directory)" if text == "<dir>" else
                      "`x = [[[...` nested 5,000 deep" if text == DEEP else
                      "the bytes FF FE, then `[train]` (not UTF-8)" if "\xff" in text else
                      "`" + text.strip().replace("\n", "` `").replace("|", "\\|") + "`")
        message = r["shown"].replace("|", "\\|").replace("\n", " ")
        verdict = "refused: names " + (f"`{key}` and " if key else "") + "the file" if ok else "**NOT CLEAN**"
        rows.append(f"| {n} | {name}: {shown_file} | `{r['cmd']}` | {r['rc']} | {message} | {verdict} |")
    return rows, ok_count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", type=Path, help="Also write the Markdown document to this file.")
    args = parser.parse_args()
    start = time.perf_counter()
    doc = ["# What itemsage says about bad input: ingest's inputs, and run files", "",
           "Generated by `python benchmarks/show_bad_inputs.py --write docs/BAD_INPUT.md`: each case below is a "
           "valid 6-product catalog (8-d `image_embeddings`) and 8-row engagement log (closeup/home rows with "
           "8-d `query_embedding`, search rows with `query_text`) plus exactly one defect, run through "
           "the real command line in a scratch directory. Paths are relative to that directory.",
           "", "A bad **row** goes to `dataset/rejects.jsonl` with one reason and the run goes on; a bad "
           "**file** stops the run before anything is written (docs/ARCHITECTURE.md), as does one reason rejecting "
           "more than 90% of an input's rows (and at least 1,000). The last section feeds malformed run files "
           "(`--config`) to `itemsage train`, `compare` and `demo`.", ""]
    failures = []
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(max_workers=2) as pool:  # 2 runs at a time
        results = list(pool.map(lambda job: run_case(Path(tmp), *job), enumerate([None] + [c[3] for c in CASES])))
    base = results[0]
    ok = base["rc"] == 0 and base["written"] and base["manifest"]["counts"]["rejected"] == 0
    doc += ["## 0. The valid inputs", "", f"`{base['cmd']}` exit code {base['rc']}, rejected rows: "
            f"{base['manifest']['counts']['rejected'] if base['written'] else '?'} (must be 0).", ""]
    if not ok:
        failures.append("0. the valid inputs")
        doc += ["```text", (base["stdout"] + base["stderr"])[-3000:], "```", ""]
    for n, ((title, defect, expect, _), r) in enumerate(zip(CASES, results[1:]), start=1):
        kind = (f"row defect, expected reason `{expect.removesuffix(MANY)}`{MANY if expect.endswith(MANY) else ''}"
                if expect else "file defect, must be refused")
        lines, ok = row_section(r, expect) if expect else file_section(r)
        doc += [f"## {n}. {title}", "", f"Defect: {defect} ({kind}).", "", *lines, ""]
        if not ok:
            failures.append(f"{n}. {title}")
        print(f"{n:2d}. {title}: {'ok' if ok else 'PROBLEM'} ({r['seconds']:.1f} s)", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(max_workers=2) as pool:
        configs = list(pool.map(lambda job: run_config_case(Path(tmp), *job), enumerate(RUN_FILES, start=1)))
    rows, clean = config_section(RUN_FILES, configs)
    doc += ["## Malformed run files (`--config`)", "",
            "Each run file below is read by the command shown, in a scratch directory holding only that file "
            "(`data` does not exist there). Each must be refused with exit code 2 and one line that names the "
            "file, and the key as written in it when one key is at fault; no traceback, and no directory made. "
            "Keys are the flags' names (`steps`, `minutes`, `batch-size` as the flag is written); the fields' own "
            "names (`max_steps`, `train_minutes`) stay accepted, so those rows are refused for their value.", "",
            *rows, "", f"{clean} of {len(RUN_FILES)} run files refused cleanly.", ""]
    if clean < len(RUN_FILES):
        failures.append(f"{len(RUN_FILES) - clean} run file(s)")
    doc += ["## Result", "", f"{len(CASES)} input cases and {len(RUN_FILES)} run files; not caught or not "
            f"refused cleanly: {', '.join(failures) if failures else 'none'}.", ""]
    text = "\n".join(doc)
    print(text)
    if args.write:
        args.write.write_text(text, encoding="utf-8")
        print(f"wrote {args.write}", file=sys.stderr)
    print(f"{time.perf_counter() - start:.1f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
