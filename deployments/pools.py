"""Base job templates for GPU work pools on Kubernetes and Docker: `python -m deployments.pools
kubernetes|docker > template.json`, then `prefect work-pool create gpu --type kubernetes
--base-job-template template.json` (docs/runbook.md, "Production").

The templates are deployments/pools/{kubernetes,docker}.json: the integrations' defaults plus one
GPU per flow run (`nvidia.com/gpu: 1` on Kubernetes with a GPU node selector and toleration;
a device request on Docker). The image is filled in here from one setting, PROTEIN_WORKER_IMAGE,
which must be pinned (a tag other than `latest`, or a digest) so that every flow run of a deploy
runs the same code. The store's credentials are never in a template: on Kubernetes they come from
a Secret (`envFrom`, the `store_secret` variable), on Docker from the host's instance role; boto3's
standard chain reads either.

The worker image's entrypoint is `prefect worker start` (Dockerfile); a flow-run container runs
the deployments' command (`python -m prefect.engine`) instead, so the templates replace the entrypoint
with `/usr/bin/env`, which runs its arguments as the command.

Exit codes: 0 printed, 2 the image setting is missing or not pinned (one line on stderr).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

TEMPLATES = Path(__file__).resolve().parent / "pools"
KINDS = ("kubernetes", "docker")
IMAGE_SETTING = "PROTEIN_WORKER_IMAGE"
DIGEST = re.compile(r"^[a-z0-9][a-z0-9._/:-]*@sha256:[0-9a-f]{64}$")
TAGGED = re.compile(r"^[a-z0-9][a-z0-9._/:-]*:(?P<tag>[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})$")


class ImageSettingError(ValueError):
    pass


def worker_image(env: Mapping[str, str]) -> str:
    """The pinned worker image named by PROTEIN_WORKER_IMAGE."""
    image = env.get(IMAGE_SETTING, "").strip()
    if not image:
        raise ImageSettingError(f"{IMAGE_SETTING} is not set: name the worker image, e.g. "
                                "registry.example.com/protein-worker:1.4.0-cuda or ...@sha256:<digest>")
    if DIGEST.match(image):
        return image
    # A registry port ("host:5000/name") is not a tag: the tag follows the last "/".
    tagged = TAGGED.match(image)
    if tagged is None or "/" in tagged.group("tag") or ":" not in image.rsplit("/", 1)[-1]:
        raise ImageSettingError(f"{IMAGE_SETTING}={image!r} is not pinned: give a tag or @sha256: digest")
    if tagged.group("tag") == "latest":
        raise ImageSettingError(f"{IMAGE_SETTING}={image!r}: `latest` moves; pin a version tag or a digest")
    return image


def base_job_template(kind: str, image: str) -> dict[str, Any]:
    """The work pool's base job template with ``image`` as every flow run's default image."""
    if kind not in KINDS:
        raise ValueError(f"unknown work pool type {kind!r}; expected one of {', '.join(KINDS)}")
    template = json.loads((TEMPLATES / f"{kind}.json").read_text())
    template["variables"]["properties"]["image"]["default"] = image
    return template


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deployments.pools", description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=KINDS)
    args = parser.parse_args(argv)
    try:
        image = worker_image(os.environ)
    except ImageSettingError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    json.dump(base_job_template(args.kind, image), sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
