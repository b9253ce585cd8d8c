"""Screenshots of every tab for docs/: run the default example, then use each tab.

Usage: python app.py &  python scripts/screenshot.py http://127.0.0.1:7860 docs/
"""

import shutil
import sys
from pathlib import Path

from playwright.sync_api import sync_playwright

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from explainer import config  # noqa: E402

FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking"]


def main(url: str, folder: str) -> None:
    out = Path(folder)
    steps = config.MODELS[config.default_model_id()].steps
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=shutil.which("chromium"), args=FLAGS)
        phone = browser.new_page(viewport={"width": 390, "height": 844})
        phone.goto(url)
        phone.get_by_text("An example run").wait_for(timeout=60_000)
        phone.wait_for_timeout(1500)
        phone.screenshot(path=out / "phone.png", full_page=True)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(url)
        page.get_by_text("An example run").wait_for(timeout=60_000)  # the first view, before any click
        page.wait_for_timeout(1500)
        page.screenshot(path=out / "first-view.png", full_page=True)
        page.get_by_label("Second prompt (optional): compared from the same starting noise").fill("a blue circle on the left")
        page.get_by_role("button", name="Run").click()
        page.get_by_text("An example run").wait_for(state="detached", timeout=60_000)  # the run's first step replaced it
        page.get_by_text(f"step {steps} of {steps}").wait_for(timeout=180_000)
        page.get_by_text("Second prompt: the noisy image").wait_for()
        page.wait_for_timeout(2500)
        page.screenshot(path=out / "denoise.png", full_page=True)
        page.get_by_role("tab", name="Words").click()
        page.get_by_role("button", name="Show", exact=True).click()
        page.locator("#word-map img").wait_for(timeout=60_000)
        box = page.locator("#word-map img").bounding_box()  # the region view: a spot on the circle
        page.locator("#word-map img").click(position={"x": 0.3 * box["width"], "y": 0.5 * box["height"]})
        page.locator("#spot-map img").wait_for(timeout=60_000)
        page.wait_for_timeout(1000)
        page.screenshot(path=out / "words.png", full_page=True)
        page.get_by_role("tab", name="Concepts").click()
        quick = page.locator("#concept-chart img").get_attribute("src")
        page.get_by_role("button", name="Token relevance (asks the model again, slower)").click()
        page.wait_for_function(f"document.querySelector('#concept-chart img').src != {quick!r}", timeout=120_000)
        page.get_by_role("button", name="Compare uniform / early / latter").click()
        page.locator("#latter-image img").wait_for(timeout=180_000)
        page.get_by_role("button", name="Compare guidance").click()
        page.locator("#guidance-2-image img").wait_for(timeout=180_000)
        page.wait_for_timeout(10_000)  # the runs stream to their end
        page.screenshot(path=out / "concepts.png", full_page=True)
        page.get_by_role("tab", name="Why here").click()
        page.get_by_role("button", name="Explain").click()  # DF-RISE, the recommended settings, scored
        page.get_by_text("deletion AUC").wait_for(timeout=180_000)
        page.wait_for_timeout(1000)
        page.screenshot(path=out / "why-here.png", full_page=True)
        page.get_by_label("Method").click()
        page.get_by_role("option", name="DF-CAM", exact=True).click()
        page.get_by_role("button", name="Explain").click()  # DF-CAM at the same step, its layers listed by share
        page.get_by_text("DF-CAM at step").wait_for(timeout=180_000)
        page.wait_for_timeout(1000)
        page.screenshot(path=out / "why-here-df-cam.png", full_page=True)
        page.get_by_role("tab", name="Image").click()
        page.get_by_role("button", name="Render a shapes scene").click()
        page.wait_for_timeout(1500)  # the scene and its caption, which becomes the prompt
        page.get_by_role("button", name="Explain this picture").click()
        page.get_by_text(f"step {steps} of {steps}, t = ").last.wait_for(timeout=180_000)
        page.get_by_text("trajectory: noise").wait_for(timeout=180_000)
        page.wait_for_timeout(2500)
        page.screenshot(path=out / "image.png", full_page=True)
        page.get_by_role("tab", name="Export & API").click()
        page.get_by_role("button", name="Export the latest run").click()
        page.get_by_text(".zip").first.wait_for(timeout=120_000)  # the archive, named by prompt and seed
        page.wait_for_timeout(800)
        page.screenshot(path=out / "export.png", full_page=True)
        page.get_by_role("tab", name="About").click()
        page.wait_for_timeout(800)
        page.screenshot(path=out / "about.png", full_page=True)
        browser.close()


if __name__ == "__main__":
    main(*sys.argv[1:3])
