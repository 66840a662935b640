"""Qwen2-VL's processor built for images, without torchvision: it loads a hub-shaped folder,
expands images as transformers' processor does, and saves under transformers' own class name."""

import json

from PIL import Image

from l2t.processors import Qwen2VLProcessor, processor_class


def test_qwen2_vl_is_built_for_images_and_other_models_by_auto_processor():
    from transformers import AutoProcessor

    assert processor_class("Qwen2VLForConditionalGeneration") is Qwen2VLProcessor
    assert processor_class("LlavaForConditionalGeneration") is AutoProcessor


def test_qwen2_vl_processor_loads_expands_and_saves_as_transformers_class(hub_folder, tmp_path):
    processor = Qwen2VLProcessor.from_pretrained(hub_folder("qwen2-vl-2b"))
    assert not hasattr(processor, "video_processor")
    text = ["<|vision_start|><|image_pad|><|vision_end|>What is in the picture?"]
    image = [Image.new("RGB", (112, 56), (200, 30, 30))]
    inputs = processor(text=text, images=image)
    # 112 x 56 px: 8 x 4 patches of 14 px, merged 2 x 2 -> 8 image tokens
    assert processor.tokenizer.convert_ids_to_tokens(inputs["input_ids"][0])[:10] == ["<|vision_start|>", *["<|image_pad|>"] * 8, "<|vision_end|>"]
    assert inputs["image_grid_thw"].tolist() == [[1, 4, 8]]

    processor.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "processor_config.json").read_text())["processor_class"] == "Qwen2VLProcessor"
    again = Qwen2VLProcessor.from_pretrained(tmp_path)
    assert again(text=text, images=image)["input_ids"] == inputs["input_ids"]
    assert again.chat_template == processor.chat_template
