"""Models defined outside the `diffusion_models` package (see examples/README.md)."""
