"""L2T Studio: fine-tune small vision-language models with QLoRA and the L2T loss."""

import logging

__version__ = "0.1.0"

OPTIONAL_KERNEL_NOTICE = "Failed to load CPU gemm_4bit_forward from kernels-community"
"""bitsandbytes' lookup of an optional CPU kernel, logged as a warning at import; 4-bit works without it."""


class _WithoutOptionalKernelNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(OPTIONAL_KERNEL_NOTICE)


# Installed before anything imports bitsandbytes; the logger's other warnings still show.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_WithoutOptionalKernelNotice())
