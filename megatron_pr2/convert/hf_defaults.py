"""The values transformers gives the settings a ``config.json`` leaves out.

transformers loads a folder through its config class for the ``model_type``, so a missing
``rms_norm_eps`` or ``rope_theta`` is that class's default (Mixtral: 1e-5 and 1e6), not one
project-wide value: reading the defaults from the class itself is the only way the converted
model computes what transformers computes for the same folder. Without transformers the
converter cannot know them, and the caller refuses a missing setting instead of guessing.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from megatron_pr2.convert.errors import ConversionError


def transformers_config(config: Mapping[str, Any]) -> dict[str, Any] | None:
    """``config`` as transformers' config class for its ``model_type`` completes it (every
    default filled, derived ones such as ``num_key_value_heads`` included); ``None`` when
    transformers is not installed or does not know the ``model_type``."""
    try:
        from transformers import CONFIG_MAPPING
        from transformers.utils import logging as hf_logging
    except ImportError:
        return None
    model_type = config.get("model_type")
    if model_type not in CONFIG_MAPPING:
        return None
    config_class = CONFIG_MAPPING[model_type]
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its notes on token ids etc. are not the converter's
    try:
        completed = config_class.from_dict(copy.deepcopy(dict(config)))
    except Exception as exc:  # the class validates; say which class refused what
        raise ConversionError(
            f"config.json: transformers' {config_class.__name__} (model_type={model_type!r}) "
            f"rejects it: {exc}"
        ) from None
    finally:
        hf_logging.set_verbosity(verbosity)
    return completed.to_dict()
