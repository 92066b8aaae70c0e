"""AddSR: few-step blind super-resolution by adversarial diffusion distillation, on Lightning + Hydra."""

import logging

__version__ = "0.1.0"

# diffusers imports peft, which imports bitsandbytes whenever it is installed (the `adam8bit` extra); on a
# CPU with AVX512-BF16 its import tries a 4-bit kernel from the hub and logs its failure on every start.
# No code path here uses 4-bit kernels (8-bit AdamW does not), so only that one message is dropped.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    lambda record: not record.getMessage().startswith("Failed to load CPU gemm_4bit_forward")
)
