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
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(url)
        page.get_by_role("button", name="Run").click()
        page.get_by_text(f"step {steps} of {steps}").wait_for(timeout=180_000)
        page.wait_for_timeout(2500)
        page.screenshot(path=out / "denoise.png", full_page=True)
        page.get_by_role("tab", name="Attention").click()
        page.get_by_role("button", name="Show").click()
        page.get_by_text('"word"').wait_for(timeout=60_000)
        page.wait_for_timeout(1000)
        page.screenshot(path=out / "attention.png", full_page=True)
        page.get_by_role("tab", name="Concepts").click()
        page.get_by_role("button", name="Token relevance (gradient, one pass per step)").click()
        page.get_by_text('"token relevance"').wait_for(timeout=120_000)
        page.get_by_role("button", name="Compare uniform / early / latter").click()
        page.get_by_text('"latter"').wait_for(timeout=180_000)
        page.wait_for_timeout(10_000)  # the three runs stream to their end
        page.screenshot(path=out / "concepts.png", full_page=True)
        page.get_by_role("tab", name="Saliency").click()
        page.get_by_role("button", name="Explain").click()  # DF-RISE, the tab's defaults, scored
        page.get_by_text('"deletion_auc"').wait_for(timeout=180_000)
        page.wait_for_timeout(1000)
        page.screenshot(path=out / "saliency.png", full_page=True)
        page.get_by_label("Method").click()
        page.get_by_role("option", name="DF-CAM", exact=True).click()
        page.get_by_role("button", name="Explain").click()  # DF-CAM at the same step, its layers listed by share
        page.get_by_text('"layer_shares"').wait_for(timeout=180_000)
        page.wait_for_timeout(1000)
        page.screenshot(path=out / "saliency-df-cam.png", full_page=True)
        page.get_by_role("tab", name="Export").click()
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
