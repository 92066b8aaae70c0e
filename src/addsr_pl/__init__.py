"""AddSR: few-step blind super-resolution by adversarial diffusion distillation, on Lightning + Hydra."""

__version__ = "0.1.0"
