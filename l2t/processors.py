"""Processors that `AutoProcessor` can't build here: Qwen2-VL's, for images only.

transformers builds Qwen2-VL's processor from three parts, the third being a video
processor that needs torchvision ("Qwen2VLVideoProcessor requires the Torchvision
library"). requirements.txt has no torchvision, on purpose: each torchvision wheel is
built against one torch release, and PyPI's torchvision 0.28.0 installed beside our
pinned torch 2.13.0 (CPU build) fails to import ("operator torchvision::nms does not
exist"); the only matching pair found, torch 2.14.1 + torchvision 0.29.1, is a 5.5 GB
CUDA build, so pinning torchvision would move the torch pin and every install with it.
Tuning here is on images, so the processor is built from what images need: the folder's
tokenizer, image processor and chat template, with transformers' own processing code.

    from l2t.processors import processor_class
    processor = processor_class("Qwen2VLForConditionalGeneration").from_pretrained(folder)
"""

from __future__ import annotations

from transformers import AutoProcessor
from transformers.models.qwen2_vl import processing_qwen2_vl
from transformers.processing_utils import ProcessorMixin


class Qwen2VLProcessor(processing_qwen2_vl.Qwen2VLProcessor):
    """transformers' Qwen2-VL processor without its video processor (images and text only).

    It keeps transformers' class name, so a processor it saves (a merged model's) names
    transformers' own class and loads without l2t.
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        # What transformers' __init__ sets for images; the parts (image processor, tokenizer) come from
        # this signature, so from_pretrained loads these two and no video processor.
        self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
        self.image_token_id = getattr(tokenizer, "image_token_id", None) or tokenizer.convert_tokens_to_ids(self.image_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template, **kwargs)


IMAGE_PROCESSORS = {"Qwen2VLForConditionalGeneration": Qwen2VLProcessor}
"""Model class -> the processor class l2t builds instead of AutoProcessor's pick."""


def processor_class(model_class: str):
    """The class whose `from_pretrained` loads the processor of a `model_class` folder."""
    return IMAGE_PROCESSORS.get(model_class, AutoProcessor)
