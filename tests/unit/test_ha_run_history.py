"""deployments/ha_stack/stack.py: the production server deletes old runs, not only old events."""

from __future__ import annotations

import datetime as dt

import pytest

from deployments.ha_stack.stack import run_history_retention


def test_the_services_process_vacuums_finished_runs_after_the_kept_days(monkeypatch: pytest.MonkeyPatch) -> None:
    """Read back as Prefect reads its settings: a misspelt name or value would leave its default
    (events only), and every retrain's runs, logs and artifacts would stay in the database."""
    from prefect.settings import Settings

    # Not Prefect's default of 90 days: a retention setting it ignored would still read as that.
    for name, value in run_history_retention(days=30).items():
        monkeypatch.setenv(name, value)
    vacuum = Settings().server.services.db_vacuum
    assert {"events", "flow_runs"} <= vacuum.enabled_vacuum_types
    assert vacuum.retention_period == dt.timedelta(days=30)
