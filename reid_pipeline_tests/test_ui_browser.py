"""The asset graph in a real browser: Debian's headless Chromium, driven by Playwright, on ``dagster dev``."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from reid_pipeline_tests.conftest import PROJECT_ROOT
from reid_pipeline_tests.ui_server import (
    DagsterDev,
    dagster_ui,  # noqa: F401  (the shared server fixture)
    descendants,
    materialized_pipeline,
)

pytestmark = [pytest.mark.slow, pytest.mark.browser]

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]
SCREENSHOTS = PROJECT_ROOT / "screenshots"


def _browser_processes() -> list[str]:
    """Chromium or Playwright-driver processes started (directly or not) by this test process."""
    found = []
    for pid in descendants(os.getpid()):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except FileNotFoundError:
            continue
        if "chrom" in cmd or "playwright" in cmd:
            found.append(f"{pid}: {cmd[:120]}")
    return found


def test_asset_graph_shows_the_pipeline_and_its_latest_materialisations(dagster_ui: DagsterDev):  # noqa: F811
    if not CHROMIUM.is_file():
        pytest.fail(f"{CHROMIUM} missing: `make test` installs Debian's chromium (apt-get install -y chromium)")
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import expect, sync_playwright

    server = dagster_ui
    materialized_pipeline(server)
    nodes = server.asset_nodes()
    assert nodes, "the server reports no assets"
    SCREENSHOTS.mkdir(exist_ok=True)
    shot = SCREENSHOTS / "asset_graph.png"
    shot.unlink(missing_ok=True)

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            # Large enough that the whole graph, fitted to the view, is drawn with full asset cards.
            page = browser.new_page(viewport={"width": 2400, "height": 1400})
            page.goto(f"{server.url}/asset-groups", wait_until="domcontentloaded")
            # A first visit asks to "Join the Dagster community".
            try:
                page.get_by_role("button", name="Skip").click(timeout=30_000)
            except PlaywrightTimeout:
                pass
            page.get_by_text("Global asset lineage").first.wait_for(timeout=60_000)
            page.get_by_text("Hide navigation").click()
            # Several groups start collapsed: "Expand all groups" (⌥E), then reload so the view fits the graph.
            page.get_by_text("Materialize all").first.wait_for(timeout=60_000)
            page.keyboard.press("Alt+e")
            page.reload(wait_until="domcontentloaded")
            cards = page.locator('[class*="AssetNode_assetNodeBox"]')
            try:
                cards.first.wait_for(state="visible", timeout=60_000)
            except PlaywrightTimeout:
                pytest.fail("the asset graph did not render full asset cards (did it outgrow the 2400x1400 view?)")
            for name, info in sorted(nodes.items()):
                card = cards.filter(has=page.locator(f'[data-tooltip="{name}"]')).first
                card.wait_for(state="visible", timeout=60_000)
                if info["materializable"] and info["partitioned"]:
                    # A per-dataset asset: its one dataset partition materialised, the latest event links to the run.
                    expect(card).to_contain_text("Partitions100% filled", timeout=60_000)
                    expect(card.locator(f'a[href^="/runs/{info["latest_run"]}"]').first).to_be_visible(timeout=60_000)
                elif info["materializable"]:
                    # The latest materialisation: the status row, and the event links to the run that made it.
                    expect(card).to_contain_text("Materialized", timeout=60_000)
                    expect(card.locator(f'a[href^="/runs/{info["latest_run"]}"]').first).to_be_visible(timeout=60_000)
                else:
                    expect(card).to_contain_text("Observed", timeout=60_000)
            assert cards.count() == len(nodes), f"{cards.count()} asset cards for {len(nodes)} assets"
            page.wait_for_timeout(1000)  # let the last edges settle before the picture
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()

    assert shot.is_file() and shot.stat().st_size > 20_000
    assert _browser_processes() == []
