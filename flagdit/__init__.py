"""The thin Flag-DiT model on flagdit_kernels: configs, model, flow-matching loss, sampler, checkpoints."""

from . import configs, flow
from .configs import FlagDiTConfig, get_config
from .lumina import load_lumina
from .model import FlagDiT, TextContext
from .sampling import sample

__all__ = ["FlagDiT", "FlagDiTConfig", "TextContext", "configs", "flow", "get_config", "load_lumina", "sample"]
