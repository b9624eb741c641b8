"""State-tuned files as named session presets: register, list, delete (through the API, or straight in Redis).

`--target HOST:PORT` goes through the public API (RegisterPreset, ListPresets, DeletePreset): a worker serving the
model checks the file, and the API key must belong to one of the front's preset admin tenants. `--redis-url` is the
operators' way in, for a model no worker serves yet: the checkpoint is read here (`--model`) to check the state's
shapes and stamp its fingerprint, and the record is written to the store directly.

Either way a preset is the service's own state record (`worker.state.state_to_bytes`) under
`rwkv:preset:<model id>:<name>`, stamped with the model's weight fingerprint, so a worker serving another model
refuses it instead of running from a foreign state. A session created with `preset=<name>` starts from it
(`worker.runner` decodes it, then feeds the template's opening and the system prompt, if any, on top).
"""
from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from common.errors import PresetExists, ServeError
from common.store import PresetInfo, StateStore
from rwkv_serve_client import RWKVClient, RWKVError, tls_credentials
from worker.model import config_from_params, read_checkpoint, weights_fingerprint
from worker.state import StateFormatError, load_time_state, state_to_bytes

__all__ = ["PresetExists", "app", "delete_preset", "list_presets", "model_id_for", "preset_record", "register_preset"]


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


def _with_store(redis_url: str, prefix: str, work):  # noqa: ANN001, ANN202 - a coroutine function of the store
    async def run():  # noqa: ANN202
        store = StateStore.from_url(redis_url, prefix)
        try:
            return await work(store)
        finally:
            await store.close()

    return asyncio.run(run())


def register_preset(redis_url: str, model_path: str | Path, state_file: str | Path, name: str,
                    model_id: str | None = None, *, overwrite: bool = False, prefix: str = "rwkv",
                    description: str = "") -> str:
    """Register `state_file` (blocks.N.att.time_state) as preset `name` of the model straight in Redis; returns the
    model id used. PresetExists when the name is taken and not `overwrite`."""
    model_id = model_id or model_id_for(model_path)
    record = preset_record(model_path, state_file)
    _with_store(redis_url, prefix, lambda store: store.put_preset(model_id, name, record, description=description,
                                                                  replace=overwrite))
    return model_id


def list_presets(redis_url: str, model_id: str, prefix: str = "rwkv") -> list[str]:
    """Names of the presets stored for a model id."""
    return _with_store(redis_url, prefix, lambda store: store.list_presets(model_id))


def delete_preset(redis_url: str, model_id: str, name: str, prefix: str = "rwkv") -> bool:
    """Remove a preset (and the model's prefix cache); False when there was none."""
    return _with_store(redis_url, prefix, lambda store: store.delete_preset(model_id, name))


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------

app = typer.Typer(add_completion=False, help=__doc__, no_args_is_help=True)
_TARGET = typer.Option(None, "--target", envvar="RWKV_TARGET",
                       help="The front (host:port): go through the API instead of Redis.")
_API_KEY = typer.Option(None, "--api-key", envvar="RWKV_API_KEY", help="API key of a preset admin tenant.")
_TLS_CA = typer.Option(None, "--tls-ca", envvar="RWKV_TLS_CA", help="TLS to the front, verified against this CA.")
_REDIS = typer.Option("redis://127.0.0.1:6379/0", envvar="REDIS_URL",
                      help="The service's Redis (used when no --target is given).")
_PREFIX = typer.Option("rwkv", help="Key prefix of the store (with --redis-url).")


def _client(target: str, api_key: str | None, tls_ca: Path | None) -> RWKVClient:
    return RWKVClient(target, api_key, timeout=300.0, credentials=tls_credentials(tls_ca) if tls_ca else None)


def _model_id(model: Path | None, model_id: str | None) -> str:
    if model_id:
        return model_id
    if model is None:
        raise typer.BadParameter("give --model-id, or --model to use its file stem")
    return model_id_for(model)


def _fail(error: object) -> None:
    Console(stderr=True).print(f"[red]error:[/red] {error}")
    raise typer.Exit(1)


def _describe(info: PresetInfo) -> str:
    return f"{info.name}\t{info.description}" if info.description else info.name


@app.command()
def register(
    state: Path = typer.Option(..., help="State-tuned file: blocks.N.att.time_state tensors (or a state record)."),
    name: str = typer.Option(..., help="Preset name, as given to CreateSession(preset=...)."),
    model: Optional[Path] = typer.Option(None, help="The checkpoint (.pth) the state was tuned on; needed with "
                                                    "--redis-url, its file stem is the default model id."),
    model_id: Optional[str] = typer.Option(None, help="Served model id (default: the checkpoint's file stem)."),
    description: str = typer.Option("", help="Shown by `list`."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing preset of that name."),
    target: Optional[str] = _TARGET,
    api_key: Optional[str] = _API_KEY,
    tls_ca: Optional[Path] = _TLS_CA,
    redis_url: str = _REDIS,
    prefix: str = _PREFIX,
) -> None:
    """Register a state-tuned file as a session preset."""
    used = _model_id(model, model_id)
    try:
        if target:
            with _client(target, api_key, tls_ca) as rwkv:
                rwkv.register_preset(used, name, state, description, replace=overwrite)
        else:
            if model is None:
                raise typer.BadParameter("--redis-url mode reads the checkpoint: give --model (or use --target)")
            register_preset(redis_url, model, state, name, used, overwrite=overwrite, prefix=prefix,
                            description=description)
    except (RWKVError, ServeError, StateFormatError, OSError) as e:  # taken name, bad file, refused by the service
        _fail(e)
    Console().print(f"registered preset [bold]{name}[/bold] for model [bold]{used}[/bold]")


@app.command("list")
def list_command(
    model: Optional[Path] = typer.Option(None, help="Checkpoint whose file stem is the model id."),
    model_id: Optional[str] = typer.Option(None, help="Served model id."),
    target: Optional[str] = _TARGET,
    api_key: Optional[str] = _API_KEY,
    tls_ca: Optional[Path] = _TLS_CA,
    redis_url: str = _REDIS,
    prefix: str = _PREFIX,
) -> None:
    """List a model's presets (name, then the description when there is one)."""
    used = _model_id(model, model_id)
    try:
        if target:
            with _client(target, api_key, tls_ca) as rwkv:
                infos = [PresetInfo(p.model, p.name, p.description, p.tokens, 0, p.state_bytes)
                         for p in rwkv.list_presets(used)]
        else:
            infos = _with_store(redis_url, prefix, lambda store: store.describe_presets(used))
    except (RWKVError, ServeError) as e:
        _fail(e)
    for info in infos:
        typer.echo(_describe(info))


@app.command()
def delete(
    name: str = typer.Option(..., help="Preset name."),
    model: Optional[Path] = typer.Option(None, help="Checkpoint whose file stem is the model id."),
    model_id: Optional[str] = typer.Option(None, help="Served model id."),
    target: Optional[str] = _TARGET,
    api_key: Optional[str] = _API_KEY,
    tls_ca: Optional[Path] = _TLS_CA,
    redis_url: str = _REDIS,
    prefix: str = _PREFIX,
) -> None:
    """Delete a preset."""
    used = _model_id(model, model_id)
    try:
        if target:
            with _client(target, api_key, tls_ca) as rwkv:
                rwkv.delete_preset(used, name)
        elif not delete_preset(redis_url, used, name, prefix):
            _fail(f"no preset {name!r}")
    except (RWKVError, ServeError) as e:
        _fail(e)
    typer.echo(f"deleted preset {name}")


if __name__ == "__main__":
    app()
