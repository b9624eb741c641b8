"""Generates the Python gRPC code for protos/ into the rwkv_serve/ package (checked in; never edit by hand).

Run from anywhere: `python scripts/gen_protos.py`. `--check` regenerates into a temporary directory and
fails when the checked-in files differ (for CI).
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
INIT_TEXT = '"""Generated gRPC code for the rwkv_serve protos (scripts/gen_protos.py); do not edit."""\n'


def generate(out_dir: Path) -> list[Path]:
    """Runs protoc (from grpc_tools) on every .proto under protos/; returns the files written."""
    from grpc_tools import protoc  # a build-time dependency only
    import grpc_tools

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
    # Packages need __init__.py files; protoc writes none.
    for directory in [out_dir / PACKAGE, *(p for p in (out_dir / PACKAGE).rglob("*") if p.is_dir())]:
        (directory / "__init__.py").write_text(INIT_TEXT)
    return sorted(p for p in (out_dir / PACKAGE).rglob("*") if p.is_file())


def _differences(generated: Path, checked_in: Path) -> list[str]:
    new = {p.relative_to(generated) for p in generated.rglob("*") if p.is_file()}
    old = {p.relative_to(checked_in) for p in checked_in.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    diffs = [f"missing: {p}" for p in sorted(new - old)] + [f"stale: {p}" for p in sorted(old - new)]
    diffs += [f"differs: {p}" for p in sorted(new & old) if not filecmp.cmp(generated / p, checked_in / p, shallow=False)]
    return diffs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the checked-in code is out of date")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp_dir = Path(tmp)
        generate(tmp_dir)
        target = ROOT / PACKAGE
        if args.check:
            diffs = _differences(tmp_dir / PACKAGE, target)
            if diffs:
                print("generated code is out of date (run python scripts/gen_protos.py):", *diffs, sep="\n  ")
                sys.exit(1)
            print("generated code is up to date")
            return
        # Replace the package wholesale so files of deleted protos do not linger.
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(tmp_dir / PACKAGE, target)
        for path in sorted(target.rglob("*")):
            if path.is_file():
                print(path.relative_to(ROOT))


if __name__ == "__main__":
    main()
