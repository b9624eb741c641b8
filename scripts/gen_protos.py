"""Generates the Python gRPC code for protos/ into client/rwkv_serve/ (checked in; never edit by hand).

The code ships in the SDK's distribution (client/pyproject.toml), which the server depends on. Only the generated
subpackages (rwkv_serve/v1, ...) are replaced; the hand-written rwkv_serve/__init__.py and rwkv_serve/contract.py
stay. Run from anywhere: `python scripts/gen_protos.py` (needs grpcio-tools: the dev extra). `--check` regenerates
into a temporary directory and fails when the checked-in files differ (for CI).
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
PACKAGE = "rwkv_serve"
TARGET = ROOT / "client" / PACKAGE  # inside the SDK's distribution
INIT_TEXT = '"""Generated gRPC code for the rwkv_serve protos (scripts/gen_protos.py); do not edit."""\n'


def generate(out_dir: Path) -> list[Path]:
    """Runs protoc (from grpc_tools) on every .proto under protos/; returns the files written."""
    import grpc_tools
    from grpc_tools import protoc  # a build-time dependency only

    protos = sorted(p.relative_to(PROTO_ROOT).as_posix() for p in (PROTO_ROOT / PACKAGE).rglob("*.proto"))
    if not protos:
        raise SystemExit(f"no .proto files under {PROTO_ROOT / PACKAGE}")
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    # Subpackages need __init__.py files; protoc writes none (the top-level rwkv_serve/__init__.py is hand-written).
    for directory in (p for p in (out_dir / PACKAGE).rglob("*") if p.is_dir()):
        (directory / "__init__.py").write_text(INIT_TEXT)
    return sorted(p for p in (out_dir / PACKAGE).rglob("*") if p.is_file())


def _subpackages(package: Path) -> list[str]:
    """The generated subpackages (directories, e.g. v1) of a generated or checked-in rwkv_serve/."""
    return sorted(p.name for p in package.iterdir() if p.is_dir() and p.name != "__pycache__")


def _differences(generated: Path, checked_in: Path) -> list[str]:
    new = {p.relative_to(generated) for p in generated.rglob("*") if p.is_file()}
    old = {p.relative_to(checked_in) for p in checked_in.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    diffs = [f"missing: {p}" for p in sorted(new - old)] + [f"stale: {p}" for p in sorted(old - new)]
    diffs += [f"differs: {p}" for p in sorted(new & old)
              if not filecmp.cmp(generated / p, checked_in / p, shallow=False)]
    return diffs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the checked-in code is out of date")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp_dir = Path(tmp)
        generate(tmp_dir)
        generated = tmp_dir / PACKAGE
        if args.check:
            diffs = [f"missing: {name}/" for name in _subpackages(generated) if not (TARGET / name).is_dir()]
            diffs += [f"stale: {name}/" for name in _subpackages(TARGET) if not (generated / name).is_dir()]
            for name in _subpackages(generated):
                if (TARGET / name).is_dir():
                    diffs += [f"{d} (in {name}/)" for d in _differences(generated / name, TARGET / name)]
            if diffs:
                print("generated code is out of date (run python scripts/gen_protos.py):", *diffs, sep="\n  ")
                sys.exit(1)
            print("generated code is up to date")
            return
        # Replace each generated subpackage wholesale so files of deleted protos do not linger; a subpackage whose
        # protos are all gone goes too. Hand-written files at the top of rwkv_serve/ are left alone.
        TARGET.mkdir(parents=True, exist_ok=True)
        for name in set(_subpackages(TARGET)) | set(_subpackages(generated)):
            shutil.rmtree(TARGET / name, ignore_errors=True)
            if (generated / name).is_dir():
                shutil.copytree(generated / name, TARGET / name)
                for path in sorted((TARGET / name).rglob("*")):
                    if path.is_file():
                        print(path.relative_to(ROOT))


if __name__ == "__main__":
    main()
