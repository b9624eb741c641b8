"""The recurrent state of RWKV-5 sessions: a typed, batched record and its versioned byte format."""
from __future__ import annotations

import io
import math
import re
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

MAGIC = b"RWKV5ST\x00"
FORMAT_VERSION = 1
# magic, format version, dtype code, reserved, fingerprint, n_layer, n_embd, n_head, head_size, tokens, payload bytes
_HEADER = struct.Struct("<8sHBx32sIIIIQQ")
_CRC = struct.Struct("<I")
_DTYPE_CODES = {torch.float32: 1, torch.float16: 2, torch.bfloat16: 3}
_CODE_DTYPES = {v: k for k, v in _DTYPE_CODES.items()}
_NUMPY_BITS = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.int16}  # bf16: raw bits


class StateFormatError(ValueError):
    """Bytes that are not a state record of this model: truncated, corrupted, foreign or of an unknown version."""


class ForeignStateError(StateFormatError):
    """A well-formed state of another model: other shapes, or a record stamped with another fingerprint."""


_TIME_STATE_KEY = re.compile(r"blocks\.(\d+)\.att\.time_state")


@dataclass
class State:
    """Per-layer recurrent state of B sessions: what a session's whole conversation is compressed into."""

    att_shift: torch.Tensor  # (L, B, D) ln1 output of the previous token, for time mixing
    wkv: torch.Tensor  # (L, B, H, N, N) float32, indexed [key, value]: the attention "memory"
    ffn_shift: torch.Tensor  # (L, B, D) ln2 output of the previous token, for channel mixing

    @property
    def batch_size(self) -> int:
        return self.wkv.shape[1]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.att_shift, self.wkv, self.ffn_shift))

    def split(self) -> list[State]:
        """B states of batch size 1 (copies, so that one session's later update never touches another's)."""
        return [self.select(i) for i in range(self.batch_size)]

    def select(self, i: int) -> State:
        """Session i of the batch as a state of batch size 1 (a copy)."""
        return State(*(t[:, i : i + 1].clone() for t in (self.att_shift, self.wkv, self.ffn_shift)))

    @staticmethod
    def cat(states: list[State]) -> State:
        """One batched state from several (each of any batch size), in order."""
        return State(
            torch.cat([s.att_shift for s in states], dim=1),
            torch.cat([s.wkv for s in states], dim=1),
            torch.cat([s.ffn_shift for s in states], dim=1),
        )

    def clone(self) -> State:
        return State(self.att_shift.clone(), self.wkv.clone(), self.ffn_shift.clone())

    def to(self, device: torch.device | str) -> State:
        return State(self.att_shift.to(device), self.wkv.to(device), self.ffn_shift.to(device))

    def equal(self, other: State) -> bool:
        return all(torch.equal(a, b) for a, b in zip(self.tensors(), other.tensors()))

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.att_shift, self.wkv, self.ffn_shift


def state_to_bytes(state: State, fingerprint: bytes, tokens_consumed: int, dtype: torch.dtype = torch.float32) -> bytes:
    """The versioned binary record of one session's state (batch size 1); shift vectors stored in `dtype`."""
    if state.batch_size != 1:
        raise ValueError(f"a state record holds one session, got batch size {state.batch_size}")
    if len(fingerprint) != 32:
        raise ValueError("fingerprint must be 32 bytes")
    L, _, H, N, _ = state.wkv.shape
    D = state.att_shift.shape[-1]
    parts = [
        state.att_shift.detach().to("cpu", dtype).contiguous(),
        state.wkv.detach().to("cpu", torch.float32).contiguous(),  # the WKV matrix is always fp32
        state.ffn_shift.detach().to("cpu", dtype).contiguous(),
    ]
    payload = b"".join(_tensor_bytes(p) for p in parts)
    header = _HEADER.pack(MAGIC, FORMAT_VERSION, _DTYPE_CODES[dtype], fingerprint, L, D, H, N, tokens_consumed,
                          len(payload))
    crc = zlib.crc32(payload, zlib.crc32(header))
    return b"".join((header, payload, _CRC.pack(crc)))


def read_header(data: bytes | memoryview) -> dict:
    """The header fields of a state record, without checking its payload."""
    if len(data) < _HEADER.size:
        raise StateFormatError(f"state record truncated: {len(data)} bytes, header alone is {_HEADER.size}")
    magic, version, dcode, fp, L, D, H, N, tokens, nbytes = _HEADER.unpack_from(data, 0)
    if magic != MAGIC:
        raise StateFormatError(f"not an RWKV-5 state record (magic {magic!r})")
    if version != FORMAT_VERSION:
        raise StateFormatError(f"state record format version {version}, this build reads {FORMAT_VERSION}")
    if dcode not in _CODE_DTYPES:
        raise StateFormatError(f"state record has unknown dtype code {dcode}")
    return dict(dtype=_CODE_DTYPES[dcode], fingerprint=fp, n_layer=L, n_embd=D, n_head=H, head_size=N,
                tokens_consumed=tokens, payload_bytes=nbytes)


def state_from_bytes(
    data: bytes | bytearray | memoryview, fingerprint: bytes | None, device: torch.device | str = "cpu"
) -> tuple[State, int]:
    """Parse and verify a state record; returns (state of batch size 1, tokens consumed).

    `fingerprint` None skips the model check (for tools that only inspect records)."""
    h = read_header(data)
    if fingerprint is not None and h["fingerprint"] != fingerprint:
        raise ForeignStateError(
            f"state belongs to another model (fingerprint {h['fingerprint'].hex()[:16]}…, "
            f"this model {fingerprint.hex()[:16]}…; shapes L{h['n_layer']} D{h['n_embd']} H{h['n_head']})"
        )
    L, D, H, N, dtype = h["n_layer"], h["n_embd"], h["n_head"], h["head_size"], h["dtype"]
    esize = torch.tensor([], dtype=dtype).element_size()
    expected = 2 * L * D * esize + L * H * N * N * 4
    if h["payload_bytes"] != expected:
        raise StateFormatError(f"state payload is {h['payload_bytes']} bytes, its shapes need {expected}")
    total = _HEADER.size + expected + _CRC.size
    if len(data) != total:
        raise StateFormatError(f"state record is {len(data)} bytes, expected {total} (truncated or padded)")
    view = memoryview(data)
    (crc,) = _CRC.unpack_from(view, total - _CRC.size)
    if zlib.crc32(view[_HEADER.size : total - _CRC.size], zlib.crc32(view[: _HEADER.size])) != crc:
        raise StateFormatError("state record checksum mismatch (corrupted bytes)")
    off = _HEADER.size
    shapes = [((L, 1, D), dtype), ((L, 1, H, N, N), torch.float32), ((L, 1, D), dtype)]
    tensors = []
    for shape, dt in shapes:
        count = math.prod(shape)
        # One plain memcpy through numpy: torch's parallel copy costs ~8 ms of thread wake-ups on a small record.
        raw = np.frombuffer(view, dtype=_NUMPY_BITS[dt], count=count, offset=off).copy()
        off += raw.nbytes
        t = torch.from_numpy(raw).view(dt).reshape(shape)
        tensors.append(t.to(device=device, dtype=torch.float32))
    return State(*tensors), h["tokens_consumed"]


def load_time_state(path: str | Path, n_layer: int, n_head: int, head_size: int, n_embd: int) -> State:
    """A state-tuned file (`blocks.N.att.time_state` [H, N_v, N_k], as RWKV-LM / RWKV-PEFT save it) as an initial state.

    The trainer keeps the WKV state in the CUDA kernel's layout [value, key]; inference indexes it [key, value],
    so each matrix is transposed. Shift vectors start at zero, as in the reference package."""
    try:
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise StateFormatError(f"cannot read state file {path}: {e}") from e
    return time_state_from_dict(sd, n_layer, n_head, head_size, n_embd)


def time_state_from_bytes(data: bytes, n_layer: int, n_head: int, head_size: int, n_embd: int) -> State:
    """`load_time_state` for an upload: the bytes of a torch .pth (zip format, the default since torch 1.6).

    Read with weights_only (no code runs); the zip's declared sizes are checked first, so that a small upload
    cannot unpack into more memory than a state of this model needs."""
    buffer = io.BytesIO(data)
    try:
        with zipfile.ZipFile(buffer) as archive:
            unpacked = sum(entry.file_size for entry in archive.infolist())
    except (zipfile.BadZipFile, ValueError, EOFError) as e:
        raise StateFormatError(f"not a torch .pth file (zip format): {e}") from None
    # Room for the tensors in float64 plus the pickle; a file of the right shapes is far below it.
    limit = 2 * n_layer * n_head * head_size * head_size * 4 + (1 << 20)
    if unpacked > limit:
        raise StateFormatError(f"the .pth unpacks to {unpacked} bytes; a time_state of this model needs at most "
                               f"{limit}")
    buffer.seek(0)
    try:
        sd = torch.load(buffer, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable upload gets the same clear message
        raise StateFormatError(f"cannot read the .pth: {e}") from None
    return time_state_from_dict(sd, n_layer, n_head, head_size, n_embd)


def time_state_from_dict(sd: dict, n_layer: int, n_head: int, head_size: int, n_embd: int) -> State:
    """The initial state held in a dict of `blocks.N.att.time_state` tensors (one per layer, no more, no fewer).

    StateFormatError when the dict holds no such tensors; ForeignStateError when it holds them for another
    model (another layer count or head shape)."""
    if not isinstance(sd, dict):
        raise StateFormatError(f"a state file holds a dict of tensors, not a {type(sd).__name__}")
    layers = {int(m.group(1)): t for k, t in sd.items() if (m := _TIME_STATE_KEY.fullmatch(str(k)))}
    if not layers:
        raise StateFormatError(f"state file has no blocks.N.att.time_state tensors (keys: {sorted(map(str, sd))[:4]}…)")
    if sorted(layers) != list(range(n_layer)):
        raise ForeignStateError(f"state file has time_state tensors for layers {sorted(layers)[:8]}…, the model has "
                                f"{n_layer} layers")
    wkv = torch.zeros(n_layer, 1, n_head, head_size, head_size)
    for i, t in sorted(layers.items()):
        key = f"blocks.{i}.att.time_state"
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise StateFormatError(f"{key} is not a floating-point tensor")
        if tuple(t.shape) != (n_head, head_size, head_size):
            raise ForeignStateError(f"{key} has shape {tuple(t.shape)}, the model needs "
                                    f"{(n_head, head_size, head_size)}")
        wkv[i, 0] = t.float().transpose(1, 2)
    zeros = torch.zeros(n_layer, 1, n_embd)
    return State(zeros, wkv, zeros.clone())


def check_finite(state: State) -> State:
    """The state itself; StateFormatError when it holds NaN or infinity (a session would only produce garbage)."""
    if not all(bool(torch.isfinite(t).all()) for t in state.tensors()):
        raise StateFormatError("the state holds NaN or infinite values")
    return state


def time_state_to_dict(state: State) -> dict[str, torch.Tensor]:
    """The inverse of `time_state_from_dict`: a state (batch size 1) as RWKV-PEFT-style `time_state` tensors."""
    return {f"blocks.{i}.att.time_state": state.wkv[i, 0].transpose(1, 2).contiguous().clone()
            for i in range(state.wkv.shape[0])}


def _tensor_bytes(t: torch.Tensor) -> bytes:
    # bf16 has no numpy dtype: reinterpret the bits as int16 for the copy out.
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return t.numpy().tobytes()
