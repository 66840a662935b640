"""L2T Studio: fine-tune small vision-language models with QLoRA and the L2T loss."""

__version__ = "0.1.0"
