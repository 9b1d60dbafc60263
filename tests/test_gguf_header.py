"""gguf_header.extent against the `gguf` package's own reader: the same data start and tensor
extent on files written by the `gguf` package's writer, any quantisation type it knows (Q5_0, the
type Qwen2.5-Coder-0.5B ships in, which transformers' own header reader refuses), and a cut
anywhere refused as truncated, never passed."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest

from selfpruner import model_source
from selfpruner.errors import UserError
from selfpruner.gguf_header import Truncated, Unreadable, extent


def write(path: Path, kinds=("Q5_0", "Q4_1", "F32"), alignment: int | None = None) -> Path:
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_token_list([f"tok{i}" for i in range(300)])  # an array of strings, as a vocabulary is
    w.add_token_scores([0.5] * 300)  # an array of scalars
    if alignment:
        w.add_custom_alignment(alignment)
    for i, kind in enumerate(kinds):
        qtype = gguf.GGMLQuantizationType[kind]
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        rows, cols = 4 + i, 64
        raw = np.random.default_rng(i).integers(0, 255, rows * cols // block * size, dtype=np.uint8)
        if kind == "F32":
            w.add_tensor(f"t{i}", np.zeros((rows, cols), dtype=np.float32))
        else:
            w.add_tensor(f"t{i}", raw.reshape(rows, cols // block * size), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("alignment", [None, 64])
def test_the_extent_is_what_ggufs_own_reader_reads(tmp_path, alignment):
    path = write(tmp_path / "m.gguf", alignment=alignment)
    found = extent(path)
    reader = gguf.GGUFReader(str(path))
    assert found.tensors == len(reader.tensors) == 3
    assert found.data_start == reader.data_offset
    assert found.need == max(int(t.data_offset) + int(t.n_bytes) for t in reader.tensors) == path.stat().st_size
    model_source.check_gguf(path)  # whole: no complaint, whatever the quantisation types


def test_the_demo_model_is_whole():
    demo = model_source.demo_gguf()
    assert extent(demo).need == demo.stat().st_size


def test_a_cut_anywhere_is_refused_as_truncated(tmp_path):
    whole = write(tmp_path / "whole.gguf").read_bytes()
    start = extent(tmp_path / "whole.gguf").data_start
    cut = tmp_path / "cut.gguf"
    # inside the magic, the counts, the vocabulary, the tensor table, the padding and the data
    for keep in (2, 12, 200, start - 40, start - 1, start + 10, len(whole) - 1):
        cut.write_bytes(whole[:keep])
        with pytest.raises(UserError, match="truncated"):
            model_source.check_gguf(cut)
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(Truncated):
        extent(empty)


def test_what_is_not_gguf_is_named_so(tmp_path):
    other = tmp_path / "model.gguf"
    other.write_bytes(b"PK\x03\x04 a zip file, not a model" * 4)
    with pytest.raises(UserError, match="not a readable GGUF file.*magic"):
        model_source.check_gguf(other)
    future = tmp_path / "v9.gguf"
    future.write_bytes(b"GGUF" + (9).to_bytes(4, "little") + bytes(16))
    with pytest.raises(Unreadable, match="version 9"):
        extent(future)
