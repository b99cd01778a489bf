"""Where the project keeps things when nobody says: the store, and host-local files in the
platform's per-user cache folder.

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
STORE_ENV = "PROTEIN_STORE"
DEFAULT_STORE = "work/store"


def default_store_uri() -> str:
    """$PROTEIN_STORE, else work/store under the current folder (the demo's store). Kept free of
    heavy imports: every `protein` command and flow module reads it to build its defaults."""
    return os.environ.get(STORE_ENV, DEFAULT_STORE)


def default_cache_dir() -> Path:
    """$PROTEIN_CACHE_DIR, else the per-user cache folder of this platform."""
    configured = os.environ.get(CACHE_DIR_ENV)
    if configured:
        return Path(configured)
    return Path(platformdirs.user_cache_dir(APP_NAME, appauthor=False))
