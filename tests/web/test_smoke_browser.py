from __future__ import annotations

from typing import Any

from tests.web.conftest import BrowserPage


def test_login_lands_on_dashboard(browser_page: BrowserPage) -> None:
    page: Any = browser_page("admin")
    page.get_by_role("heading", name="Dashboard").wait_for()
    print(page.evaluate("document.body.dataset.stream"))
    page.wait_for_selector("#live-status[data-state=live]")
    page.goto("/machines?x=1")
    print(page.url)
