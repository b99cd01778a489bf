"""deployments/ha_stack/stack.py: the production server deletes old runs, not only old events."""

from __future__ import annotations

import datetime as dt

import pytest

from deployments.ha_stack.stack import RUN_HISTORY_KEPT_DAYS, run_history_retention, server_env


def vacuum_settings(env: dict[str, str], monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """The database vacuum's settings as Prefect reads them from ``env``."""
    from prefect.settings import Settings

    for name, value in env.items():
        if name.startswith("PREFECT_SERVER_SERVICES_DB_VACUUM_"):
            monkeypatch.setenv(name, value)
    return Settings().server.services.db_vacuum


def test_the_server_processes_vacuum_finished_runs_after_the_kept_days(monkeypatch: pytest.MonkeyPatch) -> None:
    """Read back as Prefect reads its settings from the environment every server process of the stack
    gets: without them (a line lost from that environment, a misspelt name or value) Prefect keeps its
    default, events only, and every retrain's runs, logs and artifacts stay in the database."""
    env = server_env({"PREFECT_API_URL": "http://client/api"}, "postgresql+asyncpg://db/prefect", 6379, False)
    vacuum = vacuum_settings(env, monkeypatch)
    assert {"events", "flow_runs"} <= vacuum.enabled_vacuum_types
    assert vacuum.retention_period == dt.timedelta(days=RUN_HISTORY_KEPT_DAYS)
    assert "PREFECT_API_URL" not in env  # the client's setting, not a server's


def test_the_kept_days_setting_is_one_prefect_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    # Not Prefect's default of 90 days: a retention setting it ignored would still read as that.
    vacuum = vacuum_settings(run_history_retention(days=30), monkeypatch)
    assert vacuum.retention_period == dt.timedelta(days=30)
