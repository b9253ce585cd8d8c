"""A visitor's view: headless Chromium opens the page, runs the first example, sees pictures and charts."""

import shutil

import pytest

from explainer import config

pytest.importorskip("playwright")
CHROMIUM = shutil.which("chromium")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium: apt-get install chromium (bash .ci/run installs it)"),
]
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking"]


@pytest.fixture(scope="module")
def page(url):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 1300, "height": 1000})
        page.goto(url)
        yield page
        browser.close()


def test_running_an_example_shows_pictures_and_the_chart(page):
    from playwright.sync_api import expect

    page.get_by_text("Examples").wait_for()
    page.get_by_role("button", name="Run").click()
    steps = config.MODELS[config.default_model_id()].steps
    page.get_by_text(f"step {steps} of {steps}").wait_for(timeout=120_000)
    pictures = page.locator("img[src*='gradio_api/file']")
    pictures.first.wait_for()
    assert pictures.count() >= 4  # two views, the noise chart, the concept chart (+ overlays)
    page.get_by_role("tab", name="Attention").click()
    # The finished run fills the word list in a follow-up event; "Show" before that has no word.
    expect(page.get_by_label("Word", exact=True)).not_to_have_value("", timeout=60_000)
    page.get_by_role("button", name="Show").click()
    page.get_by_text('"word"').wait_for(timeout=30_000)


def test_a_refused_run_keeps_the_pictures_and_the_status_says_why(page):
    """After the run above: an empty prompt is refused; the pictures stay, no panel turns into an error badge."""
    page.get_by_role("tab", name="Denoise").click()
    pictures = page.locator("img[src*='gradio_api/file']")
    before = pictures.count()
    page.get_by_label("Prompt", exact=True).fill("")
    page.get_by_role("button", name="Run").click()
    page.get_by_text("Refused:").first.wait_for(timeout=30_000)
    page.get_by_text("prompt is empty").first.wait_for()
    assert pictures.count() == before
    assert page.locator(".error", has_text="Error").count() == 0
