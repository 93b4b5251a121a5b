"""Generate the genrec.v1 Python stubs from protos/genrec/v1/*.proto (run by `make protos`; the stubs are committed).

    python protos/generate.py [--out DIR]

The stubs are committed so that an installed wheel needs no generator and writes nothing at run time. protobuf
refuses gencode newer than its runtime, so the generator is pinned (grpcio-tools in the `test` extra) and the
runtime floor in pyproject.toml matches what it writes; tests/server/test_server_protos.py checks that the
committed stubs are exactly what this script writes today.
"""

from __future__ import annotations

import argparse
from importlib import resources
from pathlib import Path

ROOT = Path(__file__).resolve().parent  # protos/: the include root, so `package genrec.v1` lands in genrec/v1/
PACKAGE = ROOT / "genrec" / "v1"


def generate(out: Path) -> list[Path]:
    """Write <name>_pb2.py and <name>_pb2_grpc.py for every .proto under `out`/genrec/v1; returns the files."""
    from grpc_tools import protoc

    sources = sorted(PACKAGE.glob("*.proto"))
    include = resources.files("grpc_tools") / "_proto"
    args = ["grpc_tools.protoc", f"-I{ROOT}", f"-I{include}", f"--python_out={out}", f"--grpc_python_out={out}",
            *map(str, sources)]
    if protoc.main(args) != 0:
        raise SystemExit(f"protoc failed on {PACKAGE}: see the error above")
    return sorted((out / "genrec" / "v1").glob("*_pb2*.py"))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT, help="output root (default: protos/, in place)")
    for path in generate(parser.parse_args().out):
        print(f"wrote {path}")
