"""The one safetensors reader and writer every message uses.

A message is a safetensors blob: named tensors plus a flat string -> string metadata map. The byte layout:

    offset 0       8 bytes  H, the header's length, unsigned 64-bit little-endian
    offset 8       H bytes  the header: a UTF-8 JSON object (tensor name -> dtype, shape, data_offsets;
                            "__metadata__" -> the string map), padded with spaces to a multiple of 8
    offset 8 + H   D bytes  the tensors' raw bytes, little-endian, row-major

`write` rewrites the header with sorted keys and no spaces: safetensors orders the metadata by a hash map,
so equal messages would otherwise give different bytes, and the engines and replay compare messages byte
for byte. `read` trusts nothing: a byte cap before parsing, a header-size cap, the header's JSON, the tensor
names and dtypes a message allows, the metadata as a string map with exactly the declared fields (each
parsed to its type), the version, and then safetensors' own check that offsets cover the data exactly. Every
failure is one PacketError (`error`, a subclass of it, if the caller names one) with one reason.
"""

from __future__ import annotations

import json
import re
from typing import Any, Callable, Mapping

import numpy as np
import safetensors.numpy
import safetensors.torch
import torch

from deepfusion.wire import PacketError

MAX_HEADER = 1 << 20  # header bytes a message may claim: a few hundred to a few thousand in practice
_INT_RE = re.compile(r"-?[0-9]{1,30}")  # plain decimal only: no "1_000", no " 7", no 10**4000

# A metadata field's type: how its string is written and parsed back
Field = type | str  # str, int, float, or "json"


def write(tensors: Mapping[str, np.ndarray] | Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> bytes:
    """Tensors (all numpy or all torch) and string metadata as canonical safetensors bytes."""
    if not all(isinstance(v, str) for v in metadata.values()):
        bad = sorted(k for k, v in metadata.items() if not isinstance(v, str))
        raise PacketError(f"metadata values must be strings, got non-strings under {bad}; encode them with to_str")
    if all(isinstance(t, torch.Tensor) for t in tensors.values()):
        blob = safetensors.torch.save({k: t.contiguous() for k, t in tensors.items()}, metadata=dict(metadata))
    else:  # safetensors reads raw memory from the data pointer, so arrays must be contiguous
        blob = safetensors.numpy.save({k: np.ascontiguousarray(a) for k, a in tensors.items()}, metadata=dict(metadata))
    return _canonical(blob)


def _canonical(blob: bytes) -> bytes:
    """The same blob with its header's keys sorted: the data region does not move."""
    n = int.from_bytes(blob[:8], "little")
    header = json.dumps(json.loads(blob[8:8 + n]), separators=(",", ":"), sort_keys=True).encode()
    header += b" " * (-len(header) % 8)  # safetensors pads the header to 8-byte alignment
    return len(header).to_bytes(8, "little") + header + blob[8 + n:]


def to_str(value: Any, typ: Field) -> str:
    """A metadata value as its string: repr() of a float round-trips exactly, str() of an int is plain decimal,
    JSON with sorted keys so equal values give equal bytes."""
    if typ == "json":
        return json.dumps(value, sort_keys=True)
    return repr(float(value)) if typ is float else str(value)


def read(data: bytes, what: str, *, version: str, fields: Mapping[str, Field], max_bytes: int,
         tensors: Mapping[str, tuple[str, ...]] | None = None, prefix: str | None = None,
         max_header: int = MAX_HEADER, backend: str = "numpy",
         mismatch: str = "wire version {got!r}, this reader understands {want!r}; sender and reader must run the "
                         "same wire version", error: type[PacketError] = PacketError,
         ) -> tuple[dict[str, np.ndarray] | dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, typed metadata) of one message, or `error` naming the first defect.

    what       the message's name in errors ("packet", "upload", ...)
    version    the metadata "version" this reader understands; `mismatch` says what to do otherwise
               ({got}, {want} filled in); checked before the other fields, a future version may have others
    fields     exactly the metadata keys the message has (version included), each str, int, float or "json"
    prefix     keys starting with it are allowed besides `fields` and stay strings (the Setup's files)
    tensors    exactly the tensor names the message has, each with the dtypes it allows; None: any names
    backend    "numpy" or "torch" (bfloat16 has no numpy dtype)
    """
    def malformed(reason: str):
        return error(f"malformed {what}: {reason}")

    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise malformed(f"must be bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) > max_bytes:
        raise error(f"{what} is {len(data)} bytes, over the {max_bytes}-byte limit; refused unread")
    header = _header(data, max_header, malformed)
    if tensors is not None:
        _check_tensors(header, tensors, malformed)
    meta = _metadata(header, version, fields, prefix, mismatch, what, malformed, error)
    try:  # safetensors checks offsets, sizes and that the data is exactly covered
        loaded = (safetensors.torch if backend == "torch" else safetensors.numpy).load(data)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # pyo3 panics derive from BaseException, not Exception
        raise malformed(f"not valid safetensors, its header does not describe its data "
                        f"({type(e).__name__}: {str(e)[:120]})") from None
    return loaded, meta


def _header(data: bytes, max_header: int, malformed: Callable) -> dict:
    """The JSON header. safetensors' loaders do not return the metadata, so we read the header ourselves;
    checking it here also gives clearer errors than the loader."""
    if len(data) < 8:
        raise malformed(f"{len(data)} bytes, too short to hold the 8-byte header length")
    n = int.from_bytes(data[:8], "little")
    if n > len(data) - 8:
        raise malformed(f"header claims {n} bytes but only {len(data) - 8} follow; truncated or not safetensors")
    if n > max_header:
        raise malformed(f"header claims {n} bytes, over the {max_header}-byte limit for its header")
    try:
        header = json.loads(data[8:8 + n])
    except Exception as e:  # bad utf-8, bad JSON, absurd nesting (RecursionError)
        raise malformed(f"header is not valid JSON: {type(e).__name__}") from None
    if not isinstance(header, dict):
        raise malformed(f"header must be a JSON object, got {type(header).__name__}")
    return header


def _check_tensors(header: dict, allowed: Mapping[str, tuple[str, ...]], malformed: Callable) -> None:
    names = set(header) - {"__metadata__"}
    if names != set(allowed):
        raise malformed(f"tensors must be exactly {sorted(allowed)}, got {sorted(names)}")
    for name, dtypes in allowed.items():
        entry = header[name]
        dtype = entry.get("dtype") if isinstance(entry, dict) else None
        if dtype not in dtypes:
            raise malformed(f"tensor {name!r} has dtype {dtype!r}; the wire format allows {list(dtypes)}")


def _metadata(header: dict, version: str, fields: Mapping[str, Field], prefix: str | None, mismatch: str,
              what: str, malformed: Callable, error: type[PacketError]) -> dict[str, Any]:
    """Typed fields from the header's __metadata__ (a str -> str map)."""
    meta = header.get("__metadata__")
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise malformed("header __metadata__ must be a map of strings to strings")
    # version first: a future version may have different fields, and this is the real reason
    if meta.get("version") != version:
        raise error(f"{what}: " + mismatch.format(got=meta.get("version"), want=version))
    keys = {k for k in meta if prefix is None or not k.startswith(prefix)}
    if keys != set(fields):
        missing, extra = set(fields) - keys, keys - set(fields)
        raise malformed(f"metadata fields wrong: missing {sorted(missing)}, unexpected {sorted(extra)}")
    out = {k: v for k, v in meta.items() if k not in fields}  # the prefixed keys, as strings
    for key, typ in fields.items():
        out[key] = _parse(meta[key], key, typ, malformed)
    return out


def _parse(s: str, key: str, typ: Field, malformed: Callable) -> Any:
    if typ is int:
        if not _INT_RE.fullmatch(s):
            raise malformed(f"metadata {key!r} must be a decimal integer, got {s[:40]!r}")
        return int(s)
    if typ is float:
        try:
            return float(s)
        except ValueError:
            raise malformed(f"metadata {key!r} must be a float, got {s[:40]!r}") from None
    if typ == "json":
        try:
            return json.loads(s)
        except Exception as e:  # bad JSON, absurd nesting
            raise malformed(f"metadata {key!r} must be JSON, got {s[:40]!r} ({type(e).__name__})") from None
    return s
