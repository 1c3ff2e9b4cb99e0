"""Screenshots of the web UI's main pages for docs/screenshots/ (and the README).

    python tools/screenshots.py [--wait 90] [--out docs/screenshots]

Starts `plantwatch up --demo` on a throwaway data dir and free ports, lets the
simulator run for `--wait` seconds so charts, KPI cards and alerts have data,
then logs in with Debian's chromium (Playwright) and saves one PNG per page.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

PASSWORD = "screenshots-demo-1"  # noqa: S105 (a throwaway demo's password)
CHROMIUM = os.environ.get("PLANTWATCH_TEST_CHROMIUM", "/usr/bin/chromium")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(data_dir: Path) -> tuple[subprocess.Popen[str], str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PLANTWATCH_")}
    env.update(
        PLANTWATCH_DATA_DIR=str(data_dir),
        PLANTWATCH_DEMO_PASSWORD=PASSWORD,
        PLANTWATCH_MQTT_PORT=str(free_port()),
        PLANTWATCH_LOG_LEVEL="warning",
        PYTHONUNBUFFERED="1",
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "plantwatch.cli", "up", "--demo", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    url: list[str] = []
    ready = threading.Event()

    def pump() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            if not url and (m := re.search(r"URL:\s+(http://127\.0\.0\.1:\d+)", line)):
                url.append(m.group(1))
                ready.set()
        ready.set()

    threading.Thread(target=pump, daemon=True).start()
    ready.wait(120)
    if not url:
        process.kill()
        raise SystemExit("plantwatch up --demo printed no URL")
    for _ in range(600):
        try:
            if httpx.get(f"{url[0]}/ready", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    return process, url[0]


def first_href(page: Any, selector: str) -> str | None:
    link = page.locator(selector).first
    if link.count() == 0:
        return None
    href: str | None = link.get_attribute("href")
    return href


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wait", type=float, default=90.0, help="seconds of simulated data")
    parser.add_argument("--out", type=Path, default=Path("docs/screenshots"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory(prefix="plantwatch-shots-") as tmp:
        process, base = start(Path(tmp))
        try:
            time.sleep(args.wait)
            with sync_playwright() as p:
                browser = p.chromium.launch(
                    executable_path=CHROMIUM,
                    args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
                )

                def shoot(page: Any, name: str) -> None:
                    page.wait_for_load_state("networkidle")
                    page.wait_for_timeout(1500)  # live values and charts settle
                    page.screenshot(path=str(args.out / f"{name}.png"), full_page=False)
                    print("saved", args.out / f"{name}.png")

                def session(theme: str, viewport: dict[str, int]) -> Any:
                    context = browser.new_context(
                        base_url=base, viewport=viewport, color_scheme=theme
                    )
                    page = context.new_page()
                    page.goto("/login")
                    return page

                def log_in(page: Any, user: str) -> None:
                    page.get_by_label("Factory").select_option("demo")
                    page.get_by_label("Email").fill(f"{user}@demo.plantwatch.example")
                    page.get_by_label("Password").fill(PASSWORD)
                    page.get_by_role("button", name="Log in").click()
                    page.wait_for_url(re.compile(r"^(?!.*/login).*$"))

                page = session("light", {"width": 1440, "height": 900})
                shoot(page, "login")
                log_in(page, "admin")
                shoot(page, "dashboard")
                page.goto("/machines")
                shoot(page, "machines")
                machine = first_href(page, "a[href^='/machines/']")
                if machine:
                    page.goto(machine)
                    shoot(page, "machine")
                page.goto("/alerts")
                shoot(page, "alerts")
                alert = first_href(page, "a[href^='/alerts/']")
                if alert:
                    page.goto(alert)
                    shoot(page, "alert")
                page.goto("/rules")
                shoot(page, "rules")
                rule = first_href(page, "a[href^='/rules/']:not([href='/rules/new'])")
                if rule:
                    page.goto(rule)
                    shoot(page, "rule_builder")
                for path, name in (
                    ("/dead-letters", "dead_letters"),
                    ("/users", "users"),
                    ("/audit", "audit"),
                ):
                    page.goto(path)
                    shoot(page, name)

                dark = session("dark", {"width": 1440, "height": 900})
                log_in(dark, "manager")
                shoot(dark, "dashboard_dark")
                dark.set_viewport_size({"width": 800, "height": 1280})  # a 10" tablet
                dark.goto("/machines")
                shoot(dark, "machines_tablet")
                browser.close()
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()


if __name__ == "__main__":
    main()
