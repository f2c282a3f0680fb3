"""diffusion_models: a reproducible benchmark of likelihood-based generative models."""
__version__ = "0.1.0"
