"""Held-out and calibration texts from several domains, as plain UTF-8 files, for benchmarks.

Why: every quality figure measured on Shakespeare alone (calibration, fitness and held-out from
one author) flatters the allocation and, most of all, the refit, which is fitted on calibration
text. These are the other domains; none of them is a dependency of the package, the demo or CI.

- `kjv.txt`: the King James Bible from Debian's `bible-kjv` + `bible-kjv-text` (the `bible`
  program prints it; verse numbers dropped): archaic English prose, no Shakespeare in it.
- `python-docs.txt`: Python 3.11's documentation sources (reStructuredText, `_sources/` of
  Debian's `python3.11-doc`), the tutorial, library reference and HOWTOs in file-name order:
  technical English with code.

The product's own demo texts give two more: `demo:code` (docutils' Python source) and
`demo:calibration-shakespeare`; `demo:calibration` is the two interleaved (corpus.py).

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
from pathlib import Path

DOC_PARTS = ("tutorial/", "library/", "howto/")


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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for the text files")
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        root = debian(["bible-kjv", "bible-kjv-text", "python3.11-doc"], tmp)
        texts = {"kjv.txt": kjv(root), "python-docs.txt": python_docs(root)}
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
