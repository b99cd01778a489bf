"""The Prefect UI as a user meets it, in a real headless Chromium (Debian's `chromium`, driven by
Playwright's Python package; nothing downloads a browser): open the retrain/nightly deployment,
start a custom run with a changed parameter from the run form, let the worker run it, and find
the gate decision, the per-class table and the finished training progress on the run's page.
Screenshots go to the test's temp dir; their paths are printed."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import pytest

from protein.labels import LABELS
from tests.integration.prefect_stack import Stack

pytestmark = pytest.mark.integration

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]
UI_TIMEOUT_MS = 120_000
CUSTOM_EPOCHS = 2


# Where a page's own content is drawn (right of the sidebar, above its dotted background): one
# flat colour when only the sidebar was rendered, text and panels when the page was.
CONTENT_BOX = (300, 0, 1400, 500)
MIN_CONTENT_STD = 8.0  # grey levels; a blank area measures ~0, a rendered page's text and panels tens
RENDER_WAIT_S = 30.0


def content_std(path: Path) -> float:
    """Spread of grey levels over CONTENT_BOX of a screenshot."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as image:
        return float(np.asarray(image.convert("L").crop(CONTENT_BOX), dtype=np.float64).std())


def form_input(page: Any, label: str) -> Any:
    """The input of the run form's property whose label starts with ``label`` (the innermost
    one: nested models such as `train` contain their fields' labels too)."""
    label_re = re.compile(rf"^{re.escape(label)}( \(Optional\))?$")
    prop = page.locator(".schema-form-property", has=page.locator(".schema-form-property__label", has_text=label_re))
    return prop.last.locator("input").first


def test_start_retrain_from_the_ui_and_see_its_artifacts(prefect_stack: Stack, tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    stack = prefect_stack
    shots: list[Path] = []
    with stack.client() as client:
        nightly = client.read_deployment_by_name("retrain/nightly")
    started = time.time()

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(UI_TIMEOUT_MS)

            def shot(name: str) -> None:
                # The text a step waited for can be in the page before the page is painted (a route
                # transition): retake until the content area shows something, within a deadline.
                path = tmp_path / f"{name}.png"
                deadline = time.monotonic() + RENDER_WAIT_S
                while True:
                    page.screenshot(path=str(path), full_page=True)
                    if content_std(path) > MIN_CONTENT_STD:
                        break
                    assert time.monotonic() < deadline, (
                        f"{name}: the screenshot's content area is blank (grey-level spread "
                        f"{content_std(path):.1f} <= {MIN_CONTENT_STD}) after {RENDER_WAIT_S:.0f}s")
                    page.wait_for_timeout(500)
                shots.append(path)

            # The deployment page, as reached from Deployments.
            page.goto(f"{stack.ui_url}/deployments", wait_until="networkidle")
            page.get_by_role("link", name="nightly").first.click()
            page.wait_for_url(re.compile(rf"/deployments/deployment/{nightly.id}"))
            page.get_by_text("At 02:00 AM every day").wait_for()
            shot("1-deployment")

            # Run > Custom run, change Epochs, Submit.
            page.get_by_role("button", name="Run", exact=True).click()
            page.get_by_text("Custom run", exact=True).click()
            page.wait_for_url(re.compile(r"/run$|/run\?"))
            epochs = form_input(page, "Epochs")
            epochs.wait_for()
            assert epochs.input_value() == "1", "the form shows the deployment's default (1 epoch in this stack)"
            epochs.fill(str(CUSTOM_EPOCHS))
            epochs.press("Tab")  # blur: the form commits a field's value on change, as a user's tab does
            assert epochs.input_value() == str(CUSTOM_EPOCHS)
            shot("2-run-form")
            page.get_by_role("button", name="Submit", exact=True).click()

            # The worker picks it up; wait for it through the API like the UI's own polling.
            run = stack.wait_run("retrain/nightly", lambda r: r.created.timestamp() >= started - 5
                                 and r.parameters.get("train", {}).get("epochs") == CUSTOM_EPOCHS,
                                 f"with epochs={CUSTOM_EPOCHS} from the UI form")
            # The run page left open re-renders on every poll of the UI for the minute the retrain
            # trains: nothing is checked meanwhile, so the browser waits on a blank page (alone on
            # the machine, chromium's CPU for this test 28.4 -> 23.3 s).
            page.goto("about:blank")
            run = stack.wait_final(run.id)
            assert run.state.is_completed(), f"{run.state.name}: {run.state.message}\n{stack.logs()}"

            # The run page, its Artifacts tab, and each artifact a user opens from there.
            run_url = f"{stack.ui_url}/runs/flow-run/{run.id}"

            def open_run_artifacts() -> None:
                page.goto(run_url, wait_until="networkidle")
                page.get_by_text("Completed").first.wait_for()
                page.get_by_text("Artifacts", exact=True).first.click()
                page.get_by_text("retrain-summary", exact=True).first.wait_for()

            page.goto(run_url, wait_until="networkidle")
            page.get_by_text(run.name).first.wait_for()
            page.get_by_text("Completed").first.wait_for()
            shot("3-run")
            open_run_artifacts()
            for key in ("gate-decision", "per-class-comparison", "training-progress", "training-history"):
                page.get_by_text(key, exact=True).first.wait_for()
            shot("4-artifacts")

            page.get_by_text("gate-decision", exact=True).first.click()
            page.get_by_text(re.compile(r"^Gate: (PROMOTE|KEEP CHAMPION)$")).first.wait_for()
            page.get_by_text("Reasons", exact=True).first.wait_for()
            shot("5-gate-decision")

            open_run_artifacts()
            page.get_by_text("per-class-comparison", exact=True).first.click()
            page.get_by_text("10 Items").first.wait_for()
            first_column = page.locator("tbody tr td:first-child")
            first_column.first.wait_for()
            # One row per class, in label order, as the gate compared them.
            assert first_column.all_inner_texts() == [f"{i} {name}" for i, name in enumerate(LABELS)]
            shot("6-per-class-table")

            open_run_artifacts()
            page.get_by_text("training-progress", exact=True).first.click()
            page.get_by_text("Progress: 100%").first.wait_for()
            page.get_by_text(f"epoch {CUSTOM_EPOCHS}/{CUSTOM_EPOCHS}", exact=False).first.wait_for()
            shot("7-training-progress")
        finally:
            browser.close()
    for path in shots:
        print(f"screenshot: {path}")
    assert {p.name: round(content_std(p), 1) for p in shots if content_std(p) <= MIN_CONTENT_STD} == {}

    # The form's value reached the run, and training ran that many epochs.
    history = json.loads(stack.artifacts(run.id)["training-history"].data)
    assert [row["epoch"] for row in history] == list(range(1, CUSTOM_EPOCHS + 1))
