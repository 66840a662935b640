"""The UI's views of what the loss weighs and where the model looks (through gradio_client)."""

import re
import shutil

from gradio_client import handle_file
from PIL import Image


def test_the_mask_preview_of_l2t_relevance_is_a_heat_map(app):
    app.client.predict("tiny", "l2t", api_name="/use_demo_data")
    _, _, mask = app.client.predict("tiny", 12, "l2t_relevance", api_name="/mask_preview")
    found = re.findall(r'data-weight="([0-9.]+)" title="instruction, weight [0-9.]+: &#x27;(.*?)&#x27;"', mask)
    weights = {token: float(weight) for weight, token in found}
    assert weights, mask[:400]
    assert all(0 <= w <= 1 for w in weights.values())
    assert weights[" small"] > weights[" have"]  # the sample asks "What color does the small triangle on the left have?"
    _, _, plain = app.client.predict("tiny", 12, "l2t", api_name="/mask_preview")
    assert "tok-heat" not in plain


def test_compare_shows_where_each_model_looks(app, trained_run):
    shutil.copytree(trained_run, app.context.runs_dir / "looked", ignore=shutil.ignore_patterns("checkpoints"))
    picture, prompt, _ = app.client.predict("looked", api_name="/held_out_sample")
    chart, heat_map = app.client.predict("looked", handle_file(picture), prompt, api_name="/looks")
    for path in (chart, heat_map):
        with Image.open(path) as image:
            assert image.width > 300 and image.height > 200
