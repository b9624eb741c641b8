"""`python -m tuning.merge --base X.pth --adapter A.pt --out merged.pth`: fold a LoRA / PiSSA adapter into its base.

The result is an official-format checkpoint (the base's keys, order and dtypes, or `--dtype`): a worker serves it
like any released model (`RWKV_WORKER_MODEL_PATH=merged.pth`), and so does the reference `rwkv` package.
"""
from __future__ import annotations

from pathlib import Path

import torch
import typer

from tuning.frozen import DTYPES
from tuning.lora import load_adapter, merge
from worker.model import config_from_params, read_checkpoint, weights_fingerprint


def merge_files(base: Path, adapter: Path, out: Path, dtype: str = "same", force: bool = False) -> Path:
    """Write base + adapter to `out`; refuses an adapter trained on other weights unless `force`."""
    params = read_checkpoint(base)
    config_from_params(params)  # an RWKV-5.2 model, or a clear error
    ad = load_adapter(adapter)
    found = weights_fingerprint(params).hex()
    if ad.get("base_fingerprint") not in (None, found) and not force:
        raise ValueError(f"{adapter} was trained on other weights than {base} (fingerprint "
                         f"{ad['base_fingerprint'][:12]}.. vs {found[:12]}..); --force merges anyway")
    sd = merge(params, ad, None if dtype == "same" else DTYPES[dtype])
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(sd, str(out))
    return out


app = typer.Typer(add_completion=False, help=__doc__)


@app.command()
def main(
    base: Path = typer.Option(..., help="The checkpoint the adapter was trained on (official .pth)."),
    adapter: Path = typer.Option(..., help="adapter.pt from python -m tuning.train --mode lora|pissa."),
    out: Path = typer.Option(..., help="Where to write the merged .pth."),
    dtype: str = typer.Option("same", help="Tensor dtype of the result: same (as the base), fp32, bf16 or fp16."),
    force: bool = typer.Option(False, "--force", help="Merge even if the adapter was trained on other weights."),
) -> None:
    """Merge an adapter into its base checkpoint."""
    if dtype not in ("same", *DTYPES):
        raise typer.BadParameter(f"--dtype must be same, {', '.join(DTYPES)}; not {dtype!r}")
    try:
        path = merge_files(base, adapter, out, dtype, force)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from e
    typer.echo(f"wrote {path} ({path.stat().st_size:,} bytes)")


if __name__ == "__main__":
    app()
