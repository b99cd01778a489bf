"""Apply deployments/automations.yaml and the notification webhook block to a Prefect server.

    PREFECT_API_URL=http://prefect:4200/api PROTEIN_ALERT_WEBHOOK_URL=https://hooks.example/T0 \\
        python -m deployments.automations apply

Idempotent: the block is saved with overwrite, an automation the file defines as it stands is
kept (its trigger's state with it), a changed one replaces the one of the same name, and a
`protein-` automation the file no longer has, or a second of one name, is deleted. Exit 2 on a missing setting
or a malformed file, 1 when the server refuses."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

AUTOMATIONS_FILE = Path(__file__).with_name("automations.yaml")
WEBHOOK_URL_ENV = "PROTEIN_ALERT_WEBHOOK_URL"
BLOCK_NAME = "protein-alerts"
ZOMBIE_AUTOMATION = "protein-crash-zombie-runs"
# The project's automations, every one named so: apply removes one of them the file no longer has.
OWN_PREFIX = "protein-"
# Automations read a request when apply looks for the stale ones (the server's own default limit).
AUTOMATIONS_PAGE = 200

# PREFECT_FLOWS_HEARTBEAT_FREQUENCY in prefect.yaml's job env (a test checks they agree): the zombie
# automation's window must hold three of them, so one missed heartbeat (a gap of two periods) and a
# late one after it never crash a healthy run.
HEARTBEAT_FREQUENCY_S = 30
ZOMBIE_AFTER_MIN_S = 3 * HEARTBEAT_FREQUENCY_S

def load_automations(path: Path, block_ids: dict[str, str], zombie_after_s: int | None = None) -> list[Any]:
    """Parse the file into Prefect Automation objects, each send-notification action's
    `block: <name>` replaced by the block's id. Pure apart from reading the file."""
    import yaml
    from prefect.events.schemas.automations import AutomationCore

    docs = (yaml.safe_load(path.read_text()) or {}).get("automations")
    if not isinstance(docs, list) or not docs:
        raise ValueError(f"{path}: expected a non-empty list under 'automations'")
    automations = []
    for doc in docs:
        if not str(doc.get("name", "")).startswith(OWN_PREFIX):  # apply prunes the project's by this prefix
            raise ValueError(f"{path}: automation {doc.get('name')!r}: the project's automation names start "
                             f"with {OWN_PREFIX!r}")
        for action in doc.get("actions", []):
            if action.get("type") == "send-notification":
                name = action.pop("block", None)
                if name not in block_ids:
                    raise ValueError(f"{path}: automation {doc.get('name')!r}: unknown notification block {name!r}")
                action["block_document_id"] = block_ids[name]
        if zombie_after_s is not None and doc.get("name") == ZOMBIE_AUTOMATION:
            doc["trigger"]["within"] = zombie_after_s
        automations.append(AutomationCore.model_validate(doc))
    return automations


def save_webhook_block(url: str) -> str:
    """The notification block every automation posts to; returns its id. The JSON body has
    `subject` and `text` so Slack/Teams-style incoming webhooks show it as is."""
    from prefect.blocks.notifications import CustomWebhookNotificationBlock

    # The URL usually carries a token: it goes in the block's secrets (shown obfuscated by the API
    # and the UI), and the url field only names it.
    block = CustomWebhookNotificationBlock(name=BLOCK_NAME, url="{{webhook_url}}", secrets={"webhook_url": url},
                                           method="POST", json_data={"subject": "{{subject}}", "text": "{{body}}"})
    return str(block.save(BLOCK_NAME, overwrite=True))


def server_automations(client: Any, page: int) -> list[Any]:
    """Every automation on the server, page after page (the server answers at most its default
    limit, 200, a request), in name order so that the pages neither overlap nor skip."""
    from prefect.client.schemas.sorting import AutomationSort

    if page < 1:
        raise ValueError(f"automations are read in pages of at least one, got {page}")
    found: list[Any] = []
    while True:
        batch = client.read_automations(sort=AutomationSort.NAME_ASC, limit=page, offset=len(found))
        found += batch
        if len(batch) < page:
            return found


def apply(path: Path, webhook_url: str, zombie_after_s: int | None = None, page: int = AUTOMATIONS_PAGE) -> list[str]:
    """Save the webhook block, keep each automation that stands as defined and create or replace the
    others by name, and delete the project's automations (OWN_PREFIX) the file no longer has and
    every second one of a name, on every page of the server's automations."""
    from prefect.client.orchestration import get_client

    block_id = save_webhook_block(webhook_url)
    automations = load_automations(path, {BLOCK_NAME: block_id}, zombie_after_s)
    names = {a.name for a in automations}
    with get_client(sync_client=True) as client:
        for automation in automations:
            existing = client.read_automations_by_name(automation.name)
            if len(existing) == 1 and definition(existing[0]) == definition(automation):
                # Unchanged: kept as it is. Replaced, it lost its trigger's state: the missing-nightly
                # window started again (a deploy a day and it never fired) and the zombie watch forgot
                # the runs that had just stopped heartbeating.
                continue
            for old in existing:
                client.delete_automation(old.id)
            client.create_automation(automation)
        # One the file no longer has (renamed or removed) would go on firing for ever: a renamed
        # failure alert would alert every failure twice. So would a second of one name (two deploys at
        # once each deleted, then each created): one is kept, the same one whichever apply decides
        # (the smallest id), so two applies at once never delete each other's and leave none. Only the
        # project's own, by their prefix.
        found: dict[str, list[Any]] = {}
        for existing in server_automations(client, page):  # all read before the first delete shifts the pages
            if existing.name.startswith(OWN_PREFIX):
                found.setdefault(existing.name, []).append(existing)
        for name, same_name in found.items():
            kept = min(same_name, key=lambda a: str(a.id)) if name in names else None
            for existing in same_name:
                if existing is not kept:
                    client.delete_automation(existing.id)
    return [a.name for a in automations]


def definition(automation: Any) -> Any:
    """What an automation does: its fields as the file defines them, without the ids the server and
    Prefect's models assign (the automation's, its triggers')."""
    from prefect.events.schemas.automations import AutomationCore

    def without_ids(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: without_ids(v) for k, v in value.items() if k != "id"}
        if isinstance(value, list):
            return [without_ids(v) for v in value]
        return value

    return without_ids(automation.model_dump(mode="json", include=set(AutomationCore.model_fields)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deployments.automations", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("apply", help="save the webhook block and create, keep or replace the automations")
    p.add_argument("--file", type=Path, default=AUTOMATIONS_FILE)
    p.add_argument("--webhook-url", default=os.environ.get(WEBHOOK_URL_ENV),
                   help=f"where notifications are POSTed (env {WEBHOOK_URL_ENV})")
    p.add_argument("--zombie-after-s", type=int, help="override the zombie window (seconds without heartbeat)")
    args = parser.parse_args(argv)
    if not args.webhook_url:
        print(f"automations: error: set {WEBHOOK_URL_ENV} or --webhook-url", file=sys.stderr)
        return 2
    if args.zombie_after_s is not None and args.zombie_after_s < ZOMBIE_AFTER_MIN_S:
        # 0 became Prefect's 10 s: every healthy run Crashed between two heartbeats, and paged.
        print(f"automations: error: --zombie-after-s {args.zombie_after_s} must be >= {ZOMBIE_AFTER_MIN_S}: flow runs "
              f"send a heartbeat every {HEARTBEAT_FREQUENCY_S} s (prefect.yaml), and a shorter window crashes "
              f"healthy runs", file=sys.stderr)
        return 2
    if not os.environ.get("PREFECT_API_URL"):
        print("automations: error: set PREFECT_API_URL to the Prefect server's API", file=sys.stderr)
        return 2
    try:
        names = apply(args.file, args.webhook_url, args.zombie_after_s)
    except (OSError, ValueError) as exc:  # a pydantic ValidationError is a ValueError
        print(f"automations: error: {exc}".splitlines()[0], file=sys.stderr)
        return 2
    except Exception as exc:  # the server refused or is unreachable: one line, no traceback
        print(f"automations: error: {type(exc).__name__}: {exc}".splitlines()[0], file=sys.stderr)
        return 1
    print(f"applied {len(names)} automations ({', '.join(names)}) and webhook block {BLOCK_NAME}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
