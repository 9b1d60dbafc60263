"""Where selfpruner keeps things it can rebuild: converted models, calibration stats."""

import os
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
