"""AddSR: few-step blind super-resolution by adversarial diffusion distillation, on Lightning + Hydra."""

import logging

__version__ = "0.1.0"

# diffusers imports peft, which imports bitsandbytes whenever it is installed (the `adam8bit` extra); on a
# CPU with AVX512-BF16 its import asks the hub (through `kernels`) for a 4-bit kernel and logs the
# outcome on every start. No code path here uses 4-bit kernels (8-bit AdamW does not), so exactly those
# two messages are dropped.
_BITSANDBYTES_KERNEL_MESSAGES = {
    "bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward",
    "kernels._internals.hf_hub": "Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes'",
}
for _name, _start in _BITSANDBYTES_KERNEL_MESSAGES.items():
    logging.getLogger(_name).addFilter(lambda record, start=_start: not record.getMessage().startswith(start))

# Lightning logs "`weights_only` was not set, defaulting to `False`." each time it *saves* a checkpoint:
# it means that the optimizer and loop states are saved too, which resume needs. Every checkpoint is
# *read* weights-only here (`addsr_pl.resume`), and a message that says otherwise misleads.
logging.getLogger("pytorch_lightning.trainer.connectors.checkpoint_connector").addFilter(
    lambda record: not record.getMessage().startswith("`weights_only` was not set")
)
