"""Register the deployments after checking what they need: `python -m deployments.deploy [--check]`.

`prefect deploy` leaves an unset `{{ $VAR }}` as the literal placeholder, and a wrong repository,
an unpushed commit, an empty dataset channel or a store without conditional writes would only
surface when the nightly run starts at 02:00. This checks each first, naming the one that fails:
the settings; the repository answers `git ls-remote` and has the commit; the store answers and
honours conditional writes; every deployment's `data` (a dataset channel) resolves to a dataset
that opens. Then it creates the work pools (the gpu pool with one concurrency slot per GPU), runs
`prefect deploy --all` with deployments/prefect.yaml, applies deployments/automations.yaml (the
alerts and the zombie-run detection) with the webhook block, and checks what the server now holds
(no literal placeholder).

  --check   run the checks and print what would be deployed; change nothing
  --verify  only check the deployments the server holds (after a plain `prefect deploy`)

Settings (environment variables of the deploying shell):
  PROTEIN_REPOSITORY         git URL the workers clone the code from (required)
  PROTEIN_COMMIT             commit to run: this checkout's HEAD, its code folders unedited (default: HEAD,
                             which must be clean)
  PROTEIN_STORE              s3://bucket/prefix of the store every host shares (required)
  PROTEIN_ALERT_WEBHOOK_URL  where the automations' notifications are POSTed (required)
  PROTEIN_GPU_SLOTS          GPUs across all gpu-pool workers = gpu pool concurrency (default 1)
  PROTEIN_ZOMBIE_AFTER_S     seconds without heartbeat before a run is crashed, >= 90 (default: the file's)
Exit codes: 0 deployed (or checked), 2 a setting or check failed, 1 `prefect` itself failed.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from deployments.automations import AUTOMATIONS_FILE, BLOCK_NAME, HEARTBEAT_FREQUENCY_S, ZOMBIE_AFTER_MIN_S, apply
from deployments.checks import SettingError, check_data, check_registered, check_repository, check_store, git

if TYPE_CHECKING:
    from prefect.client.schemas.actions import WorkPoolCreate

REPO = Path(__file__).resolve().parents[1]
PREFECT_FILE = REPO / "deployments" / "prefect.yaml"
POOLS = ("cpu", "gpu")
SHA = re.compile(r"^[0-9a-f]{40}$")
# git's scp-like form, host:path with an optional user@ (git@github.com:you/p.git, or an ssh-config
# alias: gh:you/p.git): a colon before any slash. A user holding a colon is a user:token.
SCP_LIKE = re.compile(r"^(?:[^/:@]+@)?[^/:@]+:(?!//)")
SCP_CREDENTIALS = re.compile(r"^[^/@]*:[^/@]*@")
REQUIRED = {
    "PROTEIN_REPOSITORY": "the git URL workers clone the code from, e.g. https://github.com/you/protein-pipeline.git",
    "PROTEIN_STORE": "the store every host shares, e.g. s3://bucket/prefix",
    "PROTEIN_ALERT_WEBHOOK_URL": "where alerts (failed, crashed, cancelled runs; promotions) are POSTed, "
                                 "e.g. https://hooks.slack.com/services/...",
}


@dataclass(frozen=True)
class DeploySettings:
    repository: str
    commit: str
    store: str
    webhook_url: str
    gpu_slots: int
    zombie_after_s: int | None = None

    def env(self) -> dict[str, str]:
        """What prefect.yaml's {{ $VAR }} placeholders read."""
        return {"PROTEIN_REPOSITORY": self.repository, "PROTEIN_COMMIT": self.commit, "PROTEIN_STORE": self.store}


def check_settings(env: Mapping[str, str], head: str | None) -> DeploySettings:
    """Pure: the settings from `env`, or SettingError naming the first bad one. `head` is the
    clean HEAD commit of the deploying checkout (None when dirty or not a git checkout)."""
    values = {}
    for name, meaning in REQUIRED.items():
        value = env.get(name, "").strip()
        if not value or "{{" in value:
            raise SettingError(f"{name} is not set: {meaning}")
        values[name] = value
    for name in ("PROTEIN_STORE",):
        value = values[name]
        if "://" not in value and not Path(value).is_absolute():
            raise SettingError(f"{name}={value!r} is a relative path, which means another folder on every host; "
                               "use an s3:// URI (or an absolute path that exists on every worker)")
    check_repository_url(values["PROTEIN_REPOSITORY"])
    check_webhook_url(values["PROTEIN_ALERT_WEBHOOK_URL"])
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
    zombie = env.get("PROTEIN_ZOMBIE_AFTER_S", "").strip()
    if zombie and (not zombie.isdigit() or int(zombie) < ZOMBIE_AFTER_MIN_S):
        raise SettingError(f"PROTEIN_ZOMBIE_AFTER_S={zombie!r} must be a whole number of seconds >= "
                           f"{ZOMBIE_AFTER_MIN_S}: flow runs send a heartbeat every {HEARTBEAT_FREQUENCY_S} s "
                           f"(prefect.yaml), and a window shorter than three of them crashes a healthy run "
                           f"that misses one")
    return DeploySettings(values["PROTEIN_REPOSITORY"], commit, values["PROTEIN_STORE"],
                          values["PROTEIN_ALERT_WEBHOOK_URL"], int(slots), int(zombie) if zombie else None)


def check_repository_url(repository: str) -> None:
    """SettingError for a repository URL that workers on other hosts could not clone as meant (a
    relative path is another folder on every host) or that holds credentials: the URL is printed
    and stored in every deployment's pull step on the server. The error never repeats the URL."""
    if "://" in repository:
        try:
            parts = urlsplit(repository)
            parts.port  # noqa: B018 - parsed on access: a malformed one raises here, not in git at 02:00
        except ValueError:
            raise SettingError("PROTEIN_REPOSITORY is not a URL git can read (a malformed host or port)") from None
        credentials = parts.password is not None or (parts.username is not None and parts.scheme in ("http", "https"))
    else:
        credentials = SCP_CREDENTIALS.match(repository) is not None
    if credentials:
        raise SettingError("PROTEIN_REPOSITORY holds credentials before its host (user:token@): they would be "
                           "printed and stored in every deployment on the Prefect server; give the workers a "
                           "git credential helper or a deploy key instead")
    if "://" not in repository and not SCP_LIKE.match(repository) and not Path(repository).is_absolute():
        raise SettingError(f"PROTEIN_REPOSITORY={repository!r} is a relative path, which every worker would clone "
                           "from its own working folder; use the git URL workers reach (https://, ssh://, "
                           "git@host:path) or an absolute path that exists on every worker")


def check_webhook_url(url: str) -> None:
    """SettingError for a webhook URL every alert would fail on (no http(s) scheme or no host). The
    error never repeats the URL: an incoming-webhook URL is itself a secret."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - parsed on access
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise SettingError("PROTEIN_ALERT_WEBHOOK_URL is not an http:// or https:// URL with a host; every "
                           "alert would fail to send")


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


# The folders whose modules `prefect deploy` imports from this checkout (the flows and what they
# import) to register each flow's parameter schema.
CODE_FOLDERS = ("protein", "tasks", "flows", "deployments")


def check_checkout_is(commit: str, repo: Path) -> None:
    """SettingError unless the code `prefect deploy` loads here is ``commit``'s: it imports the
    flows of this checkout and registers their parameter schemas, and reads its deployment and
    automation definitions, while the workers run the clone of ``commit``. So HEAD must be
    ``commit``, and the code folders must hold exactly the commit: a file edited since (a renamed
    parameter, another prefect.yaml) is registered here and refused or mis-run at 02:00, and an
    untracked module that committed code imports deploys fine here while every worker run fails
    with ImportError."""
    try:
        head = git("rev-parse", "HEAD", cwd=repo)
        untracked = git("ls-files", "-z", "--others", "--exclude-standard", "--", *CODE_FOLDERS, cwd=repo)
        changed = git("diff", "--name-only", "-z", "HEAD", "--", *CODE_FOLDERS, cwd=repo)  # staged or not
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SettingError(f"{repo}: git failed ({exc}); deploy from a git checkout of PROTEIN_COMMIT") from None
    if head.returncode != 0 or untracked.returncode != 0 or changed.returncode != 0:
        raise SettingError(f"{repo} is not a git checkout; deploy from a checkout of PROTEIN_COMMIT={commit[:12]}")
    if head.stdout.strip() != commit:
        raise SettingError(f"PROTEIN_COMMIT={commit[:12]} is not this checkout's HEAD ({head.stdout.strip()[:12]}): "
                           "`prefect deploy` registers the flows of the checkout it runs in; check out the commit, "
                           "or leave PROTEIN_COMMIT unset to deploy HEAD")
    if files := first_of(changed.stdout):
        raise SettingError(f"{files} has changes not committed in {commit[:12]}: `prefect deploy` would "
                           "register this checkout's version, while workers run the commit's; commit and push them "
                           "and deploy that commit, or stash them")
    if files := first_of(untracked.stdout):
        raise SettingError(f"{files} is untracked in this checkout: `prefect deploy` would import it here, "
                           f"but workers clone {commit[:12]} without it; commit and push it, or remove it")


def first_of(listing: str) -> str:
    """The first path of git's NUL-separated ``listing`` and how many more ("" for none)."""
    files = [name for name in listing.split("\0") if name]
    if not files:
        return ""
    return files[0] + (f" (and {len(files) - 1} more)" if len(files) > 1 else "")


def prefect(*args: str, env: Mapping[str, str], check: bool = True) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).parent / "prefect"
    return subprocess.run([str(exe), *args], cwd=REPO, env=dict(env), check=check, capture_output=True, text=True)


def missing_pools() -> list[str]:
    """Pools the server does not have (read through the API: one `prefect` process each costs seconds)."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    missing = []
    with get_client(sync_client=True) as client:
        for pool in POOLS:
            try:
                client.read_work_pool(pool)
            except ObjectNotFound:
                missing.append(pool)
    return missing


def process_pool(name: str) -> WorkPoolCreate:
    """The WorkPoolCreate of a process pool, with the base job template `prefect work-pool create
    --type process` would fill in (ProcessWorker's default)."""
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.workers.process import ProcessWorker

    return WorkPoolCreate(name=name, type="process", base_job_template=ProcessWorker.get_default_base_job_template())


def ensure_pools(gpu_slots: int) -> None:
    """Process pools for both hosts; the gpu pool queues train runs on the server, one slot per GPU."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolUpdate
    from prefect.exceptions import ObjectAlreadyExists

    # Through the API: a `prefect work-pool create` process per pool costs 2.5 s of start-up.
    missing = missing_pools()
    with get_client(sync_client=True) as client:
        for pool in missing:
            # Another deploy may have created it meanwhile: the same pool, as the check below sees.
            with contextlib.suppress(ObjectAlreadyExists):
                client.create_work_pool(process_pool(pool))
        if still := missing_pools():
            raise SettingError(f"work pool(s) {', '.join(still)} do not exist on the server after creating them")
        client.update_work_pool("gpu", WorkPoolUpdate(concurrency_limit=gpu_slots))


def planned_deployments() -> list[dict[str, Any]]:
    import yaml

    return list(yaml.safe_load(PREFECT_FILE.read_text())["deployments"])


def preflight(settings: DeploySettings) -> list[str]:
    """Every check that needs no Prefect server; SettingError on the first that fails."""
    found = [check_repository(settings.repository, settings.commit, REPO), check_store(settings.store)]
    for name, data in sorted({(f"{d['entrypoint'].rsplit(':', 1)[1]}/{d['name']}", d["parameters"]["data"])
                              for d in planned_deployments() if "data" in d.get("parameters", {})}):
        found.append(check_data(data, settings.store, name))
    return found


def plan(settings: DeploySettings, env: Mapping[str, str]) -> list[str]:
    """What a deploy would register, for --check."""
    lines = [f"would deploy {settings.repository}@{settings.commit} with store {settings.store}"]
    for d in planned_deployments():
        params = {k: v for k, v in d.get("parameters", {}).items() if k != "store"}
        extra = [f"pool {d['work_pool']['name']}"]
        if d.get("schedules"):
            extra.append("schedule " + ", ".join(f"{s['cron']} {s['timezone']}" for s in d["schedules"]))
        if d.get("triggers"):
            extra.append("triggered by " + ", ".join(e for t in d["triggers"] for e in t["expect"]))
        if d.get("concurrency_limit"):
            limit = d["concurrency_limit"]
            extra.append(f"concurrency {limit['limit']} ({limit['collision_strategy']})")
        lines.append(f"  {d['entrypoint'].rsplit(':', 1)[1]}/{d['name']}: {d['entrypoint']} {params} "
                     f"[{'; '.join(extra)}]")
    missing = missing_pools()
    lines.append(f"  work pools: {', '.join(POOLS)}" + (f" ({', '.join(missing)} to be created)" if missing else "")
                 + f"; gpu concurrency {settings.gpu_slots}")
    lines.append(f"  automations from {AUTOMATIONS_FILE.name}, notifications to the webhook in "
                 "PROTEIN_ALERT_WEBHOOK_URL")
    return lines


def apply_automations(settings: DeploySettings) -> str:
    try:
        names = apply(AUTOMATIONS_FILE, settings.webhook_url, settings.zombie_after_s)
    except Exception as exc:  # the server refused: one line, as `python -m deployments.automations` says it
        raise subprocess.CalledProcessError(1, ["automations", "apply"], "", f"{type(exc).__name__}: {exc}") from None
    return f"applied {len(names)} automations ({', '.join(names)}) and webhook block {BLOCK_NAME}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deployments.deploy", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="run the checks, print the plan, change nothing")
    mode.add_argument("--verify", action="store_true",
                      help="only check that the server's deployments exist and hold no literal {{ $VAR }}")
    args = parser.parse_args(argv)
    try:
        if args.verify:
            names = check_registered(PREFECT_FILE)
            print(f"verified {len(names)} deployments: no literal placeholder ({', '.join(names)})")
            return 0
        settings = check_settings(os.environ, clean_head(REPO))
        check_checkout_is(settings.commit, REPO)
        env = {**os.environ, **settings.env(), "PREFECT_CLI_PROMPT": "false"}
        found = preflight(settings)
        if args.check:
            print("\n".join([*(f"ok: {line}" for line in found), *plan(settings, env)]))
            return 0
        ensure_pools(settings.gpu_slots)
        prefect("--no-prompt", "deploy", "--all", "--prefect-file", str(PREFECT_FILE), env=env)
        applied = apply_automations(settings)
        check_registered(PREFECT_FILE)
    except SettingError as exc:
        print(f"deploy: {exc}", file=sys.stderr)
        return 2
    except subprocess.CalledProcessError as exc:
        output = (exc.stderr or exc.stdout or "").strip().splitlines()
        step = "automations apply" if exc.cmd[0] == "automations" else f"prefect {' '.join(exc.cmd[1:3])}"
        print(f"deploy: `{step}` failed: {output[-1] if output else exc.returncode}", file=sys.stderr)
        return 1
    except Exception as exc:  # the Prefect API (pools, deployments) unreachable or refusing: one line
        print(f"deploy: the Prefect API failed: {type(exc).__name__}: {exc}".splitlines()[0], file=sys.stderr)
        return 1
    print(f"deployed {settings.repository}@{settings.commit[:12]} (store {settings.store}, "
          f"{settings.gpu_slots} gpu slot(s)); {applied}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
