"""The worker image's pinned dependencies: requirements.lock for one variant of the image.

    python worker_lock.py cpu < requirements.lock > /tmp/worker.lock    (the Dockerfile does this)

requirements.lock (pip-compile from pyproject.toml, `make lock`) pins every library with its hashes.
The image installs exactly those (`pip install --require-hashes --no-deps`), so a GPU host runs the
versions the CPU host and CI tested, and two builds of one tag hold the same libraries. The CUDA
variant takes the lock whole: PyPI's Linux torch wheel and the CUDA libraries it needs are in it.
The CPU variant installs torch from PyTorch's CPU index first (other wheels, other hashes) and takes
the lock without torch, torchvision and the packages only the CUDA wheel needs (triton, nvidia-*,
cuda-*).

It runs in the image before the project is installed: the standard library only. Exit codes: 0
printed, 2 an unknown variant (one line on stderr).
"""

from __future__ import annotations

import re
import sys

VARIANTS = ("cpu", "cuda")
# Installed from PyTorch's CPU index by the CPU variant, or needed only by PyPI's CUDA torch wheel.
CPU_VARIANT_LEAVES_OUT = re.compile(r"^(torch|torchvision|triton|nvidia-[a-z0-9-]+|cuda-[a-z0-9-]+)==", re.IGNORECASE)


def lock_for_variant(lock: str, variant: str) -> str:
    """The lock's text for `variant`: each requirement with its indented hash and comment lines,
    dropped whole or kept whole."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, not {variant!r}")
    if variant == "cuda":
        return lock
    kept: list[str] = []
    keeping = True
    for line in lock.splitlines(keepends=True):
        if line[:1].isalnum():  # a requirement starts a block; its hashes and "# via" lines are indented
            keeping = not CPU_VARIANT_LEAVES_OUT.match(line)
        elif not line[:1].isspace():  # the header's comments and blank lines
            keeping = True
        if keeping:
            kept.append(line)
    return "".join(kept)


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in VARIANTS:
        print(f"error: give the image variant, one of {', '.join(VARIANTS)} (got {' '.join(argv) or 'nothing'})",
              file=sys.stderr)
        return 2
    sys.stdout.write(lock_for_variant(sys.stdin.read(), argv[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
