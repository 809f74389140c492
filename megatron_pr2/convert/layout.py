"""The target parallel layout of a conversion, and the check that it divides the model.

megatron-core asserts deep inside model construction when a size does not divide (or, for
some splits, silently builds something else); checking up front gives one message that names
every offending setting before any process starts work.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from megatron_pr2.convert.errors import ConversionError


@dataclass(frozen=True)
class ConvertLayout:
    """TP/PP/EP/ETP (and virtual PP) sizes; data parallel is whatever world size is left."""

    tp: int = 1
    pp: int = 1
    ep: int = 1
    etp: int | None = None
    vp: int | None = None

    @property
    def model_parallel_size(self) -> int:
        """The smallest world size that holds both the dense and the expert layout."""
        dense = self.tp * self.pp
        expert = self.ep * (self.etp or self.tp) * self.pp
        return math.lcm(dense, expert)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def check(self, transformer_config: dict[str, Any], vocab_size: int, world_size: int) -> None:
        """Raise :class:`ConversionError` listing every size this layout does not divide."""
        c = transformer_config
        etp = self.etp or self.tp
        problems = []
        for name, value in (("tp", self.tp), ("pp", self.pp), ("ep", self.ep), ("etp", etp)):
            if value < 1:
                problems.append(f"{name}={value} must be >= 1")
        if problems:
            raise ConversionError("layout: " + "; ".join(problems))

        def need(what: str, total: int, by: int, label: str) -> None:
            if total % by:
                problems.append(f"{what}={total} is not divisible by {label}={by}")

        need("num_attention_heads", c["num_attention_heads"], self.tp, "tp")
        need("num_key_value_heads", c["num_query_groups"], self.tp, "tp")
        need("vocab_size", vocab_size, self.tp, "tp")
        need("num_experts", c["num_moe_experts"], self.ep, "ep")
        need("moe_intermediate_size", c["moe_ffn_hidden_size"], etp, "etp")
        if "moe_layer_freq" in c:
            need("intermediate_size", c["ffn_hidden_size"], self.tp, "tp")
        stages = self.pp * (self.vp or 1)
        need("num_layers", c["num_layers"], stages, "pp*vp")
        if self.vp and self.pp < 2:
            problems.append("vp needs pp >= 2")
        dense, expert = self.tp * self.pp, self.ep * etp * self.pp
        if world_size % dense or world_size % expert:
            problems.append(
                f"world size {world_size} is not a multiple of tp*pp={dense} and ep*etp*pp={expert}"
            )
        if problems:
            raise ConversionError(
                f"layout {self} does not divide the model: " + "; ".join(problems)
            )
