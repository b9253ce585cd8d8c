"""A visitor's view: headless Chromium opens the page, sees the finished example, runs their own,
scrubs, and reads the page on a phone's width."""

import shutil
import time

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
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def page(url, browser):
    page = browser.new_page(viewport={"width": 1300, "height": 1000})
    page.goto(url)
    yield page
    page.close()


def test_the_first_view_shows_the_finished_example_without_a_click(url, browser):
    page = browser.new_page(viewport={"width": 1300, "height": 1000})
    started = time.time()
    page.goto(url)
    page.get_by_text("An example run").wait_for(timeout=30_000)
    pictures = page.locator("img[src*='gradio_api/file']")
    pictures.nth(3).wait_for()  # the two views, the word maps, the noise chart...
    seconds = time.time() - started
    steps = config.MODELS[config.default_model_id()].steps
    assert page.get_by_text(f"step {steps} of {steps}").count() >= 1
    assert seconds <= 3.0, f"the example took {seconds:.1f} s to appear"
    page.close()


def test_running_an_example_shows_pictures_and_the_chart(page):
    from playwright.sync_api import expect

    page.get_by_text("Examples").wait_for()
    page.get_by_text("An example run").wait_for()
    page.get_by_role("button", name="Run").click()
    page.get_by_text("An example run").wait_for(state="detached", timeout=60_000)  # the run's first step replaced it
    steps = config.MODELS[config.default_model_id()].steps
    page.get_by_text(f"step {steps} of {steps}").wait_for(timeout=120_000)
    pictures = page.locator("img[src*='gradio_api/file']")
    pictures.first.wait_for()
    assert pictures.count() >= 4  # two views, the noise chart, the concept chart (+ overlays)
    page.get_by_role("tab", name="Words").click()
    # The finished run fills the word list in a follow-up event; "Show" before that has no word.
    expect(page.get_by_label("Word", exact=True)).not_to_have_value("", timeout=60_000)
    page.get_by_role("button", name="Show", exact=True).click()
    page.locator("#word-map img").wait_for(timeout=30_000)
    box = page.locator("#word-map img").bounding_box()  # the region view: click a spot of the map
    page.locator("#word-map img").click(position={"x": 0.25 * box["width"], "y": 0.6 * box["height"]})
    page.locator("#spot-map img").wait_for(timeout=30_000)
    page.get_by_role("tab", name="Concepts").click()  # never opened before: the run's concept chart is there
    page.locator("#concept-chart img").wait_for(timeout=10_000)


def test_each_other_tabs_main_action_shows_its_result(page):
    """After the run above: the Concepts tab's comparisons, Why here's map and score, Export's files."""
    page.get_by_role("tab", name="Concepts").click()
    page.get_by_role("button", name="Compare uniform / early / latter").click()
    page.locator("#latter-image img").wait_for(timeout=120_000)
    page.get_by_role("button", name="Compare guidance").click()
    page.locator("#guidance-2-image img").wait_for(timeout=120_000)
    page.get_by_role("tab", name="Why here").click()
    page.get_by_role("button", name="Explain").click()
    page.get_by_text("deletion AUC").wait_for(timeout=120_000)  # the numbers that matter, in a line
    page.get_by_role("tab", name="Export & API").click()
    page.get_by_role("button", name="Export the latest run").click()
    page.get_by_text(".zip").first.wait_for(timeout=60_000)


def test_typing_a_step_in_the_scrub_box_shows_that_step(page):
    """After the run above: the slider's number box, typed into, scrubs as dragging does."""
    page.get_by_role("tab", name="Denoise").click()
    steps = config.MODELS[config.default_model_id()].steps
    box = page.get_by_label("number input for Step (drag or type one after the run)")
    box.fill("3")
    box.press("Enter")
    page.get_by_text(f"step 3 of {steps}").wait_for(timeout=30_000)


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


def test_a_phone_sized_screen_gets_one_column(url, browser):
    page = browser.new_page(viewport={"width": 390, "height": 844})
    page.goto(url)
    page.get_by_text("An example run").wait_for(timeout=30_000)
    prompt = page.get_by_label("Prompt", exact=True).bounding_box()
    prediction = page.locator("img[src*='gradio_api/file']").first.bounding_box()
    assert prediction["y"] >= prompt["y"] + prompt["height"]  # under the controls, not beside them
    assert prediction["x"] + prediction["width"] <= 390 and page.evaluate("document.documentElement.scrollWidth") <= 390
    page.close()
