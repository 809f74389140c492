"""Which HF tensors make each megatron-core parameter of this rank, and the way back.

Every local parameter of a GPTModel chunk is classified once (:func:`classify`) into a
:class:`ParamRef`: its role, global layer and global expert. :class:`HFToMegatron` builds the
rank-local tensor for a ref from an HF folder, reading only the tensors (or the expert slice of
a fused tensor) it needs; :func:`to_hf` turns full (world-1) megatron tensors back into HF ones.
Names come from the architecture table; nothing here is model-specific.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from megatron_pr2.convert import architectures as A
from megatron_pr2.convert.architectures import Architecture
from megatron_pr2.convert.errors import ConversionError
from megatron_pr2.convert.hf_config import HFModelShape
from megatron_pr2.convert.safetensors_io import SafetensorsReader
from megatron_pr2.convert.transforms import (
    fuse_qkv,
    gate_up_shard,
    shard,
    split_gate_up,
    split_qkv,
)

_LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_EXPERT_RE = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.(linear_fc1|linear_fc2)\.weight$")
_LAYER_ROLES = {
    "input_layernorm.weight": "input_norm",
    "self_attention.linear_qkv.weight": "qkv",
    "self_attention.linear_proj.weight": "proj",
    "self_attention.q_layernorm.weight": "q_norm",
    "self_attention.k_layernorm.weight": "k_norm",
    "pre_mlp_layernorm.weight": "pre_mlp_norm",
    "mlp.router.weight": "router",
    "mlp.router.evolution_predictor.weight": "predictor",
    "mlp.linear_fc1.weight": "dense_fc1",
    "mlp.linear_fc2.weight": "dense_fc2",
}
_GLOBAL_ROLES = {
    A.EMBEDDING: "embedding",
    A.OUTPUT_LAYER: "output",
    A.FINAL_NORM: "final_norm",
}


@dataclass(frozen=True)
class ParamRef:
    """One local parameter: its local name, role, global layer (0-based) and global expert."""

    name: str
    role: str
    layer: int | None = None
    expert: int | None = None

    @property
    def global_name(self) -> str:
        """Layout-independent megatron name (global layer and expert numbers)."""
        if self.layer is None:
            return self.name
        local = _LAYER_RE.match(self.name)
        assert local is not None
        rest = local.group(2)
        if self.expert is not None:
            fc = _EXPERT_RE.match(rest)
            assert fc is not None
            rest = f"mlp.experts.{self.expert}.{fc.group(2)}.weight"
        return f"decoder.layers.{self.layer}.{rest}"


@dataclass(frozen=True)
class Ranks:
    """This rank's coordinates in the layout that the tensors are sharded for."""

    tp_rank: int = 0
    tp_size: int = 1
    etp_rank: int = 0
    etp_size: int = 1
    ep_rank: int = 0
    num_local_experts: int = 0

    @classmethod
    def current(cls, num_experts: int) -> Ranks:
        """This process's coordinates in megatron's current parallel state."""
        from megatron.core import parallel_state as ps

        ep = ps.get_expert_model_parallel_world_size()
        return cls(
            tp_rank=ps.get_tensor_model_parallel_rank(),
            tp_size=ps.get_tensor_model_parallel_world_size(),
            etp_rank=ps.get_expert_tensor_parallel_rank(),
            etp_size=ps.get_expert_tensor_parallel_world_size(),
            ep_rank=ps.get_expert_model_parallel_rank(),
            num_local_experts=num_experts // ep,
        )


def classify(chunk: torch.nn.Module, ranks: Ranks) -> Iterator[tuple[ParamRef, torch.Tensor]]:
    """(ref, parameter) for every parameter of ``chunk``; unknown names are an error."""
    layers = chunk.decoder.layers if hasattr(chunk, "decoder") else []
    offsets = [layer.layer_number - 1 for layer in layers]
    for name, param in chunk.named_parameters():
        if name in _GLOBAL_ROLES:
            yield ParamRef(name, _GLOBAL_ROLES[name]), param
            continue
        match = _LAYER_RE.match(name)
        if match is None:
            raise ConversionError(f"megatron parameter {name!r} has no mapping")
        layer = offsets[int(match.group(1))]
        rest = match.group(2)
        expert = _EXPERT_RE.match(rest)
        if expert is not None:
            glob = ranks.ep_rank * ranks.num_local_experts + int(expert.group(1))
            role = "expert_fc1" if expert.group(2) == "linear_fc1" else "expert_fc2"
            yield ParamRef(name, role, layer, glob), param
        elif rest in _LAYER_ROLES:
            yield ParamRef(name, _LAYER_ROLES[rest], layer), param
        else:
            raise ConversionError(f"megatron parameter {name!r} has no mapping")


class HFToMegatron:
    """Builds rank-local megatron tensors from an HF folder, checking every shape."""

    def __init__(
        self,
        arch: Architecture,
        shape: HFModelShape,
        reader: SafetensorsReader,
        ranks: Ranks,
        padded_vocab_size: int,
        predictor_reader: SafetensorsReader | None = None,
    ) -> None:
        self.arch, self.s, self.reader, self.ranks = arch, shape, reader, ranks
        self.padded_vocab_size = padded_vocab_size
        self.predictor_reader = predictor_reader

    # ---- HF names and expected shapes
    def _n(self, template: str, ref: ParamRef, expert: int | None = None) -> str:
        return template.format(layer=ref.layer, expert=expert if expert is not None else "")

    def _fused(self, ref: ParamRef) -> bool:
        return self._n(self.arch.experts.fused_gate_up, ref) in self.reader

    def _part(
        self, name: str, shape: tuple[int, ...], dim: int, rank: int, size: int, lead: tuple = ()
    ) -> torch.Tensor:
        """Rank ``rank``'s chunk (of ``size``) along ``dim`` of ``name[lead]``, reading only that
        chunk from disk. ``shape`` is the full on-disk shape (checked); ``dim`` counts after
        ``lead``."""
        sub_shape = shape[len(lead) :]
        step = sub_shape[dim] // size
        index = (*lead, *([slice(None)] * dim), slice(rank * step, (rank + 1) * step))
        return self.reader.get(name, shape, index=index)

    def _vocab_rows(self, name: str) -> torch.Tensor:
        s, r = self.s, self.ranks
        if self.padded_vocab_size == s.vocab_size:
            return self._part(name, (s.vocab_size, s.hidden_size), 0, r.tp_rank, r.tp_size)
        full = self.reader.get(name, (s.vocab_size, s.hidden_size))
        pad = full.new_zeros(self.padded_vocab_size - s.vocab_size, s.hidden_size)
        return shard(torch.cat([full, pad]), 0, r.tp_rank, r.tp_size)

    def load(self, ref: ParamRef) -> torch.Tensor:
        """The rank-local value of ``ref`` (same shape as the parameter)."""
        s, r, names = self.s, self.ranks, self.arch.attention_names()
        hd, heads, kv, hidden = (
            s.head_dim,
            s.num_attention_heads,
            s.num_key_value_heads,
            s.hidden_size,
        )
        role = ref.role
        if role == "embedding":
            return self._vocab_rows(A.HF_EMBEDDING)
        if role == "output":
            if A.HF_LM_HEAD not in self.reader and s.tie_word_embeddings:
                return self._vocab_rows(A.HF_EMBEDDING)
            return self._vocab_rows(A.HF_LM_HEAD)
        if role == "final_norm":
            return self.reader.get(A.HF_FINAL_NORM, (hidden,))
        if role == "input_norm":
            return self.reader.get(self._n(A.HF_INPUT_NORM, ref), (hidden,))
        if role == "pre_mlp_norm":
            return self.reader.get(self._n(A.HF_POST_ATTN_NORM, ref), (hidden,))
        if role == "qkv":
            # the rank's query groups are contiguous rows of q, k and v: read only those
            tp = (r.tp_rank, r.tp_size)
            q = self._part(self._n(names["q"], ref), (heads * hd, hidden), 0, *tp)
            k = self._part(self._n(names["k"], ref), (kv * hd, hidden), 0, *tp)
            v = self._part(self._n(names["v"], ref), (kv * hd, hidden), 0, *tp)
            return fuse_qkv(q, k, v, kv // r.tp_size, hd)
        if role == "proj":
            return self._part(
                self._n(names["o"], ref), (hidden, heads * hd), 1, r.tp_rank, r.tp_size
            )
        if role in ("q_norm", "k_norm"):
            count = heads if role == "q_norm" else kv
            if self.arch.qk_norm == "full":
                return self._part(self._n(names[role], ref), (count * hd,), 0, r.tp_rank, r.tp_size)
            return self.reader.get(self._n(names[role], ref), (hd,))
        if role == "router":
            name = self.arch.experts.fused_router if self._fused(ref) else self.arch.experts.router
            return self.reader.get(self._n(name, ref), (s.num_experts, hidden))
        if role == "predictor":
            if self.predictor_reader is None:
                return torch.zeros(s.num_experts, hidden)
            return self.predictor_reader.get(ref.global_name, (s.num_experts, hidden))
        if role in ("expert_fc1", "expert_fc2"):
            return self._expert(ref)
        if role == "dense_fc1":
            ffn = s.dense_ffn_hidden_size
            tp = (r.tp_rank, r.tp_size)
            gate = self._part(self._n(A.HF_DENSE_MLP["gate"], ref), (ffn, hidden), 0, *tp)
            up = self._part(self._n(A.HF_DENSE_MLP["up"], ref), (ffn, hidden), 0, *tp)
            return torch.cat([gate, up])
        if role == "dense_fc2":
            ffn = s.dense_ffn_hidden_size
            name = self._n(A.HF_DENSE_MLP["down"], ref)
            return self._part(name, (hidden, ffn), 1, r.tp_rank, r.tp_size)
        raise ConversionError(f"megatron parameter {ref.name!r}: no rule for role {role!r}")

    def _expert(self, ref: ParamRef) -> torch.Tensor:
        """One expert's ETP shard, read expert by expert (and chunk by chunk) from either
        on-disk layout."""
        s, e, names = self.s, ref.expert, self.arch.experts
        ffn, hidden, num = s.moe_ffn_hidden_size, s.hidden_size, s.num_experts
        etp = (self.ranks.etp_rank, self.ranks.etp_size)
        if self._fused(ref):
            if ref.role == "expert_fc2":
                name = self._n(names.fused_down, ref)
                return self._part(name, (num, hidden, ffn), 1, *etp, lead=(e,))
            name = self._n(names.fused_gate_up, ref)
            # [E, 2I, H]: gate rows, then up rows; the rank's chunk of each
            halves = self._part(name, (num, 2 * ffn, hidden), 0, 0, 1, lead=(e,)).chunk(2)
            return gate_up_shard(halves[0], halves[1], *etp)
        if ref.role == "expert_fc2":
            return self._part(self._n(names.down, ref, e), (hidden, ffn), 1, *etp)
        gate = self._part(self._n(names.gate, ref, e), (ffn, hidden), 0, *etp)
        up = self._part(self._n(names.up, ref, e), (ffn, hidden), 0, *etp)
        return torch.cat([gate, up])


def to_hf(
    arch: Architecture,
    shape: HFModelShape,
    ref: ParamRef,
    tensor: torch.Tensor,
    fused_experts: bool,
) -> dict[str, torch.Tensor]:
    """HF tensors of one full (unsharded, world-1) megatron tensor. Fused experts are
    returned per expert under the fused name with an ``[expert]`` suffix; the caller stacks."""
    s, names = shape, arch.attention_names()
    fmt = {"layer": ref.layer, "expert": ref.expert}
    role = ref.role
    if role == "embedding":
        return {A.HF_EMBEDDING: tensor[: s.vocab_size]}
    if role == "output":
        return {A.HF_LM_HEAD: tensor[: s.vocab_size]}
    if role == "final_norm":
        return {A.HF_FINAL_NORM: tensor}
    if role == "input_norm":
        return {A.HF_INPUT_NORM.format(**fmt): tensor}
    if role == "pre_mlp_norm":
        return {A.HF_POST_ATTN_NORM.format(**fmt): tensor}
    if role == "qkv":
        q, k, v = split_qkv(tensor, s.num_key_value_heads, s.head_dim)
        return {names[n].format(**fmt): t for n, t in (("q", q), ("k", k), ("v", v))}
    if role in ("proj", "q_norm", "k_norm"):
        key = {"proj": "o"}.get(role, role)
        return {names[key].format(**fmt): tensor}
    if role == "router":
        name = arch.experts.fused_router if fused_experts else arch.experts.router
        return {name.format(**fmt): tensor}
    if role == "dense_fc1":
        gate, up = split_gate_up(tensor)
        return {A.HF_DENSE_MLP["gate"].format(**fmt): gate, A.HF_DENSE_MLP["up"].format(**fmt): up}
    if role == "dense_fc2":
        return {A.HF_DENSE_MLP["down"].format(**fmt): tensor}
    if role == "expert_fc1":
        if fused_experts:
            return {arch.experts.fused_gate_up.format(**fmt) + f"[{ref.expert}]": tensor}
        gate, up = split_gate_up(tensor)
        return {arch.experts.gate.format(**fmt): gate, arch.experts.up.format(**fmt): up}
    if role == "expert_fc2":
        if fused_experts:
            return {arch.experts.fused_down.format(**fmt) + f"[{ref.expert}]": tensor}
        return {arch.experts.down.format(**fmt): tensor}
    raise ConversionError(f"megatron parameter {ref.name!r}: no HF name for role {role!r}")
