"""Where selfpruner keeps things it can rebuild: converted models, calibration stats, corpora.

The cache is shared: by the processes of one machine, and on a cluster by the pods of a node.
Entries are therefore written under a name of their own and renamed into place, so a reader
never sees half an entry and two writers of the same entry never write into one file."""

import os
import shutil
import tempfile
from pathlib import Path

from .errors import UserError


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


def check_writable(path: str | Path, what: str, *, folder: bool) -> Path:
    """Refuse, in one line, an output that cannot be written, before the work that would fill it:
    `path` is to be a folder (`folder=True`) or a file, written next to its parent and renamed
    into place. The nearest existing parent must be a folder this process can create entries in;
    a probe folder proves it (made and removed at once: permissions alone do not tell for root,
    a read-only mount or /proc). Nothing is left behind."""
    out = Path(path).expanduser()
    if out.is_dir() and not folder:
        raise UserError(f"{what} {out} is a folder; give a file name")
    if out.exists() and not out.is_dir() and folder:
        raise UserError(f"{what} {out} is a file; give a folder")
    parent = out.parent
    try:
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
    except OSError as e:
        raise UserError(f"{what} {out} cannot be written: {e.strerror or e}") from None
    if not parent.is_dir():
        raise UserError(f"{what} {out}: {parent} is a file, not a folder; give a path in a folder")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".selfpruner-probe-", dir=parent))
    except OSError as e:
        raise UserError(f"{what} {out} cannot be written: nothing can be created in {parent} "
                        f"({e.strerror or e})") from None
    return out


def check_output_folder(path: str | Path, *, force: bool = False, what: str = "output") -> Path:
    """A folder to write a result into: absent, empty, or (with `force`) to be replaced; and writable."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise UserError(f"{what} {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UserError(f"{what} folder {out} is not empty; choose another or pass --force to replace it")
    return check_writable(out, what, folder=True)
