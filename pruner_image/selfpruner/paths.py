"""Where selfpruner keeps things it can rebuild: converted models, calibration stats, corpora.

The cache is shared: by the processes of one machine, and on a cluster by the pods of a node.
Entries are therefore written under a name of their own and renamed into place, so a reader
never sees half an entry and two writers of the same entry never write into one file."""

import os
import shutil
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    """`$SELFPRUNER_CACHE`, else `$XDG_CACHE_HOME/selfpruner`, else `~/.cache/selfpruner`."""
    root = os.environ.get("SELFPRUNER_CACHE")
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
        root = os.path.join(xdg, "selfpruner")
    path = Path(root, *parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def partial_name(dest: Path) -> Path:
    """A temporary sibling of `dest` (same folder, so os.replace is atomic), unique to this call;
    hidden and ending in '.partial' so that no listing ever shows it."""
    return dest.with_name(f".{dest.name}.{os.getpid()}-{os.urandom(4).hex()}.partial")


def publish_dir(staging: Path, root: Path) -> None:
    """Move the completely written folder `staging` to `root` in one rename. `root` may be an
    empty placeholder (rename replaces it); where another process published a full `root`
    first, that copy stays and `staging` is removed."""
    try:
        staging.rename(root)
    except OSError:
        if not root.is_dir() or not any(root.iterdir()):
            raise
        shutil.rmtree(staging, ignore_errors=True)
