"""The operator page in a real browser: headless Chromium (Debian's ``chromium``) driven by
Playwright, against the whole stack on PostgreSQL (API, Redis, Celery workers, simulated
ComfyUI). It signs in, is refused with a customer's token, sees a cancel appear, runs a
bulk dry run and then the confirmed bulk cancel.

The screenshot it takes is README's (docs/ops.png): ``OPS_SCREENSHOT=docs/ops.png python -m
pytest tests/acceptance/test_ops_page.py`` writes it there.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright
from playwright.sync_api import Error as PlaywrightError
from sqlalchemy import update

from comfy_cancel import manager, status
from comfy_cancel.embedded.comfyui_sim import blur_chain
from comfy_cancel.models import Workflow, WorkflowStatus, utcnow
from testbed.stack import Stack, cancel, running_stack
from tests.conftest import _unavailable
from tests.helpers import seed_workflow

pytestmark = [pytest.mark.acceptance, pytest.mark.postgres, pytest.mark.browser]
S = WorkflowStatus
TERMINAL = {"completed", "failed", "cancelled"}
CHROMIUM = os.environ.get("COMFY_CANCEL_TEST_CHROMIUM", "/usr/bin/chromium")
WAIT_MS = 30_000  # the page polls every 2 s; generous for a loaded CI machine


@pytest.fixture
def stack(pg_database_url: str, redis_db_url: str, tmp_path: Path) -> Iterator[Stack]:
    with running_stack(pg_database_url, redis_db_url, tmp_path) as s:
        yield s


@pytest.fixture
def browser() -> Iterator[Browser]:
    if shutil.which(CHROMIUM) is None:
        _unavailable("Chromium", f"no {CHROMIUM} (apt-get install chromium)")
    with sync_playwright() as playwright:
        try:
            # Never `playwright install`: the distribution's browser, as CI installs it.
            chromium = playwright.chromium.launch(
                executable_path=CHROMIUM, args=["--disable-dev-shm-usage"]
            )
        except PlaywrightError as exc:
            _unavailable("Chromium", str(exc).splitlines()[0])
        try:
            yield chromium
        finally:
            chromium.close()


def sign_in(page: Page, token: str) -> None:
    page.fill("#token", token)
    page.click("#login-form button[type=submit]")


def aged(stack: Stack, workflow_id: str, **seconds: float) -> None:
    """Move these time columns of a workflow ``seconds`` into the past (stuck work)."""
    with stack.db.transaction() as session:
        session.execute(update(Workflow).where(Workflow.id == workflow_id).values(
            **{name: utcnow() - timedelta(seconds=s) for name, s in seconds.items()}))


def statuses(stack: Stack, ids: list[str]) -> set[str]:
    with stack.db.transaction() as session:
        return {w.status for w in manager.workflows_by_ids(session, ids)}


def test_an_operator_watches_a_cancel_and_runs_a_bulk_cancel_in_a_browser(
    browser: Browser, stack: Stack, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:  # the browser first: without one, no stack is started for nothing
    with stack.db.transaction() as session:
        globex = manager.get_or_create_account(session, "globex")
        globex_runner = manager.add_runner(session, globex.id, name="g", endpoint_url=stack.sim.url)
        globex_id, globex_runner_id = globex.id, globex_runner.id
    # Stuck work (no beat runs in this stack, so it stays stuck): a runner gone silent.
    silent = seed_workflow(stack.db, stack.account_id, stack.runner_id, S.RUNNING)
    aged(stack, silent, heartbeat_at=stack.settings.heartbeat_timeout_seconds + 600)

    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(f"{stack.api_url}/ops")

    # A customer's token is refused, and the page stays signed out.
    sign_in(page, stack.token)
    expect(page.locator("#login-error")).to_contain_text("operator token", timeout=WAIT_MS)
    expect(page.locator("#main")).to_be_hidden()

    sign_in(page, stack.operator_token)
    expect(page.locator("#main")).to_be_visible(timeout=WAIT_MS)
    assert stack.operator_token not in page.url
    expect(page.locator("#stuck")).to_contain_text(silent, timeout=WAIT_MS)
    expect(page.locator("#stuck")).to_contain_text("no heartbeat")

    # A customer's cancel of a running workflow appears on the page with its outcome.
    running = stack.submit(blur_chain(40), name="running")
    stack.wait_status(running, {"running"} | TERMINAL)
    assert cancel(stack, running, reason="changed my mind").status_code == 200
    outcome = stack.wait_status(running, TERMINAL)["cancel"]["outcome"]
    latest = page.locator(f"#latest tr[data-id='{running}']")
    expect(latest).to_contain_text("api", timeout=WAIT_MS)
    expect(latest).to_contain_text(outcome)
    expect(page.locator("#by-source")).to_contain_text("api")
    expect(page.locator("#histogram rect").first).to_be_visible(timeout=WAIT_MS)

    # Bulk: the dry run shows the count and a sample, and cancels nothing ...
    queued = [seed_workflow(stack.db, globex_id, globex_runner_id, S.QUEUED) for _ in range(6)]
    page.fill("#bulk-form input[name=account]", "globex")
    page.fill("#bulk-form input[name=reason]", "maintenance")
    page.click("#bulk-dry-run")
    expect(page.locator("#bulk-matched")).to_have_text("6 workflows match", timeout=WAIT_MS)
    expect(page.locator("#bulk-by-status")).to_have_text("queued: 6")
    expect(page.locator("#bulk-sample li")).to_have_count(6)
    assert set(page.locator("#bulk-sample li").all_inner_texts()) == set(queued)
    confirm = page.locator("#bulk-confirm")
    expect(confirm).to_have_text("Confirm: cancel 6 workflows")
    assert statuses(stack, queued) == {"queued"}

    # ... a changed filter takes the confirmation away until a new dry run ...
    page.fill("#bulk-form input[name=tag]", "x")
    expect(confirm).to_be_hidden()
    page.fill("#bulk-form input[name=tag]", "")
    page.click("#bulk-dry-run")
    expect(confirm).to_be_visible(timeout=WAIT_MS)

    # ... and the confirmation runs it.
    confirm.click()
    expect(page.locator("#bulk-result")).to_contain_text(
        "Done: matched 6, cancelled 6", timeout=WAIT_MS)
    assert statuses(stack, queued) == {"cancelled"}
    expect(page.locator("#latest")).to_contain_text(queued[0], timeout=WAIT_MS)
    expect(page.locator("#by-source")).to_contain_text("bulk")
    assert silent in page.locator("#stuck").inner_text()  # a dry run never acted on it
    assert statuses(stack, [silent]) == {"running"}

    # An open cancel request, for the picture: recorded, and nobody hands it on here.
    waiting = seed_workflow(stack.db, globex_id, globex_runner_id, S.QUEUED)
    with stack.db.transaction() as session:
        status.request_cancel(session, waiting, status.Actor("sweep", "sweep", "stale"))
    expect(page.locator("#open")).to_contain_text(waiting, timeout=WAIT_MS)
    expect(page.locator("#open-count")).to_have_text("1")

    shot = tmp_path / "ops.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    if os.environ.get("OPS_SCREENSHOT"):
        shutil.copyfile(shot, os.environ["OPS_SCREENSHOT"])

    # Neither the page nor any log shows the operator's token.
    assert stack.operator_token not in page.content()
    assert stack.operator_token not in caplog.text
    assert stack.operator_token not in stack.worker_logs()
