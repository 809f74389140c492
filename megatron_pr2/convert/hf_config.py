"""Read a Hugging Face ``config.json`` into one normalised description of the model shape.

transformers 4.x and 5.x spell the same config differently (``num_experts`` vs
``num_local_experts``, top-level ``rope_theta`` vs ``rope_parameters.rope_theta``); a file
written by one major version must convert the same as one written by the other, so every
spelling is read here and nowhere else. A setting the file leaves out takes the default of
transformers' config class for the ``model_type`` (``hf_defaults``), as it does when
transformers loads the folder; the settings that fix tensor shapes or routing must be present.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_pr2.convert.errors import ConversionError
from megatron_pr2.convert.hf_defaults import transformers_config

_MISSING = object()


@dataclass(frozen=True)
class HFModelShape:
    """What the converter needs from an HF config, whatever spelling it came in."""

    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    num_experts: int
    moe_topk: int
    moe_ffn_hidden_size: int
    dense_ffn_hidden_size: int
    moe_layers: tuple[bool, ...]
    rope_theta: float
    rms_norm_eps: float
    norm_topk_prob: bool
    tie_word_embeddings: bool
    max_position_embeddings: int


def read_config_json(folder: str | Path) -> dict[str, Any]:
    """The raw ``config.json`` of an HF folder (kept verbatim for the way back)."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ConversionError(f"{path}: no config.json in the Hugging Face folder")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConversionError(f"{path}: not valid JSON ({exc})") from None


def _first(config: dict[str, Any], names: tuple[str, ...]) -> Any:
    """Value of the first spelling in ``names`` that ``config`` sets (``_MISSING`` if none)."""
    for name in names:
        if config.get(name) is not None:
            return config[name]
    return _MISSING


def _spelled(names: tuple[str, ...]) -> str:
    return " / ".join(repr(n) for n in names)


class HFSettings:
    """One setting at a time from ``config.json``, under any of its spellings.

    :meth:`required` settings must be in the file. :meth:`value` settings the file leaves out
    take the default of transformers' config class for the ``model_type`` (computed once, from
    this config, so derived defaults apply). Spellings are tried on the file first, then on the
    defaults, so a default never wins over the file's value under another spelling.
    """

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self._defaults: dict[str, Any] | None = None
        self._defaults_read = False

    @property
    def model_type(self) -> str:
        return str(self.required("model_type"))

    def defaults(self) -> dict[str, Any] | None:
        """transformers' completed config for this file (``None`` without transformers)."""
        if not self._defaults_read:
            self._defaults = transformers_config(self.config)
            self._defaults_read = True
        return self._defaults

    def required(self, *names: str) -> Any:
        """A setting that fixes tensor shapes or routing: refused when the file lacks it."""
        value = _first(self.config, names)
        if value is _MISSING:
            raise ConversionError(f"config.json: missing key {_spelled(names)}")
        return value

    def value(self, *names: str, fallback: Any = _MISSING) -> Any:
        """The file's value, else transformers' default for the ``model_type``, else
        ``fallback`` (the meaning of an unset value, e.g. ``head_dim`` -> hidden / heads);
        refused when none applies."""
        value = _first(self.config, names)
        if value is not _MISSING:
            return value
        defaults = self.defaults()  # only now: a complete file never meets the class
        if defaults is not None:
            value = _first(defaults, names)
        if value is not _MISSING:
            return value
        if fallback is not _MISSING:
            return fallback
        why = (
            "no transformers config class to read defaults from: transformers is not "
            "installed or does not know this model_type"
            if defaults is None
            else "its transformers config class has no default either"
        )
        raise ConversionError(
            f"config.json: missing key {_spelled(names)} and no default for "
            f"model_type={self.config.get('model_type')!r} ({why}; set it in config.json)"
        )


def _check_rope_type(source: str, block: dict[str, Any]) -> None:
    kind = block.get("rope_type", block.get("type", "default"))
    if kind not in ("default", None):
        raise ConversionError(
            f"config.json: {source}.rope_type={kind!r} is not supported (plain RoPE only)"
        )


def check_rope_variant(config: dict[str, Any]) -> None:
    """Refuse a RoPE variant other than plain RoPE, before transformers' class sees (and
    maybe rejects) the file for another reason."""
    _check_rope_type("rope_parameters", config.get("rope_parameters") or {})
    _check_rope_type("rope_scaling", config.get("rope_scaling") or {})


def rope_theta(settings: HFSettings) -> float:
    """``rope_parameters.rope_theta`` (5.x) or top-level ``rope_theta`` (4.x), else the
    ``model_type``'s default; only plain RoPE."""
    config = settings.config
    check_rope_variant(config)
    params = config.get("rope_parameters") or {}
    for value in (params.get("rope_theta"), config.get("rope_theta")):
        if value is not None:
            return float(value)
    default_params = (settings.defaults() or {}).get("rope_parameters") or {}
    _check_rope_type("(default) rope_parameters", default_params)
    if default_params.get("rope_theta") is not None:
        return float(default_params["rope_theta"])
    return float(settings.value("rope_theta"))


def moe_layer_pattern(settings: HFSettings, num_layers: int) -> tuple[bool, ...]:
    """Which layers are MoE: Qwen-style ``decoder_sparse_step`` / ``mlp_only_layers``."""
    step = int(settings.value("decoder_sparse_step", fallback=1))
    dense = set(settings.value("mlp_only_layers", fallback=[]))
    return tuple((i not in dense) and (i + 1) % step == 0 for i in range(num_layers))


def read_shape(config: dict[str, Any] | HFSettings) -> HFModelShape:
    """Normalise ``config`` (either transformers spelling) into an :class:`HFModelShape`."""
    settings = config if isinstance(config, HFSettings) else HFSettings(config)
    theta = rope_theta(settings)  # first: an unsupported RoPE variant is the error to report
    hidden = int(settings.required("hidden_size"))
    heads = int(settings.required("num_attention_heads"))
    num_layers = int(settings.required("num_hidden_layers"))
    moe_ffn = int(settings.required("moe_intermediate_size", "intermediate_size"))
    return HFModelShape(
        model_type=settings.model_type,
        vocab_size=int(settings.required("vocab_size")),
        hidden_size=hidden,
        num_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=int(settings.value("num_key_value_heads")),
        head_dim=int(settings.value("head_dim", fallback=hidden // heads)),
        num_experts=int(settings.required("num_experts", "num_local_experts", "n_routed_experts")),
        moe_topk=int(settings.required("num_experts_per_tok")),
        moe_ffn_hidden_size=moe_ffn,
        dense_ffn_hidden_size=int(settings.value("intermediate_size", fallback=moe_ffn)),
        moe_layers=moe_layer_pattern(settings, num_layers),
        rope_theta=theta,
        rms_norm_eps=float(settings.value("rms_norm_eps")),
        # unset (Mixtral's class) means off, as in transformers' ``if config.norm_topk_prob``
        norm_topk_prob=bool(settings.value("norm_topk_prob", fallback=False)),
        tie_word_embeddings=bool(settings.value("tie_word_embeddings")),
        max_position_embeddings=int(settings.value("max_position_embeddings")),
    )
