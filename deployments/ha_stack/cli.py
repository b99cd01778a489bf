"""`python -m deployments.ha_stack`: the operator's one-off block registration, or a demo stack."""

from __future__ import annotations

import os
import signal
import sys

from deployments.ha_stack.postgres import register_block_types, running_postgres
from deployments.ha_stack.stack import start_ha_prefect, stop_ha_prefect

USAGE = ("usage: python -m deployments.ha_stack [register-block-types]\n"
         "  no argument: stand a stack up here until Ctrl-C (a demo of the layout)\n"
         "  register-block-types: register Prefect's block types in the database of "
         "PREFECT_API_DATABASE_CONNECTION_URL, once, after `prefect server database upgrade`")


def main(argv: list[str] | None = None) -> int:
    """`python -m deployments.ha_stack`: stand the stack up here until Ctrl-C (a demo of the layout);
    `... register-block-types`: the one-off step before API processes that start with
    PREFECT_API_BLOCKS_REGISTER_ON_START=false (docs/runbook.md, "Production")."""
    argv = sys.argv[1:] if argv is None else argv
    if argv == ["register-block-types"]:
        if not os.environ.get("PREFECT_API_DATABASE_CONNECTION_URL"):
            print("PREFECT_API_DATABASE_CONNECTION_URL is not set: it names the database to register "
                  "the block types in", file=sys.stderr)
            return 2
        done = register_block_types(os.environ)
        if done.returncode != 0:  # one line, the error's own: the database URL (its password) stays out
            last = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
            print(f"registering Prefect's block types in PREFECT_API_DATABASE_CONNECTION_URL's database failed: "
                  f"{last}", file=sys.stderr)
            return 1
        return 0
    if argv:
        print(USAGE, file=sys.stderr)
        return 2
    with running_postgres() as pg:
        home = pg.root / "prefect-home"
        home.mkdir()
        base = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
        stack = start_ha_prefect(pg.root / "stack", pg, base, ui=True)
        print(f"PREFECT_API_URL={stack.api_url}  (UI: {stack.ui_url}); Ctrl-C stops it", flush=True)
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass
        finally:
            stop_ha_prefect(stack)
    return 0
