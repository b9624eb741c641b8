"""The `rwkv-chat` console script: runs the REPL of rwkv_serve_client.cli, or says which extra it needs.

The REPL uses typer and rich, which only the SDK's `cli` extra installs; the library itself needs neither."""

from __future__ import annotations

import sys

_CLI_MODULES = {"typer", "rich", "click"}


def chat() -> None:
    """Console script entry point of rwkv-chat."""
    try:
        from rwkv_serve_client.cli import run
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] not in _CLI_MODULES:
            raise
        sys.exit(f"rwkv-chat needs the SDK's cli extra ({e.name} is not installed): "
                 f"pip install \"rwkv-serve-client[cli]\" (from a checkout: pip install \"./client[cli]\")")
    run()
