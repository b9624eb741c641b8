"""The recurrent state of RWKV-5 sessions: a typed, batched record and its versioned byte format."""
from __future__ import annotations

import io
import logging
import math
import re
import struct
import warnings
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import crc32c
import numpy as np
import torch

MAGIC = b"RWKV5ST\x00"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
# magic, format version, shift dtype code, WKV dtype code (version 1: a reserved zero byte, WKV always fp32),
# fingerprint, n_layer, n_embd, n_head, head_size, tokens, payload bytes. Then the payload (att shift [L,D],
# WKV [L,H,N,N], ffn shift [L,D], little-endian) and a CRC of header + payload: CRC-32C (Castagnoli, the SSE4.2 /
# ARMv8 instruction) from version 2 on, zlib's CRC-32 in version 1.
_HEADER = struct.Struct("<8sHBB32sIIIIQQ")
_CRC = struct.Struct("<I")
_DTYPE_CODES = {torch.float32: 1, torch.float16: 2, torch.bfloat16: 3}
_CODE_DTYPES = {v: k for k, v in _DTYPE_CODES.items()}
_NUMPY_BITS = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.uint16}  # bf16: raw bits
_ESIZE = {torch.float32: 4, torch.float16: 2, torch.bfloat16: 2}
# The worker's RWKV_WORKER_STATE_STORAGE_DTYPE names: what every tensor of a stored record is kept in.
STORAGE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_SERIAL_ELEMENTS = 32768 - 64  # see _serial_copy

log = logging.getLogger(__name__)

# Decoding widens 16-bit storage with torch, reading a view of the record (bytes from Redis are read-only)
# that it copies out of once and never writes. torch.frombuffer warns, once per process, that a view of
# read-only memory could be written; that one warning is spent here, silenced, instead of in a worker's log.
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    torch.frombuffer(b"\0\0", dtype=torch.uint8)


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


def state_to_buffer(
    state: State, fingerprint: bytes, tokens_consumed: int, dtype: torch.dtype = torch.float32,
    wkv_dtype: torch.dtype = torch.float32,
) -> memoryview:
    """The versioned binary record of one session's state (batch size 1), shift vectors stored in `dtype` and
    the WKV matrices in `wkv_dtype` (fp32, bf16 or fp16), as a writable memoryview of one buffer.

    One copy: the header and each tensor go straight into one preallocated buffer (the 16-bit conversion
    writes there), and the checksum reads that buffer. Redis takes the memoryview as it is; `state_to_bytes`
    is the same record as bytes. fp16 storage of a tensor holding a value fp16 cannot (beyond 65504, NaN) keeps
    it in fp32 in that record (a warning in the log): the record says what it holds."""
    if state.batch_size != 1:
        raise ValueError(f"a state record holds one session, got batch size {state.batch_size}")
    if len(fingerprint) != 32:
        raise ValueError("fingerprint must be 32 bytes")
    for dt in (dtype, wkv_dtype):
        if dt not in _DTYPE_CODES:
            raise ValueError(f"a state record stores fp32, bf16 or fp16, not {dt}")
    L, _, H, N, _ = state.wkv.shape
    D = state.att_shift.shape[-1]
    parts = ((state.att_shift, dtype), (state.wkv, wkv_dtype), (state.ffn_shift, dtype))
    payload = sum(t.numel() * _ESIZE[dt] for t, dt in parts)
    total = _HEADER.size + payload + _CRC.size
    buf = _record_buffer(total, state.wkv.device)
    _HEADER.pack_into(buf, 0, MAGIC, FORMAT_VERSION, _DTYPE_CODES[dtype], _DTYPE_CODES[wkv_dtype], fingerprint,
                      L, D, H, N, tokens_consumed, payload)
    off = _HEADER.size
    for i, (t, dt) in enumerate(parts):
        region = buf[off : off + t.numel() * _ESIZE[dt]]
        _copy_into(region, t.detach(), dt)
        if dt is torch.float16 and not _fits_fp16(region):
            log.warning("state holds values fp16 cannot (beyond 65504, or NaN): this record keeps the %s in fp32",
                        "WKV matrices" if i == 1 else "shift vectors")
            return state_to_buffer(state, fingerprint, tokens_consumed, torch.float32 if i != 1 else dtype,
                                   torch.float32 if i == 1 else wkv_dtype)
        off += region.nbytes
    view = memoryview(buf)
    _CRC.pack_into(buf, off, crc32c.crc32c(view[:off]))
    return view


def state_to_bytes(
    state: State, fingerprint: bytes, tokens_consumed: int, dtype: torch.dtype = torch.float32,
    wkv_dtype: torch.dtype = torch.float32,
) -> bytes:
    """`state_to_buffer` as bytes (one more copy: for protobuf fields, files and tests; Redis takes the buffer)."""
    return bytes(state_to_buffer(state, fingerprint, tokens_consumed, dtype, wkv_dtype))


def read_header(data: bytes | bytearray | memoryview) -> dict:
    """The header fields of a state record (any readable version), without checking its payload."""
    if len(data) < _HEADER.size:
        raise StateFormatError(f"state record truncated: {len(data)} bytes, header alone is {_HEADER.size}")
    magic, version, dcode, wcode, fp, L, D, H, N, tokens, nbytes = _HEADER.unpack_from(data, 0)
    if magic != MAGIC:
        raise StateFormatError(f"not an RWKV-5 state record (magic {magic!r})")
    if version not in READABLE_VERSIONS:
        raise StateFormatError(f"state record format version {version}, this build reads "
                               f"{', '.join(map(str, READABLE_VERSIONS))}")
    if version == 1:
        wcode = _DTYPE_CODES[torch.float32]  # the byte was reserved: version 1 always stored WKV in fp32
    for code in (dcode, wcode):
        if code not in _CODE_DTYPES:
            raise StateFormatError(f"state record has unknown dtype code {code}")
    return dict(version=version, dtype=_CODE_DTYPES[dcode], wkv_dtype=_CODE_DTYPES[wcode], fingerprint=fp,
                n_layer=L, n_embd=D, n_head=H, head_size=N, tokens_consumed=tokens,
                payload_bytes=nbytes)


def state_from_bytes(
    data: bytes | bytearray | memoryview, fingerprint: bytes | None, device: torch.device | str = "cpu"
) -> tuple[State, int]:
    """Parse and verify a state record of any readable version and storage dtype; returns (state of batch
    size 1, in fp32 on `device`, tokens consumed).

    The tensors are read in place (views of `data`) and copied once into fresh fp32 tensors, widening 16-bit
    storage on the way. `fingerprint` None skips the model check (for tools that only inspect records)."""
    h = read_header(data)
    if fingerprint is not None and h["fingerprint"] != fingerprint:
        raise ForeignStateError(
            f"state belongs to another model (fingerprint {h['fingerprint'].hex()[:16]}…, "
            f"this model {fingerprint.hex()[:16]}…; shapes L{h['n_layer']} D{h['n_embd']} H{h['n_head']})"
        )
    L, D, H, N, dtype, wkv_dtype = (h[k] for k in ("n_layer", "n_embd", "n_head", "head_size", "dtype", "wkv_dtype"))
    shapes = (((L, 1, D), dtype), ((L, 1, H, N, N), wkv_dtype), ((L, 1, D), dtype))
    expected = sum(math.prod(shape) * _ESIZE[dt] for shape, dt in shapes)
    if h["payload_bytes"] != expected:
        raise StateFormatError(f"state payload is {h['payload_bytes']} bytes, its shapes need {expected}")
    total = _HEADER.size + expected + _CRC.size
    if len(data) != total:
        raise StateFormatError(f"state record is {len(data)} bytes, expected {total} (truncated or padded)")
    view = memoryview(data).cast("B") if isinstance(data, memoryview) else memoryview(data)
    (crc,) = _CRC.unpack_from(view, total - _CRC.size)
    covered = view[: total - _CRC.size]
    actual = crc32c.crc32c(covered) if h["version"] >= 2 else zlib.crc32(covered)
    if actual != crc:
        raise StateFormatError("state record checksum mismatch (corrupted bytes)")
    device = torch.device(device)
    off = _HEADER.size
    tensors = []
    for shape, dt in shapes:
        count = math.prod(shape)
        tensors.append(_copy_out(view, off, count, dt, device).view(shape))
        off += count * _ESIZE[dt]
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


def _fits_fp16(region: np.ndarray) -> bool:
    """Whether fp16 values (as bytes) are all finite: no overflow to infinity, no NaN. Two integer max-reductions
    over the bits, no temporary: +inf/NaN have int16 bits >= 0x7C00, -inf/NaN uint16 bits >= 0xFC00."""
    bits = region.view(np.int16)
    return not bits.size or (int(bits.max()) < 0x7C00 and int(bits.view(np.uint16).max()) < 0xFC00)


def _record_buffer(nbytes: int, source: torch.device) -> np.ndarray:
    """The uninitialized host buffer a record is written into.

    numpy rather than bytearray: it asks the kernel for huge pages (a 43 MB record is ~20 pages, not ~10,000 faults
    of 4 KiB that cost more than the copy), and it skips bytearray's zero fill. For a state on a GPU, pinned memory
    from torch's caching host allocator: the device-to-host copy is then one DMA straight into the record, where
    pageable memory makes the driver stage it through a pinned buffer of its own (a second copy); the array keeps
    the block alive until Redis has sent it."""
    if source.type == "cuda":
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True).numpy()
    return np.empty(nbytes, dtype=np.uint8)


def _host_numpy(t: torch.Tensor) -> np.ndarray:
    return (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy()  # bf16: raw bits


def _serial_copy(dst: torch.Tensor, src: torch.Tensor) -> None:
    """dst.copy_(src) for flat host tensors, in pieces under torch's grain size (32768 elements), so that each runs
    on the calling thread alone. A dtype conversion is memory-bound, and waking torch's OpenMP pool from the side
    thread that encodes or decodes, on cores the engine (or anything else) keeps busy, cost more than it saved on
    the 2-core box the benchmarks ran on: 8 ms for a 270 KB record (docs/benchmarks.md), 30-60 ms for a 12B one."""
    for d, s in zip(dst.split(_SERIAL_ELEMENTS), src.split(_SERIAL_ELEMENTS)):
        d.copy_(s)


def _copy_into(region: np.ndarray, t: torch.Tensor, dt: torch.dtype) -> None:
    """t (any device, any float dtype) into `region` (its bytes in the record) as dt: the one copy."""
    if t.device.type != "cpu":  # converted on the device, then one copy to the host
        torch.from_numpy(region).view(dt).view(t.shape).copy_(t)
    elif t.dtype == dt:  # a plain memcpy through numpy
        src = _host_numpy(t)
        np.copyto(region.view(src.dtype).reshape(src.shape), src)
    else:
        _serial_copy(torch.from_numpy(region).view(dt), t.reshape(-1))


def _copy_out(view: memoryview, off: int, count: int, dt: torch.dtype, device: torch.device) -> torch.Tensor:
    """The `count` values of dtype dt at `off` in a record as a fresh fp32 tensor on `device`: the one copy."""
    if device.type != "cpu":  # to the device as stored, widened there
        return torch.frombuffer(view, dtype=dt, count=count, offset=off).to(device).float()
    out = np.empty(count, dtype=np.float32)  # numpy: huge pages (see state_to_buffer)
    if dt is torch.float32:
        np.copyto(out, np.frombuffer(view, dtype=np.float32, count=count, offset=off))
    else:
        _serial_copy(torch.from_numpy(out), torch.frombuffer(view, dtype=dt, count=count, offset=off))
    return torch.from_numpy(out)
