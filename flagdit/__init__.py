"""The thin Flag-DiT model on flagdit_kernels: configs, model, flow-matching loss, sampler, checkpoints."""

from . import configs, flow
from .checkpoint import load_lumina
from .configs import FlagDiTConfig, get_config
from .model import FlagDiT, TextContext
from .sampling import sample

__all__ = ["FlagDiT", "FlagDiTConfig", "TextContext", "configs", "flow", "get_config", "load_lumina", "sample"]
