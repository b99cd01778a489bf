"""Register the deployments after checking their settings: `python -m deployments.deploy`.

`prefect deploy` leaves an unset `{{ $VAR }}` as the literal placeholder, so a missing store or
data URI would only surface when the nightly run starts at 02:00. This checks every setting
first, names the one that is missing, pins the code to a commit workers can clone, makes sure
both work pools exist (the gpu pool with one concurrency slot per GPU), then runs
`prefect deploy --all` with deployments/prefect.yaml.

Settings (environment variables of the deploying shell):
  PROTEIN_REPOSITORY  git URL the workers clone the code from (required)
  PROTEIN_COMMIT      commit or tag to run; default: HEAD of this checkout, which must be clean
  PROTEIN_STORE       s3://bucket/prefix of the store every host shares (required)
  PROTEIN_DATA        dataset URI for the nightly run, s3://... (required)
  PROTEIN_GPU_SLOTS   GPUs across all gpu-pool workers = gpu pool concurrency (default 1)
Exit codes: 0 deployed, 2 a setting is missing or invalid, 1 `prefect` itself failed.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PREFECT_FILE = REPO / "deployments" / "prefect.yaml"
POOLS = ("cpu", "gpu")
SHA = re.compile(r"^[0-9a-f]{40}$")
REQUIRED = {
    "PROTEIN_REPOSITORY": "the git URL workers clone the code from, e.g. https://github.com/you/protein-pipeline.git",
    "PROTEIN_STORE": "the store every host shares, e.g. s3://bucket/prefix",
    "PROTEIN_DATA": "the dataset the nightly run trains on, e.g. s3://bucket/prefix/datasets/<fingerprint>/",
}


class SettingError(Exception):
    """A deploy-time setting is missing or unusable; the message names it."""


@dataclass(frozen=True)
class DeploySettings:
    repository: str
    commit: str
    store: str
    data: str
    gpu_slots: int

    def env(self) -> dict[str, str]:
        """What prefect.yaml's {{ $VAR }} placeholders read."""
        return {"PROTEIN_REPOSITORY": self.repository, "PROTEIN_COMMIT": self.commit, "PROTEIN_STORE": self.store,
                "PROTEIN_DATA": self.data}


def check_settings(env: Mapping[str, str], head: str | None) -> DeploySettings:
    """Pure: the settings from `env`, or SettingError naming the first bad one. `head` is the
    clean HEAD commit of the deploying checkout (None when dirty or not a git checkout)."""
    values = {}
    for name, meaning in REQUIRED.items():
        value = env.get(name, "").strip()
        if not value or "{{" in value:
            raise SettingError(f"{name} is not set: {meaning}")
        values[name] = value
    for name in ("PROTEIN_STORE", "PROTEIN_DATA"):
        value = values[name]
        if "://" not in value and not Path(value).is_absolute():
            raise SettingError(f"{name}={value!r} is a relative path, which means another folder on every host; "
                               "use an s3:// URI (or an absolute path that exists on every worker)")
    commit = env.get("PROTEIN_COMMIT", "").strip() or head
    if not commit:
        raise SettingError("PROTEIN_COMMIT is not set and this checkout has uncommitted changes (or is not a git "
                           "checkout): commit and push, or set PROTEIN_COMMIT to a pushed commit")
    if not SHA.match(commit):
        raise SettingError(f"PROTEIN_COMMIT={commit!r} is not a full 40-hex commit sha; "
                           "resolve a tag with `git rev-parse TAG^{commit}`")
    slots = env.get("PROTEIN_GPU_SLOTS", "1").strip()
    if not slots.isdigit() or int(slots) < 1:
        raise SettingError(f"PROTEIN_GPU_SLOTS={slots!r} must be a whole number >= 1 (GPUs across gpu-pool workers)")
    return DeploySettings(values["PROTEIN_REPOSITORY"], commit, values["PROTEIN_STORE"], values["PROTEIN_DATA"],
                          int(slots))


def clean_head(repo: Path) -> str | None:
    """HEAD's sha when the checkout has no uncommitted changes to tracked files, else None:
    workers clone the commit, so uncommitted edits would silently not run."""
    try:
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo, check=True,
                               capture_output=True, text=True).stdout.strip()
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, check=True, capture_output=True,
                              text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return None if dirty else head


def prefect(*args: str, env: Mapping[str, str], check: bool = True) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).parent / "prefect"
    return subprocess.run([str(exe), *args], cwd=REPO, env=dict(env), check=check, capture_output=True, text=True)


def ensure_pools(env: Mapping[str, str], gpu_slots: int) -> None:
    """Process pools for both hosts; the gpu pool queues train runs on the server, one slot per GPU."""
    for pool in POOLS:
        if prefect("work-pool", "inspect", pool, env=env, check=False).returncode != 0:
            prefect("work-pool", "create", pool, "--type", "process", env=env)
    prefect("work-pool", "update", "gpu", "--concurrency-limit", str(gpu_slots), env=env)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deployments.deploy", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.parse_args(argv)
    try:
        settings = check_settings(os.environ, clean_head(REPO))
    except SettingError as exc:
        print(f"deploy: {exc}", file=sys.stderr)
        return 2
    env = {**os.environ, **settings.env(), "PREFECT_CLI_PROMPT": "false"}
    try:
        ensure_pools(env, settings.gpu_slots)
        prefect("--no-prompt", "deploy", "--all", "--prefect-file", str(PREFECT_FILE), env=env)
    except subprocess.CalledProcessError as exc:
        output = (exc.stderr or exc.stdout or "").strip().splitlines()
        print(f"deploy: `prefect {' '.join(exc.cmd[1:3])}` failed: {output[-1] if output else exc.returncode}",
              file=sys.stderr)
        return 1
    print(f"deployed {settings.repository}@{settings.commit[:12]} (store {settings.store}, data {settings.data}, "
          f"{settings.gpu_slots} gpu slot(s))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
