"""Where the project keeps host-local files when nobody says: the platform's per-user cache folder.

A command run from any folder must not scatter `work/cache/...` into it, so the default follows
the platform convention (`$XDG_CACHE_HOME/protein-pipeline` on Linux, `~/Library/Caches/...` on
macOS) and `$PROTEIN_CACHE_DIR` (or a command's `--cache-dir`) overrides it.
"""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

APP_NAME = "protein-pipeline"
CACHE_DIR_ENV = "PROTEIN_CACHE_DIR"


def default_cache_dir() -> Path:
    """$PROTEIN_CACHE_DIR, else the per-user cache folder of this platform."""
    configured = os.environ.get(CACHE_DIR_ENV)
    if configured:
        return Path(configured)
    return Path(platformdirs.user_cache_dir(APP_NAME, appauthor=False))
