"""State-tuned files as named session presets in the service's Redis store (register, list, delete).

A preset is stored as the service's own state record (`worker.state.state_to_bytes`) under
`rwkv:preset:<model id>:<name>`, stamped with the model's weight fingerprint, so a worker serving another model
refuses it instead of running from a foreign state. A session created with `preset=<name>` starts from it
(`worker.runner` decodes it, then feeds the template's opening and the system prompt, if any, on top).
The public gRPC API can only *use* presets (CreateSession.preset, ListModels); registering one is this command.
"""
from __future__ import annotations

import asyncio
from pathlib import Path

import typer
from rich.console import Console

from worker.errors import InvalidArgument
from worker.model import config_from_params, read_checkpoint, weights_fingerprint
from worker.state import load_time_state, state_from_bytes, state_to_bytes
from worker.store import StateStore


def model_id_for(model_path: str | Path) -> str:
    """The id a worker serves a checkpoint under when none is configured: the file's stem."""
    return Path(model_path).stem


def preset_record(model_path: str | Path, state_file: str | Path) -> bytes:
    """The state record of a `time_state` file for this model (shapes checked, fingerprint stamped)."""
    # Reading the checkpoint (memory-mapped) gives the same fingerprint as RWKV5.from_checkpoint without
    # building a model: the fingerprint is taken from the file's tensors as stored.
    params = read_checkpoint(model_path)
    c = config_from_params(params)
    state = load_time_state(state_file, c.n_layer, c.n_head, c.head_size, c.n_embd)  # raises on a shape mismatch
    # A preset has consumed no tokens: the session's token count starts at its own first turn.
    return state_to_bytes(state, weights_fingerprint(params), tokens_consumed=0)


class PresetExists(ValueError):
    """A preset of that name is registered already (pass overwrite=True to replace it)."""


async def register_preset_in(store: StateStore, model_id: str, name: str, record: bytes, *,
                             overwrite: bool = False) -> None:
    """Store a preset record; replacing one also drops the model's prefix cache, which may hold states built on it."""
    state_from_bytes(record, None)  # refuse anything that is not a well-formed record before it reaches workers
    if await store.has_preset(model_id, name):
        if not overwrite:
            raise PresetExists(f"preset {name!r} exists for model {model_id!r}")
        # The runner caches "preset + system prompt" states under a digest of the preset's *name*: after the
        # name points at a new state those entries are wrong. The cache only saves prefill, so drop all of it.
        await _drop_prefix_cache(store, model_id)
    await store.put_preset(model_id, name, record)


async def _drop_prefix_cache(store: StateStore, model_id: str) -> int:
    keys = [k async for k in store.redis.scan_iter(match=store._prefix_key(model_id, "*"), count=500)]
    if keys:
        await store.redis.delete(*keys)
    return len(keys)


async def delete_preset_in(store: StateStore, model_id: str, name: str) -> bool:
    """Remove a preset (existing sessions built on it keep their own states); False when there was none."""
    # StateStore has put/get/has/list for presets but no delete; the key is the store's own.
    removed = bool(await store.redis.delete(store._preset_key(model_id, name)))
    if removed:
        await _drop_prefix_cache(store, model_id)
    return removed


def register_preset(redis_url: str, model_path: str | Path, state_file: str | Path, name: str,
                    model_id: str | None = None, *, overwrite: bool = False, prefix: str = "rwkv") -> str:
    """Register `state_file` (blocks.N.att.time_state) as preset `name` of the model; returns the model id used."""
    model_id = model_id or model_id_for(model_path)
    record = preset_record(model_path, state_file)

    async def run() -> None:
        store = StateStore.from_url(redis_url, prefix)
        try:
            await register_preset_in(store, model_id, name, record, overwrite=overwrite)
        finally:
            await store.close()

    asyncio.run(run())
    return model_id


def list_presets(redis_url: str, model_id: str, prefix: str = "rwkv") -> list[str]:
    """Names of the presets stored for a model id."""
    async def run() -> list[str]:
        store = StateStore.from_url(redis_url, prefix)
        try:
            return await store.list_presets(model_id)
        finally:
            await store.close()

    return asyncio.run(run())


def delete_preset(redis_url: str, model_id: str, name: str, prefix: str = "rwkv") -> bool:
    """Remove a preset; False when there was none."""
    async def run() -> bool:
        store = StateStore.from_url(redis_url, prefix)
        try:
            return await delete_preset_in(store, model_id, name)
        finally:
            await store.close()

    return asyncio.run(run())


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------

app = typer.Typer(add_completion=False, help=__doc__, no_args_is_help=True)
_REDIS = typer.Option("redis://127.0.0.1:6379/0", envvar="REDIS_URL", help="The service's Redis.")
_PREFIX = typer.Option("rwkv", help="Key prefix of the store.")


def _model_id(model: Path | None, model_id: str | None) -> str:
    if model_id:
        return model_id
    if model is None:
        raise typer.BadParameter("give --model-id, or --model to use its file stem")
    return model_id_for(model)


@app.command()
def register(
    model: Path = typer.Option(..., help="The served checkpoint (.pth) the state was tuned on."),
    state: Path = typer.Option(..., help="State-tuned file: blocks.N.att.time_state tensors."),
    name: str = typer.Option(..., help="Preset name, as given to CreateSession(preset=...)."),
    model_id: str | None = typer.Option(None, help="Served model id (default: the checkpoint's file stem)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing preset of that name."),
    redis_url: str = _REDIS,
    prefix: str = _PREFIX,
) -> None:
    """Register a state-tuned file as a session preset."""
    try:
        used = register_preset(redis_url, model, state, name, model_id, overwrite=overwrite, prefix=prefix)
    except (ValueError, OSError, InvalidArgument) as e:  # exists, bad state file or checkpoint, malformed name
        Console(stderr=True).print(f"[red]error:[/red] {e}")
        raise typer.Exit(1) from None
    Console().print(f"registered preset [bold]{name}[/bold] for model [bold]{used}[/bold]")


@app.command("list")
def list_command(
    model: Path | None = typer.Option(None, help="Checkpoint whose file stem is the model id."),
    model_id: str | None = typer.Option(None, help="Served model id."),
    redis_url: str = _REDIS,
    prefix: str = _PREFIX,
) -> None:
    """List a model's presets."""
    for name in list_presets(redis_url, _model_id(model, model_id), prefix):
        typer.echo(name)


@app.command()
def delete(
    name: str = typer.Option(..., help="Preset name."),
    model: Path | None = typer.Option(None, help="Checkpoint whose file stem is the model id."),
    model_id: str | None = typer.Option(None, help="Served model id."),
    redis_url: str = _REDIS,
    prefix: str = _PREFIX,
) -> None:
    """Delete a preset."""
    if not delete_preset(redis_url, _model_id(model, model_id), name, prefix):
        Console(stderr=True).print(f"[red]error:[/red] no preset {name!r}")
        raise typer.Exit(1)
    typer.echo(f"deleted preset {name}")


if __name__ == "__main__":
    app()
