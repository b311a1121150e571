"""spinlab: self-play fine-tuning (SPIN, arXiv 2401.01335) with Lightning and Hydra."""

__version__ = "0.1.0"
