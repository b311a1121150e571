"""Synthetic responses from the opponent: one plan and row format (`base`), one file per backend.

`generation=hf` (`hf.HFGenerator`), `generation=static` (`static.StaticCacheGenerator`) and
`generation=vllm` (`vllm.VLLMGenerator`, whose engine runs `vllm_child.py` in vLLM's own
environment) return the same rows and resume the same way.
"""

from spinlab.generation.base import Generator, Rows, left_pad
from spinlab.generation.hf import HFGenerator
from spinlab.generation.static import StaticCacheGenerator
from spinlab.generation.vllm import VLLMGenerator

__all__ = ["Generator", "HFGenerator", "Rows", "StaticCacheGenerator", "VLLMGenerator", "left_pad"]
