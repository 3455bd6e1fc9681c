"""The admin UI in a real browser (headless Chromium through Selenium) against the whole engine and
the simulated Asterisk: log in, watch a call arrive and talk, hang it up.

This is what the StubTreq tests cannot show: the Content-Security-Policy lets admin.js run, the
Server-Sent Events reach the page and the script redraws it without a reload, the confirmation
dialog and the CSRF-protected form work together, and the call really ends in the PBX.

Selenium blocks, so every driver call runs in a thread; the reactor (engine, simulator, web site)
keeps turning meanwhile. Chromium and chromedriver are Debian's (no driver download): without them
the test is skipped, except when ``CI`` is set, where it fails (CI is supposed to have them).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest_twisted
from twisted.internet.threads import deferToThread

from tests.calls.simstack import converse, until
from tests.helpers import unavailable
from twisted_agent.web.auth import hash_password

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
PASSWORD = "a real browser logs in"
#: shown as text everywhere, the live table's script included
NAME = "Ada <b>Lovelace</b>"
NUMBER = "+15557654321"
WAIT = 20.0


def require_browser() -> None:
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not os.path.exists(path)]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("the selenium package")
    if not missing:
        return
    message = f"{' and '.join(missing)} missing: the admin UI browser test needs them (apt-get install chromium " \
              "chromium-driver; pip install -e .[test])"
    unavailable(message)


def start_browser(profile: Path) -> Any:
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-dev-shm-usage", "--no-first-run", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={profile}"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)


class Operator:
    """What the person at the browser does and sees; each method blocks (run it in a thread)."""

    def __init__(self, driver: Any, base: str) -> None:
        from selenium.webdriver.support.ui import WebDriverWait

        self.driver = driver
        self.base = base
        self.wait = WebDriverWait(driver, WAIT)

    def find(self, css: str) -> Any:
        from selenium.webdriver.common.by import By

        return self.driver.find_element(By.CSS_SELECTOR, css)

    def find_all(self, css: str) -> list[Any]:
        from selenium.webdriver.common.by import By

        return list(self.driver.find_elements(By.CSS_SELECTOR, css))

    def log_in(self) -> None:
        self.driver.get(self.base + "/admin/")
        assert self.driver.current_url.startswith(self.base + "/admin/login?next="), self.driver.current_url
        self.find("input[name=password]").send_keys(PASSWORD)
        self.find("form.login button").click()
        self.wait.until(lambda d: d.current_url == self.base + "/admin/")
        assert self.find("h1").text == "Live calls"
        self.mark_page()

    def mark_page(self) -> None:
        # a reload would forget this: its survival proves the page changed by itself
        self.driver.execute_script("window.stillTheSamePage = true;")

    def page_was_not_reloaded(self) -> bool:
        return self.driver.execute_script("return window.stillTheSamePage === true;") is True

    def see_the_call_arrive(self) -> str:
        self.wait.until(lambda d: any(NUMBER in row.text for row in self.find_all("#live-calls tr")))
        assert self.page_was_not_reloaded(), "the live table updated without a reload"
        row = next(row for row in self.find_all("#live-calls tr") if NUMBER in row.text)
        assert NAME in row.text, "the caller's name is shown as text, tags and all"
        assert self.find("#cluster-active").text == "1"
        assert not self.find("#no-calls").is_displayed()
        link = self.find("#live-calls tr a")
        href = link.get_attribute("href")
        link.click()
        self.wait.until(lambda d: d.current_url == href)
        return str(href).rsplit("/", 1)[-1]

    def transcript(self) -> list[str]:
        return [line.text for line in self.find_all("#transcript li")]

    def see_the_greeting(self) -> int:
        self.wait.until(lambda d: any("Hello, how can I help you?" in line for line in self.transcript()))
        self.mark_page()
        return len(self.transcript())

    def see_the_transcript_grow(self, lines: int) -> list[str]:
        self.wait.until(lambda d: len(self.transcript()) >= lines + 2)
        self.wait.until(lambda d: any("You spoke for" in line for line in self.transcript()))
        assert self.page_was_not_reloaded(), "the transcript grew without a reload"
        self.wait.until(lambda d: self.find_all("#waterfall rect.voice_to_voice_ms"))
        return self.transcript()

    def hang_up(self) -> None:
        from selenium.webdriver.support import expected_conditions

        self.find("form.hangup button").click()
        self.wait.until(expected_conditions.alert_is_present())
        alert = self.driver.switch_to.alert
        assert alert.text == "Hang up this call?"
        alert.accept()
        self.wait.until(lambda d: self.find_all(".flash"))
        assert self.find(".flash").text == "call ended"

    def see_the_call_ended(self) -> None:
        # the page shows the finished call (the script reloads it when the live call ends)
        self.wait.until(lambda d: "operator_hangup" in d.page_source)
        assert not self.find_all("form.hangup")


@pytest_twisted.ensureDeferred
async def test_an_operator_watches_a_call_and_hangs_it_up(stacks: Any, tmp_path: Path) -> None:
    require_browser()
    stack = await stacks(ADMIN_PASSWORD_HASH=hash_password(PASSWORD))
    assert stack.service is not None
    operator = Operator(await deferToThread(start_browser, tmp_path / "chromium-profile"),
                        f"http://127.0.0.1:{stack.service.config.web.port}")
    try:
        await deferToThread(operator.log_in)
        caller = stack.call(caller_number=NUMBER, caller_name=NAME)
        call_id = await deferToThread(operator.see_the_call_arrive)
        assert call_id in stack.engine.calls
        lines = await deferToThread(operator.see_the_greeting)
        await converse(caller)  # the caller asks; the echo provider answers
        transcript = await deferToThread(operator.see_the_transcript_grow, lines)
        assert any(line.lower().startswith("caller") for line in transcript[lines:]), transcript  # CSS upper-cases it
        await deferToThread(operator.hang_up)
        await until(lambda: not stack.sim.live_channels(), timeout=WAIT, what="the simulator's channel to go")
        await stack.all_released()
        await deferToThread(operator.see_the_call_ended)
    finally:
        await deferToThread(operator.driver.quit)
