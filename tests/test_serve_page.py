"""The page at `serve`'s /, in a real headless Chromium: draw a digit stroke by stroke, read the answer.

Chromium is Debian's (`apt-get install chromium`), driven by Playwright's Python API; Playwright's own
browser download needs the internet. Where ../shared/data exists the model is trained on a slice of
real MNIST, so that a drawn 7 must read as 7. `UPDATE_DOCS=1` saves the screenshot README shows.
"""

import base64
import itertools
import os
import shutil
from pathlib import Path

import pytest
import requests
from playwright.sync_api import sync_playwright

from tests.helpers import QUICK, REAL_DATA, cli, fit_args, running_server, write_mnist

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="no Chromium installed (apt-get install chromium)"),
]
# Headless and offline: nothing that phones home, no GPU, no sandbox (CI runs as root in a container).
BROWSER_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--no-first-run", "--disable-sync",
]  # fmt: skip
REAL = (REAL_DATA / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file()
SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "serve.png"
# Digits as strokes of points, in fractions of the canvas.
SEVEN = [[(0.25, 0.22), (0.75, 0.22), (0.62, 0.45), (0.45, 0.82)], [(0.38, 0.52), (0.68, 0.52)]]
ONE = [[(0.45, 0.28), (0.55, 0.18), (0.55, 0.82)]]
SHOWN = "document.getElementById('result').dataset.shown === document.getElementById('pad').dataset.version"
MAPS_SHOWN = SHOWN.replace("'result'", "'maps'")
# A canvas of tiles (8 a row, 1-pixel gaps) read back as tiles[c][y][x], the gray levels the page drew.
READ_TILES = """canvas => {
  const count = Number(canvas.dataset.tiles);
  if (!count) return [];
  const side = (canvas.width + 1) / 8 - 1;
  const data = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
  const at = (c, y, x) =>
    ((Math.floor(c / 8) * (side + 1) + y) * canvas.width + (c % 8) * (side + 1) + x) * 4;
  return Array.from({length: count}, (_, c) => Array.from({length: side}, (_, y) =>
    Array.from({length: side}, (_, x) => data[at(c, y, x)])));
}"""


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("page")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        if REAL:
            cli(
                "fit", f"--data.data_dir={REAL_DATA}", "--data.download=false", *QUICK,
                "--trainer.limit_train_batches=150", "--trainer.limit_val_batches=1",
            )  # fmt: skip
        else:
            cli(*fit_args(write_mnist(folder / "data")))
    return folder


@pytest.fixture(scope="module")
def server(trained):
    with running_server(trained) as server:
        yield server


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as driver:
        chromium = driver.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
        yield chromium
        chromium.close()


def stroke_points(page, stroke) -> list[tuple[float, float]]:
    """A stroke's first point, then ten steps along each of its segments, in page pixels."""
    box = page.locator("#pad").bounding_box()

    def at(x: float, y: float) -> tuple[float, float]:
        return box["x"] + x * box["width"], box["y"] + y * box["height"]

    steps = [at(*stroke[0])]
    for (x0, y0), (x1, y1) in itertools.pairwise(stroke):
        steps += [at(x0 + (x1 - x0) * s / 10, y0 + (y1 - y0) * s / 10) for s in range(1, 11)]
    return steps


def draw_with_mouse(page, strokes, live_check: bool = False) -> None:
    """Mouse strokes; with ``live_check``, wait mid-stroke (button still down) for an answer to show."""
    for number, stroke in enumerate(strokes):
        first, *rest = stroke_points(page, stroke)
        page.mouse.move(*first)
        page.mouse.down()
        for index, point in enumerate(rest):
            page.mouse.move(*point)
            if live_check and number == 0 and index == 10:
                page.wait_for_function("Number(document.getElementById('result').dataset.shown) > 1")
                page.wait_for_function("Number(document.getElementById('maps').dataset.shown) > 1")
        page.mouse.up()


def draw_with_finger(page, strokes) -> None:
    """Touch strokes, sent as a touchscreen's own events through the DevTools protocol."""
    devtools = page.context.new_cdp_session(page)
    for stroke in strokes:
        first, *rest = (dict(zip("xy", point, strict=True)) for point in stroke_points(page, stroke))
        devtools.send("Input.dispatchTouchEvent", {"type": "touchStart", "touchPoints": [first]})
        for point in rest:
            devtools.send("Input.dispatchTouchEvent", {"type": "touchMove", "touchPoints": [point]})
        devtools.send("Input.dispatchTouchEvent", {"type": "touchEnd", "touchPoints": []})


def shown_answer(page) -> dict:
    """What the page shows once it has answered for the drawing as it is now: digit, bars, logits."""
    page.wait_for_function(SHOWN)
    rows = page.locator("#bars tr")
    return {
        "digit": int(page.locator("#digit").inner_text()),
        "probabilities": [float(rows.nth(d).get_attribute("data-p")) for d in range(10)],
        "logits": [float(rows.nth(d).get_attribute("data-logit")) for d in range(10)],
        "widths": [rows.nth(d).locator(".fill").evaluate("e => e.style.width") for d in range(10)],
        "top": [d for d in range(10) if "top" in (rows.nth(d).get_attribute("class") or "")],
    }


def served_answer(page, server, headers: dict | None = None) -> dict:
    """/predict's answer for the canvas as it is now, sent as the PNG the page itself would send."""
    png = page.locator("#pad").evaluate("canvas => canvas.toDataURL('image/png')").split(",", 1)[1]
    assert base64.b64decode(png).startswith(b"\x89PNG")
    response = requests.post(f"{server.url}/predict", json={"image": png}, headers=headers, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def check_maps_match_predict(page, server) -> dict:
    """The page's pictures of the network's inside are /predict's maps for the drawing as it is now."""
    page.wait_for_function(MAPS_SHOWN)
    shown = {name: page.locator(f"#{name}").evaluate(READ_TILES) for name in ("filters", "block1", "block2")}
    png = page.locator("#pad").evaluate("canvas => canvas.toDataURL('image/png')").split(",", 1)[1]
    response = requests.post(f"{server.url}/predict", json={"image": png, "maps": True}, timeout=120)
    assert response.status_code == 200, response.text
    maps = response.json()["maps"]
    assert shown == {"filters": maps["filters"], "block1": maps["blocks"][0], "block2": maps["blocks"][1]}
    sizes = [(len(tiles), len(tiles[0]), len(tiles[0][0])) for tiles in shown.values()]
    assert sizes == [(16, 5, 5), (16, 14, 14), (32, 7, 7)]
    # Drawn large enough to see: the pictures fill their card's width.
    assert page.locator("#block2").bounding_box()["width"] > 250
    return shown


def check_page_matches_predict(page, server, headers: dict | None = None) -> dict:
    shown, served = shown_answer(page), served_answer(page, server, headers)
    assert shown["digit"] == served["digit"] and shown["top"] == [served["digit"]]
    assert shown["probabilities"] == pytest.approx(served["probabilities"], abs=1e-12)
    assert shown["logits"] == pytest.approx(served["logits"], abs=1e-12)
    widths = [float(width.rstrip("%")) for width in shown["widths"]]
    assert widths == pytest.approx([p * 100 for p in served["probabilities"]], abs=1e-3)  # CSS rounds
    return shown


def test_draw_with_the_mouse_and_the_page_shows_what_predict_says(browser, server):
    page = browser.new_page(viewport={"width": 1000, "height": 660})
    page.set_default_timeout(120_000)
    console_errors = []  # e.g. a 404 for /favicon.ico, which a browser asks for unless the page names one
    page.on(
        "console", lambda message: console_errors.append(message.text) if message.type == "error" else None
    )
    page.goto(server.url)
    assert page.locator("#digit").inner_text() == "?"

    draw_with_mouse(page, SEVEN, live_check=True)  # the bars and maps move while the first stroke is drawn
    shown = check_page_matches_predict(page, server)
    if REAL:
        assert shown["digit"] == 7
    assert page.locator("#confidence").inner_text().endswith("sure")
    seven_maps = check_maps_match_predict(page, server)
    image = page.screenshot(path=str(SCREENSHOT) if os.environ.get("UPDATE_DOCS") else None)
    assert image.startswith(b"\x89PNG")

    page.click("#clear")
    assert page.locator("#digit").inner_text() == "?"
    assert page.locator("#bars .fill").evaluate_all("fills => fills.map(f => f.style.width)") == ["0%"] * 10
    assert page.locator("#block1").get_attribute("data-tiles") == "0"  # cleared with the drawing
    draw_with_mouse(page, ONE)
    shown = check_page_matches_predict(page, server)
    if REAL:
        assert shown["digit"] == 1
    one_maps = check_maps_match_predict(page, server)
    assert one_maps["filters"] == seven_maps["filters"]  # the network's, whatever is drawn
    assert one_maps["block1"] != seven_maps["block1"] and one_maps["block2"] != seven_maps["block2"]
    assert console_errors == []
    page.close()


def test_on_a_phone_a_finger_draws_and_the_page_fits_the_screen(browser, server):
    context = browser.new_context(
        viewport={"width": 390, "height": 844}, device_scale_factor=2, has_touch=True
    )
    page = context.new_page()
    page.set_default_timeout(120_000)
    page.goto(server.url)
    assert page.evaluate("document.documentElement.scrollWidth") <= 390  # no sideways scrolling
    box = page.locator("#pad").bounding_box()
    assert 250 <= box["width"] <= 390 and box["width"] == pytest.approx(box["height"], abs=1)

    draw_with_finger(page, SEVEN)
    shown = check_page_matches_predict(page, server)
    if REAL:
        assert shown["digit"] == 7
    context.close()


KEY = "page-s3cret"


def test_with_an_api_key_the_page_asks_for_it_once_and_sends_it(browser, trained):
    with running_server(trained, f"--api_key={KEY}") as server:
        context = browser.new_context(viewport={"width": 1000, "height": 660})
        page = context.new_page()
        page.set_default_timeout(120_000)
        questions = []

        def answer(dialog) -> None:
            questions.append(dialog.message)
            dialog.accept("wrong key" if len(questions) == 1 else KEY)

        page.on("dialog", answer)
        page.goto(server.url)
        draw_with_mouse(page, SEVEN)
        check_page_matches_predict(page, server, {"X-API-Key": KEY})
        page.click("#clear")
        draw_with_mouse(page, ONE)
        check_page_matches_predict(page, server, {"X-API-Key": KEY})
        # A wrong key is asked for again, saying so; the right one is kept for the tab, even on reload.
        assert len(questions) == 2 and "needs its API key" in questions[0], questions
        assert questions[1].startswith("That API key was not accepted."), questions
        page.reload()
        draw_with_mouse(page, SEVEN)
        check_page_matches_predict(page, server, {"X-API-Key": KEY})
        assert len(questions) == 2, questions
        context.close()
