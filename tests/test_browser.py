"""The pages in a real browser: Debian's Chromium driven by Playwright, against real processes."""
import os
import shutil

import pytest

from .e2e import eventually

pytestmark = pytest.mark.browser

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        reason = "SKIPPED LOUDLY: the browser tests did not run: Debian's chromium is not installed (apt install chromium)"
        if os.environ.get("PUBSUB_CMDB_REQUIRE_BROWSER") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser):
    context = browser.new_context()
    page = context.new_page()
    page.problems = []  # console errors (a CSP violation shows up here) and uncaught page errors
    expected = "the server responded with a status of 400"  # the invalid form the test submits on purpose
    page.on("console", lambda m: m.type == "error" and expected not in m.text and page.problems.append(m.text))
    page.on("pageerror", lambda e: page.problems.append(str(e)))
    yield page
    context.close()


def publish(page, action, vm_name, namespace, text):
    page.get_by_label("Action").select_option(action)
    page.get_by_label("VM name").fill(vm_name)
    page.get_by_label("Namespace").select_option(namespace)
    page.get_by_label("Message").fill(text)
    page.get_by_role("button", name="Publish").click()


def test_publish_ack_and_see_the_cmdb_in_a_browser(page, system, tmp_path):
    page.goto(system.url + "/")
    assert page.url.endswith("/message")

    # A get waits on /messages until its ACK button is pressed.
    publish(page, "get", "browser-get", "Customer 2", "who is there?")
    assert "Published get browser-get (Customer 2) as message" in page.locator(".flash.success").inner_text()
    page.get_by_role("link", name="Messages").click()
    row = page.locator("tr", has_text="browser-get")
    eventually(lambda: row.count() or page.reload() and False, what="the get on /messages")
    assert "who is there?" in row.inner_text() and "Customer 2" in row.inner_text()
    page.screenshot(path=str(tmp_path / "messages.png"), full_page=True)
    row.get_by_role("button", name="ACK").click()
    assert "Acknowledged" in page.locator(".flash").inner_text()

    # Empty VM name: the form comes back with the error, nothing is published.
    page.get_by_role("link", name="Publish").click()
    publish(page, "create", "", "Customer 1", "")
    assert "vm_name must not be empty" in page.locator(".field-error").inner_text()

    # A create goes through subscriber.py into the CMDB page.
    system.start_subscriber()
    publish(page, "create", "browser-vm", "Customer 3", "made in Chromium <b>bold</b>")
    page.get_by_role("link", name="CMDB").click()
    eventually(lambda: page.locator("td", has_text="browser-vm").count() or page.reload() and False,
               what="browser-vm on /cmdb")
    assert "made in Chromium <b>bold</b>" in page.locator("tr", has_text="browser-vm").inner_text()
    # Its name leads to its history: the create, applied once.
    page.get_by_role("link", name="browser-vm").click()
    assert page.get_by_role("heading", name="History of browser-vm").is_visible()
    assert "created" in page.locator("tbody tr").first.inner_text()
    page.get_by_role("link", name="Back to the records").click()

    # An update is never applied: /cmdb lists it under "Not applied", with the reason.
    page.get_by_role("link", name="Publish").click()
    publish(page, "update", "browser-update", "Customer 1", "never applied")
    page.get_by_role("link", name="CMDB").click()
    refused = page.locator("tr", has_text="browser-update")
    eventually(lambda: refused.count() or page.reload() and False, what="the update under Not applied")
    assert "action not supported: update" in refused.inner_text()
    assert page.get_by_role("heading", name="Not applied").is_visible()
    page.screenshot(path=str(tmp_path / "cmdb.png"), full_page=True)
    assert page.problems == []
