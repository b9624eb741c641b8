"""The package boundaries hold: the front and the SDK load no torch, no tokenizer and no worker code; the core
never imports the worker; the SDK imports only the wire; one list of sampling fields serves every layer."""

from __future__ import annotations

import ast
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from rwkv_serve.contract import SAMPLING_FIELDS

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "tokenizers", "numpy", "rwkv", "worker", "tuning")


def _loaded_after(imports: list[str]) -> set[str]:
    """Top-level module names in sys.modules after importing `imports` in a fresh interpreter."""
    code = "import json, sys\n" + "".join(f"import {name}\n" for name in imports) + \
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize("modules", [
    ["service.server", "service.stack", "service.admin"],  # the front, the stack launcher, the operator CLI
    ["common.store", "common.lifecycle", "common.telemetry", "common.worker_api", "common.sampling"],  # the core
], ids=["front", "core"])
def test_the_front_and_the_core_load_no_torch_tokenizer_or_worker(modules: list[str]) -> None:
    loaded = _loaded_after(modules)
    assert "service" in loaded or "common" in loaded  # the imports happened
    assert not loaded & set(HEAVY), sorted(loaded & set(HEAVY))


def test_the_sdk_loads_only_the_wire() -> None:
    loaded = _loaded_after(["rwkv_serve_client", "rwkv_serve_client.cli"])
    assert {"rwkv_serve_client", "rwkv_serve", "grpc", "google"} <= loaded
    server_side = {"common", "service", "redis", "pydantic", "pydantic_settings", "opentelemetry", *HEAVY}
    assert not loaded & server_side, sorted(loaded & server_side)


def _imported_roots(folder: Path) -> dict[str, set[str]]:
    """Top-level packages each .py file under `folder` imports anywhere (lazy imports inside functions too)."""
    found: dict[str, set[str]] = {}
    for path in folder.rglob("*.py"):
        roots: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                roots |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                roots.add(node.module.split(".")[0])
        found[str(path.relative_to(ROOT))] = roots
    return found


@pytest.mark.parametrize("folder, forbidden", [
    ("common", {"worker", "service", "tuning", "rwkv_serve_client", "torch", "tokenizers", "numpy", "rwkv"}),
    ("service", {"worker", "tuning", "torch", "tokenizers", "numpy", "rwkv"}),
    ("client", {"common", "service", "worker", "tuning", "redis", "torch", "pydantic", "pydantic_settings"}),
])
def test_no_file_imports_across_a_boundary(folder: str, forbidden: set[str]) -> None:
    offenders = {path: sorted(roots & forbidden) for path, roots in _imported_roots(ROOT / folder).items()
                 if roots & forbidden}
    assert not offenders


def test_one_list_of_sampling_fields() -> None:
    from worker.sampler import SamplingParams

    assert [f.name for f in dataclasses.fields(SamplingParams)] == list(SAMPLING_FIELDS)
