"""Route traces: what every router did to a sample of tokens in one GRPO step, on disk.

Format (``pr2-route-trace`` version 1): one safetensors file per step,
``{logger.log_dir}/traces/step_{N:06d}.safetensors`` (no pickle; readable from any language).
Header metadata (strings): ``format``, ``version``, ``step``, ``mode``, ``topk``,
``num_experts``, ``num_mini_steps``, ``token_stride``. Tensors, for each MoE layer ``L``
(global, 1-based) that has a trace:

===================================  =========  ===============================================
name                                 dtype      meaning
===================================  =========  ===============================================
``layer_{L}/old/keys``               int64 [T]  token keys ``sample << 32 | position`` (padding
                                                 negative) of the old-log-prob pass
``layer_{L}/old/used``               int16 [T,k] experts that pass used: recorded live (r2,
                                                 none), predicted (pr2) or the engine's (r3)
``layer_{L}/old/live``               int16 [T,k] the router's own top-k in that pass
``layer_{L}/mini_step_{i}/keys``     int64 [T_i] tokens of mini-batch ``i`` (its update pass)
``layer_{L}/mini_step_{i}/used``     int16       experts used in mini-step ``i`` (replayed, or
                                                 live under ``none``)
``layer_{L}/mini_step_{i}/live``     int16       the router's live top-k after ``i`` updates
``layer_{L}/router_drift``           fp32 [1]    ||W_after - W_before|| / ||W_before|| of the
                                                 router weight over this step's updates
===================================  =========  ===============================================

Every ``token_stride``-th token of each router call is traced (the replay metrics' sample).
Tokens of mini-step ``i`` join the old pass by key: that is the route after ``i`` updates
(the horizon) of a token whose route was fixed in the old pass.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from megatron_pr2.replay.session import RouteTrace

__all__ = ["FORMAT", "VERSION", "StepTrace", "read_step_trace", "trace_path", "write_step_trace"]

FORMAT = "pr2-route-trace"
VERSION = "1"
REQUIRED_METADATA = (
    "format",
    "version",
    "step",
    "mode",
    "topk",
    "num_experts",
    "num_mini_steps",
    "token_stride",
)


@dataclass
class StepTrace:
    step: int
    mode: str
    topk: int
    num_experts: int
    num_mini_steps: int
    token_stride: int
    old: dict[int, RouteTrace] = field(default_factory=dict)
    mini_steps: list[dict[int, RouteTrace]] = field(default_factory=list)
    router_drift: dict[int, float] = field(default_factory=dict)

    @property
    def layers(self) -> list[int]:
        return sorted(set(self.old) | set(self.router_drift))


def trace_path(log_dir: str | Path, step: int) -> Path:
    return Path(log_dir) / "traces" / f"step_{step:06d}.safetensors"


def write_step_trace(path: str | Path, trace: StepTrace) -> None:
    """Write atomically (temp file + rename): a reader never sees half a trace."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}

    def put(prefix: str, routes: RouteTrace) -> None:
        tensors[f"{prefix}/keys"] = routes.keys.to(torch.int64).contiguous()
        tensors[f"{prefix}/used"] = routes.used.to(torch.int16).contiguous()
        tensors[f"{prefix}/live"] = routes.live.to(torch.int16).contiguous()

    for layer, routes in trace.old.items():
        put(f"layer_{layer}/old", routes)
    for i, per_layer in enumerate(trace.mini_steps):
        for layer, routes in per_layer.items():
            put(f"layer_{layer}/mini_step_{i}", routes)
    for layer, drift in trace.router_drift.items():
        tensors[f"layer_{layer}/router_drift"] = torch.tensor([drift], dtype=torch.float32)
    metadata = {
        "format": FORMAT,
        "version": VERSION,
        "step": str(trace.step),
        "mode": trace.mode,
        "topk": str(trace.topk),
        "num_experts": str(trace.num_experts),
        "num_mini_steps": str(trace.num_mini_steps),
        "token_stride": str(trace.token_stride),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def read_step_trace(path: str | Path) -> StepTrace:
    """Read and validate one trace file; errors name the file and the key."""
    from safetensors import safe_open

    path = Path(path)
    try:
        handle = safe_open(str(path), framework="pt")
    except Exception as err:  # safetensors raises its own error types for corrupt files
        raise ValueError(f"{path}: not a readable safetensors file ({err})") from None
    with handle as f:
        meta: dict[str, Any] = f.metadata() or {}
        for key in REQUIRED_METADATA:
            if key not in meta:
                raise ValueError(f"{path}: metadata key '{key}' missing (not a {FORMAT} file?)")
        if meta["format"] != FORMAT or meta["version"] != VERSION:
            raise ValueError(
                f"{path}: format {meta['format']!r} version {meta['version']!r}; "
                f"expected {FORMAT!r} version {VERSION!r}"
            )
        trace = StepTrace(
            step=int(meta["step"]),
            mode=meta["mode"],
            topk=int(meta["topk"]),
            num_experts=int(meta["num_experts"]),
            num_mini_steps=int(meta["num_mini_steps"]),
            token_stride=int(meta["token_stride"]),
        )
        trace.mini_steps = [{} for _ in range(trace.num_mini_steps)]
        groups: dict[str, dict[str, torch.Tensor]] = {}
        for name in f.keys():
            layer_part, _, rest = name.partition("/")
            if not layer_part.startswith("layer_") or not layer_part[6:].isdigit():
                raise ValueError(f"{path}: unexpected tensor '{name}'")
            layer = int(layer_part[6:])
            if rest == "router_drift":
                trace.router_drift[layer] = float(f.get_tensor(name)[0])
                continue
            group, _, field_name = rest.rpartition("/")
            if field_name not in ("keys", "used", "live"):
                raise ValueError(f"{path}: unexpected tensor '{name}'")
            groups.setdefault(f"{layer}|{group}", {})[field_name] = f.get_tensor(name)
    for ident, parts in groups.items():
        layer_text, group = ident.split("|")
        missing = {"keys", "used", "live"} - set(parts)
        if missing:
            raise ValueError(f"{path}: layer_{layer_text}/{group} lacks {sorted(missing)}")
        routes = RouteTrace(parts["keys"], parts["used"].long(), parts["live"].long())
        if not (routes.keys.shape[0] == routes.used.shape[0] == routes.live.shape[0]):
            raise ValueError(f"{path}: layer_{layer_text}/{group} has tensors of unequal length")
        if group == "old":
            trace.old[int(layer_text)] = routes
        elif group.startswith("mini_step_") and group[10:].isdigit():
            i = int(group[10:])
            if i >= trace.num_mini_steps:
                raise ValueError(f"{path}: {group} >= num_mini_steps {trace.num_mini_steps}")
            trace.mini_steps[i][int(layer_text)] = routes
        else:
            raise ValueError(f"{path}: unexpected group 'layer_{layer_text}/{group}'")
    return trace
