"""The web UI in a real browser: Debian's Chromium driven by Python playwright.

Open the page, load the demo data and see the mask preview, start a short
training and wait for it to finish, see the base and tuned answers side by
side on a held-out sample, chat with both, merge and zip the merged model, and
find the run in the Runs tab. A second walk uploads data whose image .zip holds
the image folder itself. Screenshots of each tab go to the test's tmp folder,
and to $L2T_ARTIFACTS when it is set.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import zipfile
from pathlib import Path

import pytest
from playwright.sync_api import expect, sync_playwright

from l2t.config import LOSS_MODE_DESCRIPTIONS, load_config
from l2t.prepare import prepare_data
from l2t.scenes import COLORS, USUAL_COLOR
from l2t.synthetic import BUNDLE_ARGS, bundled_dir

BUNDLED = BUNDLE_ARGS["n"]  # samples in the bundled demo train split
TRAIN_STEPS = 300  # enough for the tuned tiny model to answer the demo's short questions in one word (about 10 s on a CPU)
HELD_OUT_ID = "test_00006"  # one small blue triangle; triangles in the training split are mostly green

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
TRAIN_TIMEOUT_MS = 300_000

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(
        not CHROMIUM.exists(), reason="Debian's Chromium is not installed at /usr/bin/chromium (apt-get install -y chromium)"
    ),
]


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    from app.ui import create, serve

    root = tmp_path_factory.mktemp("browser-ui")
    demo, context = create(root / "runs", root / "uploads")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve(demo, context, port=port, block=False)
    yield f"http://127.0.0.1:{port}/"
    context.jobs.stop_all()
    demo.close()


@pytest.fixture
def page(url):
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(60_000)
        page.goto(url)
        yield page
        browser.close()


def held_out_color_question() -> tuple[Path, str, str]:
    """A held-out image with one shape, the demo's short-answer question about its color, and that color."""
    record = next(r for r in json.loads((bundled_dir() / "test.json").read_text()) if r["id"] == HELD_OUT_ID)
    (shape,) = record["objects"]
    assert shape["color"] != USUAL_COLOR[shape["shape"]], "the shape alone must not give the color away"
    question = f"What color is the {shape['shape']}?\nAnswer the question using a single word or phrase."
    return bundled_dir() / record["image"], question, shape["color"]


def screenshot(page, tmp_path: Path, name: str) -> None:
    path = tmp_path / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    if os.environ.get("L2T_ARTIFACTS"):
        target = Path(os.environ["L2T_ARTIFACTS"])
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target / path.name)


def test_demo_data_train_compare_chat_export_and_runs_in_the_browser(page, tmp_path):
    expect.set_options(timeout=90_000)

    page.get_by_role("button", name="Use the demo data").click()
    expect(page.locator("#data-report")).to_contain_text(f"{BUNDLED} of {BUNDLED} samples usable")
    expect(page.locator("#mask-preview .tok-instruction.tok-in").first).to_be_visible()
    expect(page.locator("#mask-preview .tok-task_template.tok-out").first).to_be_visible()
    expect(page.locator("#length-summary")).to_contain_text("Every sample fits")
    screenshot(page, tmp_path, "1-data")

    # The sample number moves the preview when typed with Enter and with the arrow keys.
    number = page.locator("#sample-index input[type=number]")
    number.fill("3")
    number.press("Enter")
    expect(page.locator("#mask-preview")).to_contain_text("sample train_00003")
    page.locator("#sample-index input[type=range]").press("ArrowRight")
    expect(page.locator("#mask-preview")).to_contain_text("sample train_00004")
    # The loss mode's help line follows the mode.
    page.locator("#loss-mode input").click()
    page.get_by_role("option", name="response", exact=True).click()
    expect(page.locator("#loss-mode")).to_contain_text(LOSS_MODE_DESCRIPTIONS["response"])
    expect(page.locator("#mask-preview .tok-instruction.tok-in")).to_have_count(0)

    # Clicking a sample shows its conversation and mask; unticking a template puts it back in the loss.
    page.get_by_label("Thumbnail 2 of 48").click()
    expect(page.locator("#mask-preview")).to_contain_text("sample train_00001")
    page.locator("#templates-table [role=row]", has_text="Answer yes or no.").get_by_test_id("checkbox").click()
    mined = len(prepare_data(load_config("tiny")).templates)
    expect(page.locator("#mask-preview")).to_contain_text(f"{mined - 1} task templates")
    page.get_by_label("Thumbnail 1 of 48").click()
    expect(page.locator("#mask-preview")).to_contain_text("sample train_00000")
    expect(page.locator("#mask-preview .tok-task_template")).to_have_count(0)

    # Under l2t_relevance the instruction tokens are shaded by how much the image makes them more likely.
    page.get_by_label("Loss mode").click()
    page.get_by_role("option", name="l2t_relevance").click()
    expect(page.locator("#mask-preview .tok-heat").first).to_be_visible()
    weights = [float(w) for w in page.locator("#mask-preview .tok-heat").evaluate_all("els => els.map(e => e.dataset.weight)")]
    assert weights and all(0 <= w <= 1 for w in weights) and max(weights) > 0, weights
    screenshot(page, tmp_path, "1-data-relevance")
    page.get_by_label("Loss mode").click()
    page.get_by_role("option", name="l2t", exact=True).click()
    expect(page.locator("#mask-preview .tok-heat")).to_have_count(0)

    page.get_by_role("tab", name="2 · Train").click()
    page.get_by_label("Max steps (0: use epochs)").fill(str(TRAIN_STEPS))
    page.get_by_label("Max steps (0: use epochs)").press("Tab")
    page.get_by_text("More config keys").click()
    page.get_by_label("key=value, one per line").fill("train.preview_samples=0")
    page.get_by_label("Run name").fill("browser-run")
    page.get_by_label("Run name").press("Tab")
    expect(page.locator("#train-command")).to_contain_text(f"train.max_steps={TRAIN_STEPS}")
    expect(page.locator("#train-command")).to_contain_text("templates.remove")
    page.locator("#start-training").click()
    expect(page.locator("#train-status [data-state='finished']")).to_be_visible(timeout=TRAIN_TIMEOUT_MS)
    expect(page.locator("#train-status")).to_contain_text(f"step {TRAIN_STEPS} / {TRAIN_STEPS}")
    expect(page.locator("#train-status")).to_contain_text("skipped")
    screenshot(page, tmp_path, "2-train")

    # The run lists know the new run without a press of "Refresh runs".
    page.get_by_role("tab", name="3 · Compare").click()
    expect(page.locator("#compare-run input")).to_have_value("browser-run")
    page.get_by_role("button", name="Try a held-out sample").click()
    expect(page.get_by_text("reference answer")).to_be_visible()
    picture = page.locator("#compare-picture img")
    shown = picture.get_attribute("src")
    image, question, color = held_out_color_question()
    page.locator("#compare-upload input[type=file]").set_input_files(str(image))
    expect(picture).not_to_have_attribute("src", shown)
    page.locator("#compare-prompt textarea").fill(question)
    page.locator("#compare-button").click()
    base, tuned = page.locator("#base-answer textarea"), page.locator("#tuned-answer textarea")
    expect(tuned).not_to_have_value("", timeout=120_000)
    screenshot(page, tmp_path, "3-compare")
    base_answer, tuned_answer = base.input_value().strip(), tuned.input_value().strip()
    assert base_answer and base_answer != tuned_answer, f"base and tuned both answer {base_answer!r}"
    named = [c for c in COLORS if re.search(rf"\b{c}\b", tuned_answer.lower())]
    assert named == [color], f"asked {question!r}, the tuned model answered {tuned_answer!r}; the answer is {color}"

    # Where each model looks: the attention on the image per answer token, and the first token's map over the image.
    page.locator("#looks-button").click()
    expect(page.locator("#looks-chart img")).to_be_visible(timeout=120_000)
    expect(page.locator("#looks-map img")).to_be_visible()
    screenshot(page, tmp_path, "3-compare-looks")

    page.get_by_role("tab", name="4 · Chat").click()
    expect(page.locator("#chat-run input")).to_have_value("browser-run")
    page.locator("#chat-question textarea").fill("What is in the picture?")
    page.locator("#chat-question textarea").press("Enter")
    expect(page.locator("#chat-tuned")).to_contain_text("What is in the picture?")
    expect(page.locator("#chat-tuned [data-testid='bot']").first).to_be_visible()
    expect(page.locator("#chat-base [data-testid='bot']").first).to_be_visible()
    screenshot(page, tmp_path, "4-chat")

    page.get_by_role("tab", name="5 · Export").click()
    expect(page.locator("#export-run input")).to_have_value("browser-run")
    page.locator("#merge-button").click()
    expect(page.locator("#parity-result")).to_contain_text("Parity check passed", timeout=TRAIN_TIMEOUT_MS)
    page.locator("#merged-zip-button").click()
    expect(page.locator("#merged-download a")).to_have_attribute("href", re.compile(r"browser-run-merged\.zip$"))
    screenshot(page, tmp_path, "5-export")

    page.get_by_role("tab", name="6 · Runs").click()
    row = page.locator("#runs-table [role=row]", has_text="browser-run")
    expect(row).to_contain_text("finished")
    expect(row).to_contain_text(f"{TRAIN_STEPS} / {TRAIN_STEPS}")
    screenshot(page, tmp_path, "6-runs")


def test_an_upload_whose_zip_holds_the_image_folder_itself(page, tmp_path, shapes_dir):
    expect.set_options(timeout=90_000)
    records = [r for r in json.loads((shapes_dir / "train.json").read_text()) if "image" in r][:40]
    archive = tmp_path / "images.zip"
    with zipfile.ZipFile(archive, "w") as z:  # the folder zipped, not its contents: every path one level deeper
        for record in records:
            name = Path(record["image"]).name
            z.write(shapes_dir / record["image"], f"images/{name}")
            record["image"] = name
    for record in records[:2]:  # two questions too long for the tiny preset's max_length
        record["conversations"][0]["value"] += " Describe the colour, the shape, the size and where it is." * 12
    data = tmp_path / "mix.json"
    data.write_text(json.dumps(records))
    page.locator("#upload-data input[type=file]").set_input_files(str(data))
    page.locator("#upload-images input[type=file]").set_input_files(str(archive))
    page.get_by_role("button", name="Load the upload").click()
    expect(page.locator("#data-report")).to_contain_text("mix.json + images.zip: 40 of 40 samples usable")
    expect(page.locator("#data-report")).to_contain_text("inside the folder 'images/' of images.zip")
    expect(page.locator("#mask-preview .tok-instruction.tok-in").first).to_be_visible()
    summary = page.locator("#length-summary")
    expect(summary).to_contain_text("2 of 40 samples (5%) are longer than max_length")
    screenshot(page, tmp_path, "7-data-upload")
    # The one-click fix sets the Train tab's Max length to the longest sample.
    longest = re.search(r"raise Max length to (\d+)", summary.inner_text()).group(1)
    page.locator("#length-fix").click()
    page.get_by_role("tab", name="2 · Train").click()
    page.get_by_role("button", name="Length and images").click()
    expect(page.get_by_label("Max length (tokens)")).to_have_value(longest)
