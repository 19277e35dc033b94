"""MemoryState: everything a session carries between segments, explicit and fixed in size.

Per layer the associative matrix A [d_key, d] and normaliser z [d_key]; plus the pending tail of token ids not
yet written (less than one segment), counters, and the fingerprint of the model that wrote it. Saved as one
safetensors file (tensors + JSON metadata in its header), written atomically.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save

STATE_FORMAT = "armt-state/1"


class StateMismatchError(ValueError):
    """A state was used with (or loaded for) a model other than the one that wrote it."""


@dataclass
class MemoryState:
    A: torch.Tensor  # [L, d_key, d]
    z: torch.Tensor  # [L, d_key]
    fingerprint: str
    pending: list[int] = field(default_factory=list)  # token ids waiting for a whole segment
    segments: int = 0  # segments written into memory
    tokens_written: int = 0  # tokens of those segments

    def __repr__(self) -> str:  # the tensors' values would flood a terminal
        return (f"MemoryState(A {tuple(self.A.shape)}, z {tuple(self.z.shape)}, {self.segments} segments, "
                f"{self.tokens_written} tokens written, {len(self.pending)} pending, model {self.fingerprint})")

    @property
    def tokens(self) -> int:
        """Every token this state was given: written into memory plus pending."""
        return self.tokens_written + len(self.pending)

    @property
    def nbytes(self) -> int:
        """Size of the memory itself (A and z); independent of the document's length."""
        return self.A.numel() * self.A.element_size() + self.z.numel() * self.z.element_size()

    def clone(self) -> "MemoryState":
        return MemoryState(
            self.A.clone(), self.z.clone(), self.fingerprint, list(self.pending), self.segments, self.tokens_written
        )

    def check(self, fingerprint: str | tuple[str, ...]) -> None:
        """StateMismatchError unless this state was written by the model of `fingerprint` (one name, or a model's
        `fingerprints`: its current name and the one earlier versions gave it)."""
        names = (fingerprint,) if isinstance(fingerprint, str) else tuple(fingerprint)
        if self.fingerprint not in names:
            raise StateMismatchError(
                f"memory state was written by model {self.fingerprint}, not by this model {names[0]}"
            )

    def metadata(self) -> dict:
        return {
            "format": STATE_FORMAT,
            "fingerprint": self.fingerprint,
            "segments": self.segments,
            "tokens_written": self.tokens_written,
        }

    def to_bytes(self, extra_metadata: dict[str, str] | None = None) -> bytes:
        """The safetensors file; `extra_metadata` (string values) rides in the same header, so that a caller
        (the service's session store) can keep its own metadata in one file, written in one atomic rename."""
        tensors = {
            "A": self.A.detach().cpu().contiguous(),
            "z": self.z.detach().cpu().contiguous(),
            "pending": torch.tensor(self.pending, dtype=torch.int64),
        }
        metadata = {**(extra_metadata or {}), "armt": json.dumps(self.metadata(), sort_keys=True)}
        return save(tensors, metadata=metadata)

    @classmethod
    def from_bytes(cls, data: bytes, fingerprint: str | tuple[str, ...] | None = None) -> "MemoryState":
        """Inverse of `to_bytes`; with `fingerprint`, refuse a state written by another model."""
        from safetensors.torch import load as load_tensors

        meta = json.loads(header_metadata(data).get("armt", "{}"))
        if not isinstance(meta, dict):
            raise ValueError(f"not an ARMT memory state (its metadata is a JSON {type(meta).__name__})")
        if meta.get("format") != STATE_FORMAT:
            raise ValueError(f"not an ARMT memory state (format {meta.get('format')!r})")
        try:
            tensors = load_tensors(data)
        except Exception as e:  # safetensors raises its own error type for corrupt data
            raise ValueError(f"cannot read memory state: {e}") from None
        state = cls._checked(meta, tensors, "memory state")
        if fingerprint is not None:
            state.check(fingerprint)
        return state

    def digest(self) -> str:
        """sha256 of the serialized state: equal digests mean bit-identical memory, tail and counters."""
        return hashlib.sha256(self.to_bytes()).hexdigest()

    def save(self, path: str | Path) -> None:
        """Atomic write: the file at `path` is the old state or the new one, never a torn mix."""
        atomic_write(Path(path), self.to_bytes())

    @classmethod
    def load(
        cls, path: str | Path, fingerprint: str | tuple[str, ...] | None = None, device: str | torch.device = "cpu"
    ) -> "MemoryState":
        """Read a saved state; with `fingerprint`, refuse one written by another model."""
        path = Path(path)
        try:
            with safe_open(str(path), framework="pt", device=str(device)) as f:
                meta = json.loads((f.metadata() or {}).get("armt", "{}"))
                if meta.get("format") != STATE_FORMAT:
                    raise ValueError(f"{path} is not an ARMT memory state (format {meta.get('format')!r})")
                tensors = {name: f.get_tensor(name) for name in f.keys()}
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read memory state {path}: {e}") from None
        except Exception as e:  # safetensors raises its own error type for corrupt headers
            if isinstance(e, ValueError):
                raise
            raise ValueError(f"cannot read memory state {path}: {e}") from None
        state = cls._checked(meta, tensors, f"memory state {path}")
        if fingerprint is not None:
            state.check(fingerprint)
        return state

    @classmethod
    def _checked(cls, meta: dict, tensors: dict, what: str) -> "MemoryState":
        """A state from a file's parts, its structure checked (ValueError): a file with the right fingerprint but
        a wrong shape, dtype or token list would otherwise fail far from here, or pass as a valid state."""
        missing = [k for k in ("fingerprint", "segments", "tokens_written") if k not in meta]
        missing += [k for k in ("A", "z", "pending") if k not in tensors]
        if missing:
            raise ValueError(f"{what} lacks {', '.join(missing)}")
        A, z, pending = tensors["A"], tensors["z"], tensors["pending"]
        if A.dtype != z.dtype or A.dtype not in (torch.float32, torch.float64):  # float64: a float64 model's
            raise ValueError(f"{what}: A and z must be float32 (or both float64), got {A.dtype} and {z.dtype}")
        if A.dim() != 3 or tuple(z.shape) != tuple(A.shape[:2]):
            raise ValueError(f"{what}: A must be [L, d_key, d] and z [L, d_key], got {tuple(A.shape)} and "
                             f"{tuple(z.shape)}")
        if pending.dtype != torch.int64 or pending.dim() != 1 or (pending.numel() and int(pending.min()) < 0):
            raise ValueError(f"{what}: pending must be non-negative int64 token ids [n]")
        segments, written = meta["segments"], meta["tokens_written"]
        if any(isinstance(n, bool) or not isinstance(n, int) or n < 0 for n in (segments, written)):
            raise ValueError(f"{what}: segments and tokens_written must be integers >= 0, got {segments!r} and "
                             f"{written!r}")
        return cls(A, z, str(meta["fingerprint"]), pending.tolist(), segments, written)


def header_metadata(data: bytes) -> dict[str, str]:
    """The `__metadata__` of a safetensors file given its leading bytes (the header is enough, no tensors).

    Raises ValueError when the bytes are not a safetensors header.
    """
    if len(data) < 8:
        raise ValueError("not a safetensors file: shorter than its 8-byte header length")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        raise ValueError(f"not a safetensors file: header of {n} bytes but only {len(data) - 8} follow")
    try:
        header = json.loads(data[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"not a safetensors file: bad header ({e})") from None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return meta if isinstance(meta, dict) else {}


def atomic_write(path: Path, data: bytes, before_replace: Callable[[], None] | None = None) -> None:
    """Write `data` so that `path` holds the old content or the new one after a crash, never a mix:
    temporary file in the same directory, fsync, rename over `path`, fsync of the directory.
    `before_replace` runs between the fsync and the rename (fault injection in crash tests)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if before_replace is not None:
            before_replace()
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    """Make a rename or unlink in `directory` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
