"""Generated stubs appear on a fresh clone and follow every change of the .proto files."""

from __future__ import annotations

import shutil

import pytest

import server.protos as protos


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    """A copy of protos/ and an empty output folder, so the real server/_generated is never touched."""
    root = tmp_path / "protos"
    shutil.copytree(protos.PROTO_ROOT, root)
    monkeypatch.setattr(protos, "PROTO_ROOT", root)
    monkeypatch.setattr(protos, "OUT", tmp_path / "pkg" / "_generated")
    (tmp_path / "pkg").mkdir()
    return root, tmp_path / "pkg" / "_generated"


def test_generates_when_missing_and_only_when_stale(sandbox):
    root, out = sandbox
    protos.ensure_generated()
    stamp = (out / "STAMP").read_text().strip()
    assert stamp == protos.fingerprint(protos._sources())
    for name in ("common", "recommend", "embed", "search", "info"):
        assert (out / "genrec" / "v1" / f"{name}_pb2.py").exists()
    grpc_stub = (out / "genrec" / "v1" / "recommend_pb2_grpc.py").read_text()
    assert "from . import recommend_pb2" in grpc_stub and "from genrec.v1 import" not in grpc_stub
    mtime = (out / "STAMP").stat().st_mtime_ns

    protos.ensure_generated()  # up to date: nothing rewritten
    assert (out / "STAMP").stat().st_mtime_ns == mtime

    proto = root / "genrec" / "v1" / "info.proto"
    proto.write_text(proto.read_text().replace("string loaded_at = 13;", "string loaded_at = 13;\n  bool extra = 14;"))
    protos.ensure_generated()
    assert (out / "STAMP").read_text().strip() != stamp
    assert "xtra" in (out / "genrec" / "v1" / "info_pb2.py").read_text()  # protoc escapes the 'e' as \x65
    assert not list(out.parent.glob("._generated*"))  # no temporary folders left behind


def test_a_broken_proto_fails_loudly_and_keeps_the_old_stubs(sandbox):
    root, out = sandbox
    protos.ensure_generated()
    stamp = (out / "STAMP").read_text()
    (root / "genrec" / "v1" / "common.proto").write_text("syntax = \"proto3\"; message {")
    with pytest.raises(RuntimeError, match="protoc failed"):
        protos.ensure_generated()
    assert (out / "STAMP").read_text() == stamp


def test_the_checked_out_stubs_are_current():
    assert (protos.OUT / "STAMP").read_text().strip() == protos.fingerprint(protos._sources())
    assert set(protos.SERVICE_NAMES) == {"genrec.v1.RecommendService", "genrec.v1.EmbedService",
                                         "genrec.v1.SearchService", "genrec.v1.InfoService",
                                         "genrec.v1.AdminService"}
