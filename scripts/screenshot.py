"""Open the running app in headless Chromium, run the first example, save a screenshot.

Usage: python app.py & python scripts/screenshot.py http://127.0.0.1:7860 docs/denoise.png
"""

import shutil
import sys

from playwright.sync_api import sync_playwright

CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking"]


def main(url: str, out: str) -> None:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=shutil.which("chromium"), args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(url)
        page.get_by_role("button", name="Run").click()
        page.get_by_text("step 10 of 10").wait_for(timeout=120_000)
        page.wait_for_timeout(1500)
        page.screenshot(path=out, full_page=True)
        browser.close()


if __name__ == "__main__":
    main(*sys.argv[1:3])
