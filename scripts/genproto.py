"""Generate (or with --check, verify) the protobuf/gRPC modules from proto/.

`proto/litefspy/v1/X.proto` becomes `litefspy/v1/X_pb2.py`, `X_pb2_grpc.py` and
`X_pb2.pyi`. The generated files are committed; CI runs --check so that a .proto
edit without regeneration fails lint.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"


def generate(out_dir: Path) -> list[Path]:
    from grpc_tools import protoc  # dev dependency, only needed here

    protos = sorted(PROTO_ROOT.rglob("*.proto"))
    if not protos:
        return []
    include = Path(protoc.__file__).parent / "_proto"
    # The mypy plugin is a console script next to this interpreter: name it
    # explicitly so generation works without an activated venv (make, CI).
    mypy_plugin = Path(sys.executable).parent / "protoc-gen-mypy"
    args = [
        "protoc",
        f"--plugin=protoc-gen-mypy={mypy_plugin}",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--mypy_out={out_dir}",
        *[str(p) for p in protos],
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    return sorted(p.relative_to(out_dir) for p in out_dir.rglob("*") if p.is_file())


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--check", action="store_true", help="fail if generated code is stale")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        files = generate(out)
        stale = []
        for rel in files:
            dest = ROOT / rel
            if args.check:
                if not dest.exists() or not filecmp.cmp(out / rel, dest, shallow=False):
                    stale.append(str(rel))
            else:
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(out / rel, dest)
        if stale:
            print("generated protobuf code is stale; run `make proto`:", *stale, file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
