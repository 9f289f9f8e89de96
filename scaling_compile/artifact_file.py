"""Reading an artifact file safely: the file and its safetensors container, checked before use.

A path handed to the backend may be anything: a FIFO (reading it would block
forever), a directory, a device, a file whose header claims gigabytes of
tensors, a file truncated in transit. :func:`read_artifact_file` opens the
path without blocking, insists on a regular file, parses the safetensors
header itself with every size bounded by the file's real size (a header
declaring a 2 GiB tensor in a 4 KiB file is refused before anything else is
read), and only then reads the bytes (once: they are hashed for the cache and
parsed from memory). Every problem is an :class:`ArtifactError` that names
the file and says what to do.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import stat
from dataclasses import dataclass

from .errors import ArtifactError

# safetensors' own limit on the JSON header (safetensors/src/tensor.rs: MAX_HEADER_SIZE)
MAX_HEADER_BYTES = 100_000_000
# bytes per element of every dtype safetensors can store
DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}
MAX_DIMS = 8

_RECREATE = "re-create it with `scaling-compile profile` (or Topology.save)"


@dataclass(frozen=True)
class ArtifactFile:
    """The bytes of a checked artifact file and its parsed safetensors header."""

    path: str
    data: bytes  # the whole file
    metadata: dict[str, str]  # the header's ``__metadata__``
    tensors: dict[str, dict]  # name -> {"dtype", "shape", "data_offsets"}
    data_start: int  # offset of the tensor data in ``data``
    sha256: str  # of the whole file: the identity of its content

    @property
    def tensor_bytes(self) -> memoryview:
        return memoryview(self.data)[self.data_start:]


def _fail(path: str, message: str) -> None:
    raise ArtifactError(f"artifact {path!r}: {message}")


def read_artifact_file(path: str | os.PathLike) -> ArtifactFile:
    """Open, check and read the artifact at ``path``; raise :class:`ArtifactError` for anything wrong."""
    path = os.fspath(path)
    data = _read_regular_file(path)
    return parse_container(path, data)


def _read_regular_file(path: str) -> bytes:
    try:
        # O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer forever
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise ArtifactError(
            f"artifact {path!r} does not exist: make one with `scaling-compile profile` "
            "or pass a Topology object"
        ) from None
    except IsADirectoryError:
        _fail(path, "is a directory, not a file: pass the path of the .safetensors artifact inside it")
    except OSError as error:
        if error.errno == errno.ENXIO:  # a FIFO or socket with no writer on some systems
            _fail(path, "is not a regular file (a FIFO or socket): pass the path of a .safetensors artifact")
        _fail(path, f"cannot be opened ({error.strerror or error}): check the path and its permissions")
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            _fail(path, "is a directory, not a file: pass the path of the .safetensors artifact inside it")
        if not stat.S_ISREG(info.st_mode):
            kind = ("a FIFO" if stat.S_ISFIFO(info.st_mode) else "a socket" if stat.S_ISSOCK(info.st_mode)
                    else "a device" if stat.S_ISCHR(info.st_mode) or stat.S_ISBLK(info.st_mode) else "not a file")
            _fail(path, f"is {kind}, not a regular file: pass the path of a .safetensors artifact")
        size = info.st_size
        chunks, remaining = [], size
        while remaining > 0:
            chunk = os.read(fd, min(remaining, 1 << 24))
            if not chunk:
                break
            chunks.append(chunk)
            remaining -= len(chunk)
        return b"".join(chunks)
    except OSError as error:
        _fail(path, f"cannot be read ({error.strerror or error}); check the file, or {_RECREATE}")
    finally:
        os.close(fd)


def parse_container(path: str, data: bytes) -> ArtifactFile:
    """Parse and bound-check the safetensors container in ``data`` (the bytes of ``path``)."""
    size = len(data)
    if size < 8:
        _fail(path, f"is corrupt or truncated ({size} bytes, shorter than a safetensors header); {_RECREATE}")
    header_length = int.from_bytes(data[:8], "little")
    if header_length > size - 8 or header_length > MAX_HEADER_BYTES or header_length < 2:
        _fail(path, f"is corrupt or truncated (its header claims {header_length} bytes, the file has "
                    f"{size - 8} after the length field); {_RECREATE}")
    try:
        header = json.loads(data[8:8 + header_length].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        _fail(path, f"is corrupt or truncated (its safetensors header is not valid JSON: {error}); {_RECREATE}")
    if not isinstance(header, dict):
        _fail(path, f"is corrupt or truncated (its safetensors header is not a JSON object); {_RECREATE}")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        _fail(path, f"is corrupt or truncated (__metadata__ must map strings to strings); {_RECREATE}")
    data_start = 8 + header_length
    data_length = size - data_start
    spans = []
    for name, info in header.items():
        where = f"tensor {name!r}"
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            _fail(path, f"is corrupt or truncated ({where} is not described by dtype, shape and "
                        f"data_offsets); {_RECREATE}")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in DTYPE_BYTES:
            _fail(path, f"is corrupt or truncated ({where} has unknown dtype {dtype!r}); {_RECREATE}")
        if (not isinstance(shape, list) or len(shape) > MAX_DIMS
                or not all(type(d) is int and 0 <= d <= data_length for d in shape)):
            _fail(path, f"is corrupt or truncated ({where} has shape {shape!r}: at most {MAX_DIMS} sizes, "
                        f"each between 0 and the file size); {_RECREATE}")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
                or not 0 <= offsets[0] <= offsets[1] <= data_length):
            _fail(path, f"is corrupt or truncated ({where} has data_offsets {offsets!r} outside the "
                        f"{data_length} data bytes of the file); {_RECREATE}")
        needed = math.prod(shape) * DTYPE_BYTES[dtype]
        if offsets[1] - offsets[0] != needed:
            _fail(path, f"is corrupt or truncated ({where} of {dtype} {shape} needs {needed} bytes, its "
                        f"data_offsets give {offsets[1] - offsets[0]}); {_RECREATE}")
        spans.append((offsets[0], offsets[1], name))
    spans.sort()
    position = 0
    for begin, end, name in spans:
        if begin != position:
            _fail(path, f"is corrupt or truncated (tensor {name!r} starts at byte {begin} of the data, "
                        f"expected {position}: tensors overlap or leave a gap); {_RECREATE}")
        position = end
    if position != data_length:
        _fail(path, f"is corrupt or truncated (its tensors cover {position} of the {data_length} data bytes); "
                    f"{_RECREATE}")
    return ArtifactFile(path, data, metadata, header, data_start, hashlib.sha256(data).hexdigest())





def content_checksum(header: dict[str, str], tensors: dict[str, dict], tensor_bytes: bytes) -> str:
    """``sha256:<hex>`` of an artifact's header fields (all but ``checksum``), its tensor table
    (names, dtypes, shapes, offsets) and its tensor bytes: what :meth:`Topology.save` writes
    into the header's ``checksum`` and what a reader recomputes."""
    fields = {k: v for k, v in header.items() if k != "checksum"}
    canonical = json.dumps({"header": fields, "tensors": tensors}, sort_keys=True, separators=(",", ":"))
    digest = hashlib.sha256(canonical.encode("utf-8"))
    digest.update(tensor_bytes)
    return "sha256:" + digest.hexdigest()
__all__ = ["ArtifactFile", "MAX_HEADER_BYTES", "content_checksum", "parse_container", "read_artifact_file"]
