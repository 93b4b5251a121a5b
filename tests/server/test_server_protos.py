"""The committed genrec.v1 stubs are exactly what `make protos` writes from the .proto files today."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from genrec.server.app import SERVICE_NAMES

PROTOS = Path(__file__).resolve().parents[2] / "protos"


def test_the_committed_stubs_are_current(tmp_path):
    subprocess.run([sys.executable, str(PROTOS / "generate.py"), "--out", str(tmp_path)], check=True,
                   capture_output=True)
    fresh = {p.name: p.read_text() for p in (tmp_path / "genrec" / "v1").glob("*.py")}
    committed = {p.name: p.read_text() for p in (PROTOS / "genrec" / "v1").glob("*_pb2*.py")}
    assert set(fresh) == set(committed) and len(fresh) == 2 * len(list((PROTOS / "genrec" / "v1").glob("*.proto")))
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"stale stubs {stale}: run `make protos` and commit the result"


def test_the_services_are_genrec_v1():
    assert set(SERVICE_NAMES) == {"genrec.v1.RecommendService", "genrec.v1.EmbedService", "genrec.v1.SearchService",
                                  "genrec.v1.InfoService", "genrec.v1.AdminService"}
