"""crossfield.model: the enhanced multi-head MACE, graphs and checkpoints."""

from .checkpoint import load_checkpoint, read_checkpoint_metadata, save_checkpoint
from .config import HeadConfig, ModelConfig
from .evaluate import evaluate
from .graph import GraphBatch, Structure, build_batch, neighbour_list
from .mace import CrossfieldMACE, build_model

__all__ = [
    "CrossfieldMACE",
    "GraphBatch",
    "HeadConfig",
    "ModelConfig",
    "Structure",
    "build_batch",
    "build_model",
    "evaluate",
    "load_checkpoint",
    "neighbour_list",
    "read_checkpoint_metadata",
    "save_checkpoint",
]
