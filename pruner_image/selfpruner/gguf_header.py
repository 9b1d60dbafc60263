"""How many bytes a GGUF file must have, from its header and tensor table alone.

Why our own walker: the check that a downloaded GGUF file is whole must not depend on which
quantisation types the installed transformers can dequantise natively. transformers 5.17's header
reader refused the demo model's Q4_1 tensors and every version's refuses Q5_0 (Qwen2.5-Coder-0.5B's),
although its loader reads both through the `gguf` package; and `gguf.GGUFReader` takes 13 s on a
151 k-token vocabulary. This walks the header (format version 2 and 3) in well under a second,
reading no tensor data, and sizes each tensor from the `gguf` package's table of block sizes.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

MAGIC = b"GGUF"
# value types of the key-value section: struct format of the scalars; 8 is a string, 9 an array
SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
STRING, ARRAY = 8, 9
DEFAULT_ALIGNMENT = 32


class Truncated(Exception):
    """The file ends inside its header or tensor table."""


class Unreadable(Exception):
    """Not a GGUF file this walker knows (bad magic, version, value type or tensor type)."""


@dataclass
class Extent:
    tensors: int
    data_start: int
    need: int  # bytes the file must have: data start + the furthest tensor's end


class _Cursor:
    def __init__(self, buf):
        self.buf, self.pos = buf, 0

    def take(self, fmt: str):
        size = struct.calcsize("<" + fmt)
        if self.pos + size > len(self.buf):
            raise Truncated
        out = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += size
        return out[0] if len(out) == 1 else out

    def skip_string(self) -> None:
        n = self.take("Q")
        if self.pos + n > len(self.buf):
            raise Truncated
        self.pos += n

    def string(self) -> str:
        start = self.pos + 8
        self.skip_string()
        return bytes(self.buf[start:self.pos]).decode("utf-8", errors="replace")

    def skip_value(self, vtype: int) -> None:
        if vtype in SCALARS:
            self.take(SCALARS[vtype])
        elif vtype == STRING:
            self.skip_string()
        elif vtype == ARRAY:
            item, count = self.take("I"), self.take("Q")
            if item in SCALARS:  # a block of fixed-size items: one jump
                size = struct.calcsize("<" + SCALARS[item]) * count
                if self.pos + size > len(self.buf):
                    raise Truncated
                self.pos += size
            else:
                for _ in range(count):
                    self.skip_value(item)
        else:
            raise Unreadable(f"unknown value type {vtype} at byte {self.pos}")


def extent(path: Path) -> Extent:
    """The header's claims about the file's size; Truncated or Unreadable where it cannot tell."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    with open(path, "rb") as f:
        if path.stat().st_size == 0:
            raise Truncated
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            c = _Cursor(buf)
            if bytes(buf[:4]) != MAGIC:
                if len(buf) < 4 and MAGIC.startswith(bytes(buf[:4])):
                    raise Truncated
                raise Unreadable("it does not start with the GGUF magic")
            c.pos = 4
            version = c.take("I")
            if version not in (2, 3):
                raise Unreadable(f"GGUF version {version} (this reads 2 and 3)")
            n_tensors, n_kv = c.take("Q"), c.take("Q")
            alignment = DEFAULT_ALIGNMENT
            for _ in range(n_kv):
                key, vtype = c.string(), c.take("I")
                if key == "general.alignment" and vtype == 4:
                    alignment = c.take("I") or DEFAULT_ALIGNMENT
                else:
                    c.skip_value(vtype)
            furthest = 0
            for _ in range(n_tensors):
                c.skip_string()
                dims = [c.take("Q") for _ in range(c.take("I"))]
                ttype, offset = c.take("I"), c.take("Q")
                try:
                    block, size = GGML_QUANT_SIZES[GGMLQuantizationType(ttype)]
                except (ValueError, KeyError):
                    raise Unreadable(f"unknown tensor type {ttype}") from None
                elements = 1
                for d in dims:
                    elements *= d
                furthest = max(furthest, offset + elements // block * size)
            data_start = -(-c.pos // alignment) * alignment
            return Extent(tensors=n_tensors, data_start=data_start, need=data_start + furthest)
