"""diffscrub: erase a visual concept from a latent diffusion model with only unlabeled images."""

__version__ = "0.1.0"
