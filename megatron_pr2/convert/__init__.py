"""Checkpoint conversion between Hugging Face MoE models and megatron-core dist checkpoints.

``hf_to_mcore`` writes a ``torch_dist`` checkpoint at any TP/PP/EP/ETP layout plus
``pr2_model.json``; ``build_model_chunks_from_description`` rebuilds the model for a trainer;
``mcore_to_hf`` goes back from any saved layout. The per-architecture mapping is one table
(``architectures.py``).
"""

from megatron_pr2.convert.architectures import ARCHITECTURES, architecture_for
from megatron_pr2.convert.errors import ConversionError
from megatron_pr2.convert.hf_to_mcore import ConversionStats, hf_to_mcore
from megatron_pr2.convert.layout import ConvertLayout
from megatron_pr2.convert.mcore_to_hf import PREDICTOR_FILE, load_chunks, mcore_to_hf
from megatron_pr2.convert.model import (
    DESCRIPTION_NAME,
    ModelDescription,
    build_model_chunks_from_description,
    load_converted_model_description,
    transformer_config_from_description,
)

__all__ = [
    "ARCHITECTURES",
    "DESCRIPTION_NAME",
    "PREDICTOR_FILE",
    "ConversionError",
    "ConversionStats",
    "ConvertLayout",
    "ModelDescription",
    "architecture_for",
    "build_model_chunks_from_description",
    "hf_to_mcore",
    "load_chunks",
    "load_converted_model_description",
    "mcore_to_hf",
    "transformer_config_from_description",
]
