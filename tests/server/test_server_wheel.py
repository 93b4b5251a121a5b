"""The wheel, as a user installs it: one top-level `genrec` package that serves from a venv outside the checkout,
next to a project with its own models/, server/, training/ and kernels/ packages."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest

from genrec.core.bundle import Bundle
from genrec.server.client import Stubs, open_channel
from genrec.v1 import embed_pb2, info_pb2, recommend_pb2, search_pb2

from serverutil import wait_for

pytest_plugins = ["serverfixtures"]

REPO = Path(__file__).resolve().parents[2]
USER_PACKAGES = ("models", "server", "training", "kernels")
# Run with argv[1] = a user's project folder. Nothing may be installed under the user's package names, and from
# either end of sys.path (the project as the working directory, or appended after site-packages) the user's
# packages and genrec's each import from where they belong.
SIDE_BY_SIDE = """
import importlib.util, sys
names = ("models", "server", "training", "kernels")
if sys.argv[2] == "last":
    assert not [n for n in names if importlib.util.find_spec(n)], "installed at the top level"
    sys.path.append(sys.argv[1])
import genrec, genrec.models.recommender, genrec.server.app, genrec.training.loop, genrec.kernels, genrec.v1
import models, server, training, kernels
assert all(m.OWNER == "user" for m in (models, server, training, kernels)), "a user package was shadowed"
mods = (genrec.models, genrec.server, genrec.training, genrec.kernels, genrec.v1)
assert not any(hasattr(m, "OWNER") for m in mods), "genrec was grafted onto a user package"
print(genrec.__file__)
"""


def side_by_side(python: Path, project: Path, where: str, cwd: Path) -> str:
    out = subprocess.run([str(python), "-c", SIDE_BY_SIDE, str(project), where], cwd=cwd, capture_output=True,
                         text=True, timeout=300, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip()


@pytest.fixture(scope="module")
def user_project(tmp_path_factory) -> Path:
    """A project of the user's with packages named like the repository's top-level folders."""
    root = tmp_path_factory.mktemp("user-project")
    for name in USER_PACKAGES:
        (root / name).mkdir()
        (root / name / "__init__.py").write_text('OWNER = "user"\n')
    return root


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory) -> tuple[Path, Path]:
    """(venv, its site-packages) with the freshly built wheel installed. The wheel goes in without dependencies
    and before anything else, so pip sees an empty environment; the dependencies (torch and the rest) are then
    taken from this test environment's site-packages through a .pth file, instead of reinstalling gigabytes."""
    tmp = tmp_path_factory.mktemp("wheel")
    # Built from a copy of the sources git would commit: no stale build/ output of the checkout can slip in.
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            check=True, capture_output=True, text=True).stdout.split("\0")
    for name in filter(None, listed):
        if (REPO / name).is_file():
            (tmp / "src" / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, tmp / "src" / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp / "dist"), str(tmp / "src")], check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp / "dist").glob("genrec-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"genrec", next(t for t in tops if t.endswith(".dist-info"))}, tops
    for shipped in ("genrec/v1/recommend_pb2.py", "genrec/v1/recommend_pb2_grpc.py", "genrec/v1/recommend.proto",
                    "genrec/core/presets/demo.yaml", "genrec/server/app.py", "genrec/models/recommender.py"):
        assert shipped in names, f"{shipped} is not in the wheel"

    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    site = Path(subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()"
                                "['purelib'])"], check=True, capture_output=True, text=True).stdout.strip())
    before = set(os.listdir(site))
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
                    str(wheel)], check=True, capture_output=True, timeout=300)
    added = set(os.listdir(site)) - before
    assert added == {"genrec", next(a for a in added if a.endswith(".dist-info"))}, added
    (site / "zz-test-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv, site


def test_only_genrec_is_installed_and_user_packages_are_not_shadowed(wheel_venv, user_project, tmp_path):
    venv, site = wheel_venv
    for where, cwd in (("first", user_project), ("last", tmp_path)):
        assert Path(side_by_side(venv / "bin" / "python", user_project, where, cwd)).is_relative_to(site)


def test_the_editable_install_does_not_shadow_user_packages_either(user_project, tmp_path):
    for where, cwd in (("first", user_project), ("last", tmp_path)):
        side_by_side(Path(sys.executable), user_project, where, cwd)


@pytest.mark.slow
def test_the_installed_wheel_serves(wheel_venv, served_bundle, user_project):
    venv, _ = wheel_venv
    proc = subprocess.Popen([str(venv / "bin" / "genrec"), "serve", "--bundle", str(served_bundle), "--port", "0",
                             "--metrics-port", "-1"], cwd=user_project, stderr=subprocess.PIPE, text=True,
                            env={**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "PYTHONUNBUFFERED": "1"})
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True).start()
    try:
        wait_for(lambda: any("serving" in s and "version" in s for s in lines) or proc.poll() is not None, 180,
                 "the wheel's server to warm up")
        port = next((m.group(1) for s in list(lines) if (m := re.search(r"genrec\.v1 on 127\.0\.0\.1:(\d+)", s))),
                    None)
        assert port, f"server exited ({proc.poll()}):\n{''.join(lines)[-3000:]}"
        ids = Bundle.load(served_bundle).catalog.ids
        with open_channel(f"127.0.0.1:{port}") as channel:
            stubs = Stubs.of(channel)
            rec = stubs.recommend.Recommend(recommend_pb2.RecommendRequest(history=ids[:3].tolist(), k=5), timeout=60)
            emb = stubs.embed.Embed(embed_pb2.EmbedRequest(inputs=[embed_pb2.EmbedInput(text="red nail polish")]),
                                    timeout=60)
            found = stubs.search.Search(search_pb2.SearchRequest(text="red nail polish", k=5), timeout=60)
            info = stubs.info.GetInfo(info_pb2.GetInfoRequest(), timeout=60)
        assert len(rec.items) == 5 and set(i.item_id for i in rec.items) <= set(ids.tolist())
        vec = np.array(emb.embeddings[0].values)
        assert len(vec) == emb.dimension and abs(np.linalg.norm(vec) - 1) < 1e-4
        assert len(found.items) == 5 and set(i.item_id for i in found.items) <= set(ids.tolist())
        assert info.catalog_size == len(ids) and info.has_recommender and info.embedding_dim == emb.dimension
    finally:
        proc.terminate()
        assert proc.wait(timeout=60) == 0
