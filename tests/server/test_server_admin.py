"""The admin surface: Reload needs auth (or the operator's explicit flag) and stays under the reload root; bundles
are verified on load and loaded as one consistent version; the caller's mistakes get their own status codes."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import grpc
import pytest

from genrec.core.bundle import Bundle, update_bundle
from genrec.server import engine as engine_module
from genrec.server.engine import Engine
from genrec.v1 import info_pb2

from conftest import run_cli
from serverutil import running

pytest_plugins = ["serverfixtures"]

TOKEN = "admin-token"


@pytest.fixture()
def bundles(tmp_path, served_bundle) -> Path:
    """A reload root holding a copy of the served bundle under `a`."""
    shutil.copytree(served_bundle, tmp_path / "root" / "a")
    return tmp_path / "root"


def reload(r, path: str | Path = "", metadata=()):
    return r.stubs.admin.Reload(info_pb2.ReloadRequest(bundle_path=str(path)), timeout=120, metadata=metadata)


def refused(r, path, code: grpc.StatusCode, *words: str, metadata=()) -> None:
    with pytest.raises(grpc.RpcError) as e:
        reload(r, path, metadata)
    assert e.value.code() == code, e.value.details()
    for word in words:
        assert word in e.value.details()


def test_reload_needs_the_token_or_the_operators_flag(bundles):
    with running(bundles / "a") as r:  # no token, no flag: Reload is off
        refused(r, "", grpc.StatusCode.PERMISSION_DENIED, "GENREC_AUTH_TOKEN", "--allow-unauthenticated-reload")
    with running(bundles / "a", token=None, auth_token=TOKEN) as r:
        auth = (("authorization", f"Bearer {TOKEN}"),)
        refused(r, "", grpc.StatusCode.UNAUTHENTICATED)
        assert reload(r, "", auth).bundle_path == str(bundles / "a")
    with running(bundles / "a", allow_unauthenticated_reload=True) as r:
        assert reload(r).bundle_path == str(bundles / "a")


def test_reload_stays_under_the_root_and_refuses_bad_paths(bundles, served_bundle, caplog):
    shutil.copytree(served_bundle, bundles / "b")
    with running(bundles / "a", allow_unauthenticated_reload=True) as r:
        before = r.stubs.info.GetInfo(info_pb2.GetInfoRequest(), timeout=10).bundle_id
        refused(r, served_bundle, grpc.StatusCode.PERMISSION_DENIED, "outside the reload root")
        refused(r, bundles / "a" / ".." / ".." / "elsewhere", grpc.StatusCode.PERMISSION_DENIED, "outside")
        os.symlink(served_bundle, bundles / "link")  # a link inside the root to a bundle outside it
        refused(r, bundles / "link", grpc.StatusCode.PERMISSION_DENIED, "outside")
        with caplog.at_level(logging.INFO):
            refused(r, f"{bundles}/b\nINFO genrec: forged line", grpc.StatusCode.INVALID_ARGUMENT,
                    "control characters")
        assert not any("forged line" in rec.getMessage() for rec in caplog.records)
        refused(r, f"{bundles}/{'x' * 300}", grpc.StatusCode.INVALID_ARGUMENT, "too long")
        refused(r, "/" + "d/" * 2100, grpc.StatusCode.INVALID_ARGUMENT, "too long")
        refused(r, bundles / "missing", grpc.StatusCode.FAILED_PRECONDITION, "not a bundle")
        assert r.stubs.info.GetInfo(info_pb2.GetInfoRequest(), timeout=10).bundle_id == before
        assert reload(r, bundles / "b").bundle_path == str(bundles / "b")  # inside the root: served


def test_tampered_or_broken_bundles_are_refused_and_the_old_one_keeps_serving(bundles, served_bundle):
    for name in ("tampered", "manifest", "index"):
        shutil.copytree(served_bundle, bundles / name)
    catalog = bundles / "tampered" / "catalog.jsonl"  # rewritten titles, manifest untouched
    lines = [json.loads(line) for line in catalog.read_text().splitlines()]
    catalog.write_text("".join(json.dumps({**r, "title": "BUY NOW"}) + "\n" for r in lines))
    (bundles / "manifest" / "manifest.json").write_text('{"format_version": 1, "files": {')
    index = bundles / "index" / "index.faiss"
    index.write_bytes(index.read_bytes()[: index.stat().st_size // 2])
    with running(bundles / "a", allow_unauthenticated_reload=True) as r:
        before = r.stubs.info.GetInfo(info_pb2.GetInfoRequest(), timeout=10).bundle_id
        refused(r, bundles / "tampered", grpc.StatusCode.FAILED_PRECONDITION, "catalog.jsonl", "hash")
        refused(r, bundles / "manifest", grpc.StatusCode.FAILED_PRECONDITION, "manifest", "JSON")
        refused(r, bundles / "index", grpc.StatusCode.FAILED_PRECONDITION, "index.faiss")
        assert r.stubs.info.GetInfo(info_pb2.GetInfoRequest(), timeout=10).bundle_id == before
        assert r.metric("genrec_reloads_total", result="failed") == 3


def test_a_version_published_mid_load_is_loaded_whole(bundles, monkeypatch):
    """A writer replaces the bundle while the engine loads it: the engine restarts on the new version instead of
    mixing files of two (on the code before this test, the index came from version N+1 under version N's manifest)."""
    path = bundles / "a"
    version = Bundle.load(path).manifest["version"]
    real, published = engine_module.load_search_index, []

    def publishing_load(bundle, device="cpu"):
        if not published:
            published.append(update_bundle(path, {}, note="published mid-load"))
        return real(bundle, device)

    monkeypatch.setattr(engine_module, "load_search_index", publishing_load)
    engine = Engine.load(path)
    assert published and engine.version == version + 1
    assert json.loads(engine.manifest_bytes)["note"] == "published mid-load"
    assert engine.bundle.manifest["version"] == version + 1  # the catalog and vectors came from it too


def test_bundles_are_readable_by_other_users(tmp_path, served_bundle):
    """Written with the modes of a plain open()/mkdir() (0644/0755 under umask 022), not tempfile's 0600/0700: the
    Docker image's unprivileged user must read a bundle mounted from the host."""
    umask = os.umask(0)
    os.umask(umask)
    path = tmp_path / "bundle"
    shutil.copytree(served_bundle, path)
    update_bundle(path, {"extra.json": lambda p: p.write_text("{}")})  # a new version: a new directory
    for f in [path, *path.rglob("*")]:
        assert f.stat().st_mode & 0o777 == (0o777 if f.is_dir() else 0o666) & ~umask, f
    for f in [served_bundle, *served_bundle.rglob("*")]:  # as `genrec build` and `genrec train` wrote them
        assert f.stat().st_mode & 0o044 == 0o044 & ~umask, f


def test_an_empty_token_is_a_startup_error(served_bundle):
    proc = run_cli("serve", "--bundle", served_bundle, "--port", 0, "--metrics-port", -1, check=False,
                   env={**os.environ, "GENREC_AUTH_TOKEN": ""}, timeout=120)
    assert proc.returncode == 2 and "GENREC_AUTH_TOKEN is set but empty" in proc.stderr
