"""Random-init RWKV-5.2 checkpoints in the official `.pth` format, for tests, demos and benchmarks."""
from __future__ import annotations

from pathlib import Path

import torch
import typer

WORLD_VOCAB_SIZE = 65536


def ffn_size_for(n_embd: int) -> int:
    """The FFN width released RWKV-5 models use."""
    return int(3.5 * n_embd) // 32 * 32


def random_params(n_layer: int, n_embd: int, vocab_size: int = WORLD_VOCAB_SIZE, head_size: int = 64, seed: int = 0,
                  dtype: torch.dtype = torch.float32, device: str = "cpu") -> dict[str, torch.Tensor]:
    """A state dict with RWKV-LM-like magnitudes: activations stay O(1) through any depth, logits have RMS ~ 2.

    Key order matters to the reference `rwkv` package, which detects v5.2 by meeting `ln_x`/`gate` before
    `time_decay`: each block lists them first, so even a 1-layer file is detected correctly there."""
    if n_embd % head_size:
        raise ValueError(f"n_embd {n_embd} is not a multiple of head_size {head_size}")
    g = torch.Generator(device=device).manual_seed(seed)
    H, D, F = n_embd // head_size, n_embd, ffn_size_for(n_embd)

    def normal(*shape, std=1.0, mean=0.0):
        return (torch.randn(*shape, generator=g, device=device) * std + mean).to(dtype)

    def uniform(*shape, lo=0.0, hi=1.0):
        return (torch.rand(*shape, generator=g, device=device) * (hi - lo) + lo).to(dtype)

    def linear(n_out, n_in, gain=1.0):
        return normal(n_out, n_in, std=gain / n_in**0.5)

    sd: dict[str, torch.Tensor] = {"emb.weight": normal(vocab_size, D, std=1e-2)}
    for i in range(n_layer):
        b = f"blocks.{i}."
        if i == 0:
            sd[b + "ln0.weight"], sd[b + "ln0.bias"] = normal(D, mean=1, std=0.1), normal(D, std=0.1)
        sd[b + "ln1.weight"], sd[b + "ln1.bias"] = normal(D, mean=1, std=0.1), normal(D, std=0.1)
        sd[b + "ln2.weight"], sd[b + "ln2.bias"] = normal(D, mean=1, std=0.1), normal(D, std=0.1)
        sd[b + "att.ln_x.weight"], sd[b + "att.ln_x.bias"] = normal(D, mean=1, std=0.1), normal(D, std=0.1)
        sd[b + "att.gate.weight"] = linear(D, D)
        for c in "kvrg":
            sd[b + f"att.time_mix_{c}"] = uniform(1, 1, D)
        # Decay exponents as RWKV-LM initialises them (-6..-1), plus a few channels with w ~ 1e-9 that would
        # break any implementation that divides by powers of w or clamps it.
        n = torch.arange(H * head_size, device=device) / (H * head_size - 1)
        noise = torch.randn(H * head_size, generator=g, device=device) * 0.5
        decay = -6 + 5 * n ** (0.7 + 1.3 * i / max(n_layer - 1, 1)) + noise
        decay[torch.rand(H * head_size, generator=g, device=device) < 0.03] = 3.0
        sd[b + "att.time_decay"] = decay.view(H, head_size).to(dtype)
        sd[b + "att.time_faaaa"] = uniform(H, head_size, lo=-0.1, hi=1.0)
        sd[b + "att.receptance.weight"] = linear(D, D)
        sd[b + "att.key.weight"] = linear(D, D)
        sd[b + "att.value.weight"] = linear(D, D)
        sd[b + "att.output.weight"] = linear(D, D, gain=0.5)
        sd[b + "ffn.time_mix_k"], sd[b + "ffn.time_mix_r"] = uniform(1, 1, D), uniform(1, 1, D)
        sd[b + "ffn.key.weight"] = linear(F, D)
        sd[b + "ffn.receptance.weight"] = linear(D, D)
        sd[b + "ffn.value.weight"] = linear(D, F, gain=0.5)
    sd["ln_out.weight"], sd["ln_out.bias"] = normal(D, mean=1, std=0.1), normal(D, std=0.1)
    sd["head.weight"] = linear(vocab_size, D, gain=2.0)
    return sd


def make_random_checkpoint(path: str | Path, n_layer: int = 2, n_embd: int = 128, vocab_size: int = WORLD_VOCAB_SIZE,
                           seed: int = 0, dtype: torch.dtype = torch.float32, head_size: int = 64) -> Path:
    """Write a random-init RWKV-5.2 `.pth` in the official format; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = random_params(n_layer, n_embd, vocab_size=vocab_size, head_size=head_size, seed=seed, dtype=dtype)
    torch.save(sd, str(path))
    return path


_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def main(
    out: Path = typer.Argument(..., help="where to write the .pth"),
    n_layer: int = typer.Option(12, help="number of blocks"),
    n_embd: int = typer.Option(768, help="width (a multiple of 64)"),
    vocab_size: int = typer.Option(WORLD_VOCAB_SIZE, help="vocabulary size (World: 65536)"),
    seed: int = typer.Option(0, help="random seed"),
    dtype: str = typer.Option("bf16", help="fp32, fp16 or bf16 (official files are 16-bit)"),
) -> None:
    """Write a random-init RWKV-5.2 checkpoint (for tests, demos and benchmarks: it produces gibberish)."""
    if dtype not in _DTYPES:
        raise typer.BadParameter(f"dtype must be one of {sorted(_DTYPES)}")
    make_random_checkpoint(out, n_layer, n_embd, vocab_size, seed, _DTYPES[dtype])
    typer.echo(f"wrote random RWKV-5.2 L{n_layer} D{n_embd} V{vocab_size} {dtype} to {out}")


def cli() -> None:
    typer.run(main)


if __name__ == "__main__":
    cli()
