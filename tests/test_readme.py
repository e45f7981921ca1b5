"""README.md's code blocks, extracted from the file, so the README cannot drift from the code.

Fast (default suite): every block is one this file knows how to check; every `itemsage ...` line
parses against the CLI (commands, options, choices); every `curl` names a route of the service with
a body its request model accepts; the live-update example builds a body the service accepts from a
demo-shaped catalog; the Python block runs as written on a tiny model (a stand-in text encoder).

Slow (`-m slow`): the blocks run as written, in one directory, on a tiny demo shop: the pipeline
(sizes cut: 300 products, a tiny preset, a few steps), the Python block, a run from a file, the live
updates against the pipeline's running server, a new catalog without logs, and the demo twice.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import itemsage

ROOT = Path(__file__).resolve().parents[1]
SRC = Path(itemsage.__file__).resolve().parents[1]

# Each block of README.md, by (section, n-th block of the section): what checks it.
KNOWN = {
    ("Two commands", 0): "install, then the demo (slow: the demo; pip and pytest are this suite's own setup)",
    ("The pipeline, one command per stage", 0): "slow: run with sizes cut",
    ("From Python", 0): "fast: run on a tiny model; slow: on the pipeline's model",
    ("Runs in a file", 0): "slow: run",
    ("Live updates", 0): "fast: the upsert body; slow: run against the pipeline's server",
    ("Filters: only the products a shop may show", 0): "fast: the route, the body and its filter on a catalog "
                                                       "with those columns (the demo shop has no in_stock)",
    ("Your own data", 0): "slow: run",
}


def readme_blocks() -> list[tuple[str, int, str, str]]:
    """(section heading, n-th block in it, language, text) of every fenced block of README.md."""
    blocks, section, counts = [], "", {}
    lines = (ROOT / "README.md").read_text().splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            section = line.lstrip("#").strip()
        elif line.startswith("```"):
            language, body = line[3:].strip(), []
            i += 1
            while not lines[i].startswith("```"):
                body.append(lines[i])
                i += 1
            n = counts.get(section, 0)
            counts[section] = n + 1
            blocks.append((section, n, language, "\n".join(body) + "\n"))
        i += 1
    return blocks


def block(section: str, n: int = 0) -> str:
    return next(text for s, i, _, text in readme_blocks() if (s, i) == (section, n))


def commands(script: str) -> list[list[str]]:
    """The simple commands of a bash block: continuation lines joined, comments dropped, split at
    &&, ;, | and &; a quoted argument spanning lines (python -c '...') stays one word."""
    out, buffer = [], ""
    for line in script.replace("\\\n", " ").splitlines():
        buffer += line + "\n"
        lexer = shlex.shlex(buffer, posix=True, punctuation_chars=";&|")
        lexer.whitespace_split, lexer.commenters = True, "#"
        try:
            tokens = list(lexer)
        except ValueError:  # a quote still open: the command goes on on the next line
            continue
        buffer, current = "", []
        for token in tokens:
            if token in (";", "&&", "&", "|", "||"):
                out, current = out + [current] if current else out, []
            else:
                current.append(token)
        if current:
            out.append(current)
    return out


def test_every_readme_block_is_checked():
    found = {(section, n) for section, n, _, _ in readme_blocks()}
    assert found == set(KNOWN), f"README blocks without a check here: {sorted(found - set(KNOWN))}; " \
                                f"checks of blocks no longer there: {sorted(set(KNOWN) - found)}"


def test_every_itemsage_command_in_the_readme_parses():
    """Commands, options, values and choices as the CLI reads them (nothing runs)."""
    import click
    from typer.main import get_command

    from itemsage.cli import app

    group = get_command(app)
    parsed = 0
    for section, n, language, text in readme_blocks():
        if language != "bash":
            continue
        for argv in commands(text):
            if not argv[0].endswith("itemsage"):
                continue
            args = [a for a in argv[1:] if a != "-q"]
            command = group.get_command(click.Context(group), args[0])
            assert command is not None, f"{section}: unknown command {args[0]!r} in {' '.join(argv)}"
            try:
                command.make_context(args[0], args[1:], parent=click.Context(group))
            except click.ClickException as err:
                pytest.fail(f"{section}: `{' '.join(argv)}` is refused by the CLI: {err.format_message()}")
            parsed += 1
    assert parsed >= 13


def test_every_curl_in_the_readme_names_a_route_and_a_valid_body():
    from itemsage.serve import bodies

    models = {"/admin/products": bodies.UpsertRequest, "/admin/products/delete": bodies.DeleteRequest,
              "/admin/reload": bodies.ReloadRequest}
    calls = 0
    for argv in commands(block("Live updates")):
        if argv[0] != "curl":
            continue
        url = next(a for a in argv if "localhost:8000" in a)
        path = url.split("localhost:8000", 1)[1]
        assert argv[argv.index("-X") + 1] == "POST" and path in models
        body = argv[argv.index("-d") + 1] if "-d" in argv else None
        if body is not None and not body.startswith("@"):
            models[path].model_validate(json.loads(body))
        calls += 1
    assert calls == 3


def test_the_filter_example_is_a_closeup_body_whose_filter_passes_what_it_says():
    from itemsage.index.attributes import AttributeStore
    from itemsage.index.filters import compile_filter
    from itemsage.serve import bodies

    (argv,) = [a for a in commands(block("Filters: only the products a shop may show")) if a[0] == "curl"]
    url = next(a for a in argv if "localhost:8000" in a)
    assert url.split("localhost:8000", 1)[1] == "/v1/closeup" and argv[argv.index("-X") + 1] == "POST"
    body = bodies.CloseupRequest.model_validate(json.loads(argv[argv.index("-d") + 1]))
    store = AttributeStore.from_table(pa.table({
        "category": [["shoes"], ["boots", "sale"], ["hats"], ["boots"], []],
        "in_stock": [True, True, True, False, True]}))
    mask = compile_filter(store, body.filter)
    assert np.flatnonzero(mask).tolist() == [0, 1]  # a shoe or a boot, in stock


def demo_like_catalog(path: Path, n: int = 3, image_dim: int = 256) -> None:
    """A catalog shaped like the demo shop's (timestamps, image vectors)."""
    rng = np.random.default_rng(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({
        "product_id": [f"p{i:06d}" for i in range(n)],
        "title": [f"oak chair {i}" for i in range(n)],
        "listed_at": pa.array([1_700_000_000_000 + i for i in range(n)], pa.timestamp("ms", tz="UTC")),
        "image_embeddings": [rng.standard_normal((2, image_dim)).astype(np.float32).tolist() for _ in range(n)],
    }), path)


def test_the_live_update_example_builds_a_body_the_service_accepts(tmp_path):
    from itemsage.serve.bodies import UpsertRequest

    demo_like_catalog(tmp_path / "runs" / "shop" / "catalog.parquet")
    python = next(argv for argv in commands(block("Live updates")) if argv[0] == "python")
    assert python[1] == "-c"
    with open(tmp_path / "upsert.json", "w") as out:
        subprocess.run([sys.executable, "-c", python[2]], cwd=tmp_path, stdout=out, check=True)
    request = UpsertRequest.model_validate_json((tmp_path / "upsert.json").read_text())
    first = pq.read_table(tmp_path / "runs" / "shop" / "catalog.parquet")["image_embeddings"][0].as_py()[0]
    (product,) = request.products
    assert product.product_id == "new-1" and product.image_embeddings == [pytest.approx(first)]


def test_the_python_block_runs_as_written_on_a_tiny_model(tmp_path, monkeypatch):
    import torch

    from itemsage.data.text import Vocabulary
    from itemsage.encoders import text as text_encoder
    from itemsage.model.config import model_config
    from itemsage.model.model import save_model
    from itemsage.model.tower import ItemSage, QueryAdapters

    class Encoder:  # MiniLM's place (it takes tens of seconds to load): 384-d unit rows
        dim = 384

        def encode(self, texts, batch_size=256, progress=False):
            rows = np.random.default_rng(len(texts)).standard_normal((len(texts), self.dim)).astype(np.float32)
            return rows / np.linalg.norm(rows, axis=1, keepdims=True)

    monkeypatch.setattr(text_encoder, "TextQueryEncoder", Encoder)
    torch.manual_seed(0)
    cfg = model_config("tiny")
    vocab = Vocabulary.build([["oak chair"], ["red linen chair"]])
    save_model(tmp_path / "runs" / "train" / "model", ItemSage(cfg, len(vocab), 256),
               QueryAdapters({"search": 384}, cfg.out_dim), cfg, vocab, image_dim=256, query_dims={"search": 384})
    demo_like_catalog(tmp_path / "runs" / "shop" / "catalog.parquet", n=120)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(block("From Python"), "README.md", "exec"), scope)  # noqa: S102  (the README's own code)
    assert scope["P"].shape == (100, cfg.out_dim) and scope["Q"].shape == (1, cfg.out_dim)
    assert scope["scores"].shape == (1, 100) and np.all(np.abs(scope["scores"]) <= 1 + 1e-5)


# ---- slow: the blocks as written, on a tiny demo shop ---------------------------------------------------

CUT = [  # the sizes of the README's commands, cut to a tiny run (what each replaces is shown)
    ("--products 20000", "--products 300"),
    ("--preset cpu --minutes 6", "--preset tiny --steps 20 --eval-every 10"),
    ("--seeds 3", "--seeds 1 --runs itemsage,text_only --preset tiny --steps 10 --eval-every 5"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bash(script: str, cwd: Path, env: dict, timeout: int = 900) -> subprocess.CompletedProcess:
    """A README block under bash -e, `itemsage` and `python` being this interpreter with this source tree."""
    prelude = (f'itemsage() {{ "{sys.executable}" -m itemsage.cli "$@"; }}\n'
               f'python() {{ "{sys.executable}" "$@"; }}\npython3() {{ "{sys.executable}" "$@"; }}\nset -e\n')
    result = subprocess.run(["bash", "-c", prelude + script], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=timeout, check=False)
    assert result.returncode == 0, f"{script}\n--- stdout\n{result.stdout[-4000:]}\n--- stderr\n{result.stderr[-4000:]}"
    return result


@pytest.mark.slow  # a tiny demo shop through every stage, a server, a compare and a demo: minutes
def test_the_readme_blocks_run_as_written(tmp_path):
    import httpx

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
           "ITEMSAGE_RELOAD_TOKEN": "readme-token", "OMP_NUM_THREADS": "1"}
    port = free_port()

    # The pipeline, sizes cut; serve runs in the background, for the live updates below.
    pipeline = block("The pipeline, one command per stage")
    for old, new in CUT:
        assert old in pipeline, old
        pipeline = pipeline.replace(old, new)
    serve_line = next(line for line in pipeline.splitlines() if line.startswith("itemsage serve"))
    bash(pipeline.replace(serve_line, ""), tmp_path, env, timeout=1800)
    for name in ("shop", "data", "train/model", "embeddings", "eval", "compare"):
        assert (tmp_path / "runs" / name / "manifest.json").is_file(), name
    server = subprocess.Popen(["bash", "-c", f'exec "{sys.executable}" -m itemsage.cli '
                               + serve_line.split("itemsage ", 1)[1].split("#")[0] + f" --port {port}"],
                              cwd=tmp_path, env=env, stdout=open(tmp_path / "serve.log", "w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        end = time.monotonic() + 180
        while True:
            assert server.poll() is None and time.monotonic() < end, (tmp_path / "serve.log").read_text()
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        assert httpx.get(f"{url}/").status_code == 200
        assert httpx.post(f"{url}/v1/search", json={"text": "oak chair", "k": 5}, timeout=60).status_code == 200
        ready = httpx.get(f"{url}/readyz").json()
        assert ready["live_log"]["role"] == "writer" and ready["product_query"]["source"] == "image"

        # Live updates, as written (the server's port instead of 8000; curl fails on an HTTP error).
        live = block("Live updates").replace("localhost:8000", f"127.0.0.1:{port}").replace("curl -X", "curl -sSf -X")
        before = ready["index_version"]
        bash(live, tmp_path, env)
        after = httpx.get(f"{url}/readyz").json()
        assert after["index_version"] != before and after["products"] == ready["products"]  # +1 -1
        hit = httpx.post(f"{url}/v1/closeup", json={"product_id": "new-1", "k": 3, "exclude_self": False,
                                                     "product_to_product": True}).json()
        assert hit["ids"][0] == "new-1"
        assert httpx.post(f"{url}/v1/closeup", json={"product_id": "p000002"}).status_code == 404
        assert httpx.post(f"{url}/v1/closeup", json={"product_id": "new-1", "k": 3}).status_code == 200
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()

    # From Python, as written, on the pipeline's model.
    code = ("import numpy as np\n" + block("From Python")
            + "assert P.shape == (100, model.config.out_dim) and scores.shape == (1, 100)\n"
            + "assert np.allclose(np.linalg.norm(P, axis=1), 1, atol=1e-4)\n")
    bash(f"python - <<'EOF'\n{code}EOF\n", tmp_path, env)

    # Runs in a file: a run.toml of our own (the README shows the command, not the file).
    (tmp_path / "run.toml").write_text('[train]\ndataset = "runs/data"\nout = "runs/from-file"\npreset = "tiny"\n'
                                       "max_steps = 4\neval_every = 2\n")
    bash(block("Runs in a file"), tmp_path, env)
    repeated, original = (json.loads((tmp_path / "runs" / d / "model" / "config.json").read_text())
                          for d in ("again", "train"))
    assert repeated["extra"]["training"]["steps"] == original["extra"]["training"]["steps"] == 20
    assert (tmp_path / "runs" / "from-file" / "model" / "manifest.json").is_file()

    # A new catalog, no logs: 20 products of the shop as JSON Lines.
    rows = pq.read_table(tmp_path / "runs" / "shop" / "catalog.parquet").slice(0, 20).to_pylist()
    (tmp_path / "new_products.jsonl").write_text(
        "".join(json.dumps({k: v for k, v in r.items() if k != "listed_at"}) + "\n" for r in rows))
    bash(block("Your own data"), tmp_path, env)
    from itemsage.index.versions import load_current

    assert len(load_current(tmp_path / "runs" / "new-index")) == 20

    # Two commands: the demo (pip and pytest are this suite's own setup), sizes cut, twice: the second
    # run skips every stage, evaluate included, and prints the table again.
    demo = next(argv for argv in commands(block("Two commands")) if argv[0].endswith("itemsage"))
    assert demo[1:] == ["demo"]
    args = "demo --products 300 --train-minutes 0.2 --preset tiny"
    first = bash(f"itemsage {args}", tmp_path, env)
    again = bash(f"itemsage {args}", tmp_path, env)
    assert "Recall@10" in first.stdout and "Recall@10" in again.stdout
    assert again.stdout.count("already complete, skipped") == 7, again.stdout  # the graph stage is the 7th
