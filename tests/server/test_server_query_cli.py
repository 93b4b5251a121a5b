"""`genrec serve` / `genrec query` as the lead registers them in genrec/cli.py, driven through typer's runner."""

from __future__ import annotations

import json

import pytest
import typer
from typer.testing import CliRunner

from genrec.server.cli import query_app, serve

pytest_plugins = ["serverfixtures"]

# Exactly the registration genrec/cli.py does.
app = typer.Typer()
app.command("serve")(serve)
app.add_typer(query_app, name="query")


@pytest.fixture(scope="module")
def cli(shared_server):
    runner = CliRunner()

    def invoke(*args):
        return runner.invoke(app, ["query", *map(str, args), "--target", shared_server.target])

    return invoke


def test_recommend(cli):
    res = cli("recommend", "--items", "1,2,3", "-k", "4", "--exclude-seen")
    assert res.exit_code == 0, res.output
    items = json.loads(res.stdout)["items"]
    assert len(items) == 4 and not {int(it["item_id"]) for it in items} & {1, 2, 3}


def test_bad_input_exits_2_with_the_server_message(cli):
    res = cli("recommend", "--items", "1,424242", "-k", "4")
    assert res.exit_code == 2
    assert "INVALID_ARGUMENT" in res.stderr and "424242" in res.stderr
    res = cli("recommend", "--items", "1", "--decoding", "sample")
    assert res.exit_code == 2 and "not served yet" in res.stderr
    res = cli("recommend", "--items", "1,2", "-k", "3", "--decoding", "ved", "--budget", "9")
    got = [it["item_id"] for it in json.loads(res.stdout)["items"]]
    assert res.exit_code == 0 and 1 <= len(got) <= 3 and len(set(got)) == len(got)  # VED may find fewer than k
    res = cli("recommend", "--items", "1,x")
    assert res.exit_code == 2 and "comma-separated list of integer item ids" in res.output


def test_search_embed_info(cli, served_bundle):
    res = cli("search", "--text", "scented candle", "-k", "3")
    assert res.exit_code == 0, res.output
    assert len(json.loads(res.stdout)["items"]) == 3
    res = cli("embed", "--text", "a", "--text", "b", "--role", "document")
    out = json.loads(res.stdout)
    assert res.exit_code == 0 and len(out["embeddings"]) == 2 and len(out["embeddings"][0]["values"]) == 384
    res = cli("info")
    assert res.exit_code == 0 and json.loads(res.stdout)["bundle_path"] == str(served_bundle)
    res = cli("search", "--text", "x", "--vector", "1,2")
    assert res.exit_code == 2 and "exactly one of" in res.output


def test_serve_help_documents_the_options():
    res = CliRunner().invoke(app, ["serve", "--help"], env={"COLUMNS": "200"})
    assert res.exit_code == 0
    for option in ("--bundle", "--port", "--metrics-port", "--max-batch-size", "--max-wait-ms", "--max-queue",
                   "--auth-token", "--tls-cert", "--tls-key", "--grace-s"):
        assert option in res.output
