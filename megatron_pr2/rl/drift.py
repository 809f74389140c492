"""Router drift probe: is the router's change from one optimizer update to the next systematic
(a direction a predictor such as PR2's can extrapolate) or noise?

With ``logger.drift_probe_tokens: N`` (> 0) the trainer keeps a fixed probe batch (the first N
real tokens of the first rollout batch it trains on) and, after every optimizer update, runs it
forward (no gradients, live routing, no effect on training) and keeps every router's logits on
those tokens. With ``P_u`` the logits after update ``u`` and ``Δ_u = P_u - P_{u-1}``:

* **logit-change cosine** ``cos(Δ_u, Δ_{u+1})`` per layer: the same tokens, consecutive updates.
  A systematic drift gives a cosine clearly above 0; independent noise gives ~0 (its spread is
  ~1/sqrt(tokens * (experts - 1))). Each token's change is centred over the experts first:
  routing (top-k of softmax) ignores a shift of all of a token's logits, so that part of the
  change cannot move a route.
* **router-update cosine** ``cos(ΔW_u, ΔW_{u+1})`` of each router's weight matrix, and the
  **router-gradient cosine** of the gradients that made them. Adam's momentum alone correlates
  consecutive updates (independent gradients give an update cosine of about β1), so the gradient
  cosine, which has no momentum, is the one that says whether the *signal* is systematic.

File format (``pr2-drift-probe`` version 1), one safetensors file per GRPO step,
``{logger.log_dir}/drift/step_{N:06d}.safetensors``. Metadata (strings): ``format``,
``version``, ``step``, ``probe_step`` (the step whose rollout gave the probe tokens; files with
another ``probe_step`` hold other tokens), ``num_updates`` (U, the step's optimizer updates),
``adam_beta1``. Tensors:

=============================  ================  ==============================================
name                           dtype             meaning
=============================  ================  ==============================================
``keys``                       int64 [T]         probe token keys ``row << 32 | position``,
                                                 ascending (the order of every logits row)
``layer_{L}/logits``           fp32 [U+1, T, E]  router logits: point 0 before the step's first
                                                 update, point u after update u
``layer_{L}/update_cosine``    fp32 [U]          cos(ΔW_u, ΔW_{u-1}); NaN without a previous
``layer_{L}/grad_cosine``      fp32 [U]          cos(g_u, g_{u-1}); NaN when not measured
``layer_{L}/update_norm``      fp32 [U]          ||ΔW_u|| / ||W_{u-1}||
=============================  ================  ==============================================
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "FORMAT",
    "VERSION",
    "DriftProbe",
    "DriftStep",
    "centered",
    "change_cosines",
    "cosine",
    "drift_path",
    "read_drift_step",
    "step_metrics",
    "write_drift_step",
]

FORMAT = "pr2-drift-probe"
VERSION = "1"
METRIC_PREFIX = "drift/"
REQUIRED_METADATA = ("format", "version", "step", "probe_step", "num_updates", "adam_beta1")


# ---------------------------------------------------------------------------------- measures
def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine of two tensors as flat vectors (float64); NaN when either is zero."""
    a, b = a.double().flatten(), b.double().flatten()
    norms = float(a.norm() * b.norm())
    return float(a @ b) / norms if norms > 0 else float("nan")


def centered(change: torch.Tensor) -> torch.Tensor:
    """Each token's logit change minus its mean over the experts (last dim): the part that can
    move a route (top-k of softmax ignores a shift shared by all experts)."""
    return change - change.mean(dim=-1, keepdim=True)


def change_cosines(points: torch.Tensor, lag: int = 1) -> list[float]:
    """``cos(Δ_u, Δ_{u+lag})`` for the changes ``Δ_u = points[u+1] - points[u]`` of a sequence
    of logits ``[P, tokens, experts]`` on the same tokens (centred per token)."""
    changes = centered(points[1:].double() - points[:-1].double())
    return [cosine(changes[u], changes[u + lag]) for u in range(len(changes) - lag)]


# ---------------------------------------------------------------------------------- file format
@dataclass
class DriftStep:
    """One GRPO step's probe record (see the module docstring for the meaning of each field)."""

    step: int
    probe_step: int
    keys: torch.Tensor
    logits: dict[int, torch.Tensor] = field(default_factory=dict)  # [U+1, T, E]
    update_cosine: dict[int, torch.Tensor] = field(default_factory=dict)  # [U]
    grad_cosine: dict[int, torch.Tensor] = field(default_factory=dict)  # [U]
    update_norm: dict[int, torch.Tensor] = field(default_factory=dict)  # [U]
    adam_beta1: float = float("nan")

    @property
    def num_updates(self) -> int:
        return next(iter(self.logits.values())).shape[0] - 1 if self.logits else 0

    @property
    def layers(self) -> list[int]:
        return sorted(self.logits)


def drift_path(log_dir: str | Path, step: int) -> Path:
    return Path(log_dir) / "drift" / f"step_{step:06d}.safetensors"


_LAYER_FIELDS = ("logits", "update_cosine", "grad_cosine", "update_norm")


def write_drift_step(path: str | Path, record: DriftStep) -> None:
    """Write atomically (temp file + rename): a reader never sees half a record."""
    from safetensors.torch import save_file

    tensors = {"keys": record.keys.to(torch.int64).contiguous()}
    for name in _LAYER_FIELDS:
        for layer, value in getattr(record, name).items():
            tensors[f"layer_{layer}/{name}"] = value.to(torch.float32).contiguous()
    metadata = {
        "format": FORMAT,
        "version": VERSION,
        "step": str(record.step),
        "probe_step": str(record.probe_step),
        "num_updates": str(record.num_updates),
        "adam_beta1": repr(record.adam_beta1),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def read_drift_step(path: str | Path) -> DriftStep:
    """Read and validate one probe file; errors name the file and the tensor."""
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
        if "keys" not in f.keys():
            raise ValueError(f"{path}: tensor 'keys' missing")
        record = DriftStep(
            step=int(meta["step"]),
            probe_step=int(meta["probe_step"]),
            keys=f.get_tensor("keys"),
            adam_beta1=float(meta["adam_beta1"]),
        )
        for name in f.keys():
            if name == "keys":
                continue
            layer_part, _, field_name = name.partition("/")
            if (
                not layer_part.startswith("layer_")
                or not layer_part[6:].isdigit()
                or field_name not in _LAYER_FIELDS
            ):
                raise ValueError(f"{path}: unexpected tensor '{name}'")
            getattr(record, field_name)[int(layer_part[6:])] = f.get_tensor(name)
    updates = int(meta["num_updates"])
    for layer, logits in record.logits.items():
        if logits.dim() != 3 or logits.shape[0] != updates + 1:
            raise ValueError(
                f"{path}: layer_{layer}/logits has shape {tuple(logits.shape)}; expected "
                f"[{updates + 1}, tokens, experts]"
            )
        if logits.shape[1] != record.keys.shape[0]:
            raise ValueError(
                f"{path}: layer_{layer}/logits has {logits.shape[1]} tokens, keys "
                f"{record.keys.shape[0]}"
            )
    return record


def step_metrics(record: DriftStep, previous_change: dict[int, torch.Tensor]) -> dict[str, float]:
    """``drift/*`` scalars of one step: means over layers of the lag-1 cosines whose later
    change or update falls in this step (``previous_change``: each layer's last logit change of
    the step before, when the probe saw it)."""
    logit, update, grad, norm = [], [], [], []
    for layer, points in record.logits.items():
        before = previous_change.get(layer)
        if before is not None:  # prepend the previous step's last point
            points = torch.cat([points[:1] - before.to(points.dtype).unsqueeze(0), points])
        logit += change_cosines(points)
        update += record.update_cosine[layer].tolist() if layer in record.update_cosine else []
        grad += record.grad_cosine[layer].tolist() if layer in record.grad_cosine else []
        norm += record.update_norm[layer].tolist() if layer in record.update_norm else []

    def mean(values: list[float]) -> float:
        values = [v for v in values if math.isfinite(v)]
        return sum(values) / len(values) if values else float("nan")

    out = {
        "logit_change_cosine": mean(logit),
        "router_update_cosine": mean(update),
        "router_grad_cosine": mean(grad),
        "router_update_norm": mean(norm),
    }
    return {METRIC_PREFIX + k: v for k, v in out.items() if math.isfinite(v)}


# ---------------------------------------------------------------------------------- recording
def _routers(modules: Sequence[torch.nn.Module]) -> dict[int, torch.nn.Module]:
    """Every local MoE router by global layer number (any ``TopKRouter``, replay or not)."""
    from megatron.core.transformer.moe.router import TopKRouter

    out = {}
    for chunk in modules:
        for module in chunk.modules():
            if isinstance(module, TopKRouter) and module.layer_number is not None:
                out[int(module.layer_number)] = module
    return out


def _world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _gather(local: dict[int, Any]) -> list[dict[int, Any]]:
    if _world_size() == 1:
        return [local]
    gathered: list[Any] = [None] * _world_size()
    torch.distributed.all_gather_object(gathered, local)
    return gathered


def _adam_beta1(optimizer: Any) -> float:
    for candidate in [optimizer, *getattr(optimizer, "chained_optimizers", [])]:
        beta = getattr(getattr(candidate, "config", None), "adam_beta1", None)
        if beta is not None:
            return float(beta)
    return float("nan")


class DriftProbe:
    """Trainer-side recorder (see the module docstring). Call :meth:`start_step` with the
    rollout batch before a step's first update (the first call picks the probe tokens), let the
    worker call :meth:`after_update` after each optimizer update, then :meth:`finish_step`.

    Every rank runs the probe (megatron's collectives need it); data-parallel ranks split its
    micro-batches, pipeline stages and tensor/sequence-parallel ranks their layers and tokens,
    and the pieces are merged by token key. The gradient cosine is measured only where a rank
    holds its router's whole reduced gradient (not with the distributed optimizer at DP > 1).
    """

    def __init__(self, worker: Any, num_tokens: int, use_distributed_optimizer: bool = False):
        if num_tokens < 1:
            raise ValueError(f"drift probe needs >= 1 token, got {num_tokens}")
        from megatron_pr2.routes.layout import RankCoords

        self.worker = worker
        self.num_tokens = num_tokens
        self.routers = _routers(worker.modules)
        config = worker.modules[0].config
        self._coords = RankCoords.from_megatron(bool(config.sequence_parallel))
        self._grads_valid = not (use_distributed_optimizer and worker.dp_size > 1)
        self.adam_beta1 = _adam_beta1(worker.setup.optimizer)
        self.probe_step = 0
        self._tokens: torch.Tensor | None = None
        self._lengths: list[int] = []
        self._points: list[dict[int, torch.Tensor]] = []  # this step's logits per point
        self._keys: torch.Tensor | None = None
        self._weights: dict[int, torch.Tensor] = {}
        self._last_update: dict[int, torch.Tensor] = {}
        self._last_grad: dict[int, torch.Tensor] = {}
        self._update_stats: list[dict[int, tuple[float, float, float]]] = []
        self._previous_change: dict[int, torch.Tensor] = {}
        self.seconds = 0.0

    # ------------------------------------------------------------------ the trainer's calls
    def start_step(self, tokens: torch.Tensor, lengths: torch.Tensor) -> None:
        """Before the step's first update: on the first call pick the probe from this batch
        and measure the starting point; later calls start from the last step's last point."""
        start = time.perf_counter()
        if self._tokens is None:
            self._pick(tokens, lengths)
            self._points = [self._measure()]
            self._weights = self._router_weights()
        else:
            self._points = self._points[-1:]
        self._update_stats = []
        self.seconds = time.perf_counter() - start

    def after_update(self, mini_step: int) -> None:
        """After optimizer update ``mini_step``: the probe's logits and the weight change."""
        start = time.perf_counter()
        self._points.append(self._measure())
        weights = self._router_weights()
        stats: dict[int, tuple[float, float, float]] = {}
        for layer, w in weights.items():
            update = w - self._weights[layer]
            grad = self._router_grad(layer) if self._grads_valid else None
            previous, previous_grad = self._last_update.get(layer), self._last_grad.get(layer)
            stats[layer] = (
                cosine(update, previous) if previous is not None else float("nan"),
                cosine(grad, previous_grad)
                if grad is not None and previous_grad is not None
                else float("nan"),
                float(update.double().norm() / self._weights[layer].double().norm().clamp(1e-30)),
            )
            self._last_update[layer] = update
            if grad is not None:
                self._last_grad[layer] = grad
        self._weights = weights
        self._update_stats.append(stats)
        self.seconds += time.perf_counter() - start

    def finish_step(self, step: int, log_dir: str | Path | None) -> dict[str, float]:
        """The step's record (written under ``log_dir`` when given: the logging rank) and its
        ``drift/*`` metrics, the same on every rank."""
        start = time.perf_counter()
        if self.probe_step < 0:
            self.probe_step = step
        gathered = _gather(
            {layer: [s[layer] for s in self._update_stats] for layer in self._update_stats[0]}
            if self._update_stats
            else {}
        )
        per_layer_stats: dict[int, list[tuple[float, float, float]]] = {}
        for part in gathered:
            for layer, rows in part.items():
                per_layer_stats.setdefault(layer, rows)
        assert self._keys is not None
        record = DriftStep(
            step=step, probe_step=self.probe_step, keys=self._keys, adam_beta1=self.adam_beta1
        )
        for layer in self._points[0]:
            record.logits[layer] = torch.stack([p[layer] for p in self._points])
        for layer, rows in per_layer_stats.items():
            columns = torch.tensor(rows, dtype=torch.float32).reshape(-1, 3)
            record.update_cosine[layer] = columns[:, 0]
            record.grad_cosine[layer] = columns[:, 1]
            record.update_norm[layer] = columns[:, 2]
        metrics = step_metrics(record, self._previous_change)
        self._previous_change = {
            layer: logits[-1] - logits[-2]
            for layer, logits in record.logits.items()
            if logits.shape[0] > 1
        }
        if log_dir is not None:
            write_drift_step(drift_path(log_dir, step), record)
        self.seconds += time.perf_counter() - start
        metrics["timing/train/drift_probe"] = self.seconds
        return metrics

    # ------------------------------------------------------------------ internals
    def _pick(self, tokens: torch.Tensor, lengths: torch.Tensor) -> None:
        """The first rows holding ``num_tokens`` real tokens, rounded up to whole micro-batches
        shared evenly by the data-parallel ranks (fewer when the batch is smaller)."""
        unit = self.worker.micro_batch_size * self.worker.dp_size
        totals = torch.cumsum(lengths.long(), 0)
        rows = int(torch.searchsorted(totals, torch.tensor(self.num_tokens))) + 1
        rows = min(math.ceil(rows / unit) * unit, (tokens.shape[0] // unit) * unit)
        self._tokens = tokens[:rows].clone()
        self._lengths = [int(n) for n in lengths[:rows]]
        self.probe_step = -1  # set by finish_step: the step whose rollout gave the probe

    @torch.no_grad()
    def _measure(self) -> dict[int, torch.Tensor]:
        """One forward of the probe (live routing, forward only) -> ``{layer: [T, E]}`` logits
        on the probe's first ``num_tokens`` tokens (by key), the same dict on every rank."""
        from megatron_pr2.models.gpt import LMBatch, lm_forward_backward
        from megatron_pr2.rl.engine import rollout_layouts
        from megatron_pr2.routes.layout import rank_token_keys

        assert self._tokens is not None
        mbs = self.worker.micro_batch_size
        local = self.worker.local_microbatches(self._tokens.shape[0])
        layouts = rollout_layouts(self._lengths, int(self._tokens.shape[1]), mbs)
        batches = []
        for j in local:
            part = self._tokens[j * mbs : (j + 1) * mbs]
            labels = torch.zeros_like(part)
            labels[:, :-1] = part[:, 1:]
            batches.append(LMBatch(part.contiguous(), labels, torch.ones(part.shape)))
        inputs: dict[int, list[torch.Tensor]] = {layer: [] for layer in self.routers}
        handles = [
            router.register_forward_pre_hook(
                lambda _m, args, layer=layer: inputs[layer].append(args[0].detach())
            )
            for layer, router in self.routers.items()
        ]
        state = torch.random.get_rng_state()
        try:
            lm_forward_backward(self.worker.setup.chunks, batches, forward_only=True)
        finally:
            for handle in handles:
                handle.remove()
            torch.random.set_rng_state(state)
        local_out: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for layer, calls in inputs.items():
            if len(calls) != len(local):
                raise RuntimeError(
                    f"drift probe: layer {layer} routed {len(calls)} micro-batches, "
                    f"expected {len(local)}"
                )
            keys, logits = [], []
            for j, hidden in zip(local, calls):
                flat = self.routers[layer].gating(hidden).flatten(0, -2).float().cpu()
                k = rank_token_keys(layouts[j], self._coords)
                if len(k) != flat.shape[0]:
                    raise RuntimeError(
                        f"drift probe: layer {layer} saw {flat.shape[0]} tokens, keys {len(k)}"
                    )
                keep = k >= 0
                keys.append(k[keep])
                logits.append(flat[keep])
            local_out[layer] = (torch.cat(keys), torch.cat(logits))
        merged: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for part in _gather(local_out):
            for layer, pair in part.items():
                merged.setdefault(layer, []).append(pair)
        out: dict[int, torch.Tensor] = {}
        for layer in sorted(merged):
            keys = torch.cat([k for k, _ in merged[layer]])
            logits = torch.cat([v for _, v in merged[layer]])
            order = torch.argsort(keys, stable=True)
            keys, logits = keys[order], logits[order]
            first = torch.ones_like(keys, dtype=torch.bool)
            first[1:] = keys[1:] != keys[:-1]  # tensor parallel without SP: the same tokens twice
            keys, logits = keys[first][: self.num_tokens], logits[first][: self.num_tokens]
            if self._keys is None:
                self._keys = keys
            elif not torch.equal(keys, self._keys):
                raise RuntimeError(f"drift probe: layer {layer} saw other tokens than the probe")
            out[layer] = logits
        return out

    def _router_weights(self) -> dict[int, torch.Tensor]:
        return {layer: r.weight.detach().float().cpu().clone() for layer, r in self.routers.items()}

    def _router_grad(self, layer: int) -> torch.Tensor | None:
        weight = self.routers[layer].weight
        grad = getattr(weight, "main_grad", None)
        if grad is None:
            grad = weight.grad
        return None if grad is None else grad.detach().float().cpu().clone()


# ---------------------------------------------------------------------------------- analysis
MAX_LAG = 4


@dataclass
class LayerDrift:
    """One layer's cosines over a run: ``logit[lag]`` for lags 1..MAX_LAG; the lag-1 pairs are
    also split by whether the later update starts a new GRPO step (a new rollout batch)."""

    logit: dict[int, list[float]] = field(default_factory=dict)
    within_step: list[float] = field(default_factory=list)
    across_steps: list[float] = field(default_factory=list)
    update: list[float] = field(default_factory=list)
    grad: list[float] = field(default_factory=list)
    update_norm: list[float] = field(default_factory=list)
    lag1_by_update: list[tuple[int, float]] = field(default_factory=list)  # (update index, cos)


def load_drift(run_dir: str | Path) -> list[DriftStep]:
    """Every probe file of a run, in step order (none: an empty list)."""
    files = sorted((Path(run_dir) / "drift").glob("step_*.safetensors"))
    return [read_drift_step(f) for f in files]


def _segments(records: list[DriftStep]) -> list[list[DriftStep]]:
    """Runs of consecutive steps on the same probe tokens: within one, a step's point 0 is the
    previous step's last point, so changes and their cosines continue across the boundary."""
    out: list[list[DriftStep]] = []
    for record in sorted(records, key=lambda r: r.step):
        last = out[-1][-1] if out else None
        if (
            last is not None
            and record.step == last.step + 1
            and record.probe_step == last.probe_step
            and torch.equal(record.keys, last.keys)
        ):
            out[-1].append(record)
        else:
            out.append([record])
    return out


def drift_stats(records: list[DriftStep], max_lag: int = MAX_LAG) -> dict[int, LayerDrift]:
    """Per layer, every cosine the probe files allow (see :class:`LayerDrift`)."""
    stats: dict[int, LayerDrift] = {}
    update_index = 0
    for segment in _segments(records):
        for layer in segment[0].layers:
            if not all(layer in r.logits for r in segment):
                continue
            s = stats.setdefault(layer, LayerDrift())
            points = torch.cat(
                [segment[0].logits[layer]] + [r.logits[layer][1:] for r in segment[1:]]
            )
            starts = set()  # change indices that are a step's first update
            offset = 0
            for r in segment:
                starts.add(offset)
                offset += r.num_updates
            for lag in range(1, max_lag + 1):
                s.logit.setdefault(lag, []).extend(change_cosines(points, lag))
            for u, value in enumerate(change_cosines(points, 1)):
                (s.across_steps if u + 1 in starts else s.within_step).append(value)
                s.lag1_by_update.append((update_index + u + 1, value))
            for r in segment:
                s.update += r.update_cosine.get(layer, torch.empty(0)).tolist()
                s.grad += r.grad_cosine.get(layer, torch.empty(0)).tolist()
                s.update_norm += r.update_norm.get(layer, torch.empty(0)).tolist()
        update_index += sum(r.num_updates for r in segment)
    return stats


def _mean(values: list[float]) -> float:
    values = [v for v in values if math.isfinite(v)]
    return sum(values) / len(values) if values else float("nan")


def _pooled(stats: dict[int, LayerDrift], get) -> list[float]:
    return [v for s in stats.values() for v in get(s)]


def drift_report(records: list[DriftStep], stats: dict[int, LayerDrift]) -> list[str]:
    """The markdown section of ``pr2 analyze`` on the probe files."""
    first = records[0]
    tokens, experts = first.keys.shape[0], next(iter(first.logits.values())).shape[2]
    noise = 1 / math.sqrt(max(tokens * (experts - 1), 1))
    beta1 = first.adam_beta1
    lags = range(1, MAX_LAG + 1)

    def row(label: str, get) -> str:
        cells = [_mean(get(lambda s, lag=lag: s.logit.get(lag, []))) for lag in lags]
        return (
            f"| {label} | "
            + " | ".join(f"{c:.3f}" for c in cells)
            + f" | {_mean(get(lambda s: s.within_step)):.3f}"
            + f" | {_mean(get(lambda s: s.across_steps)):.3f}"
            + f" | {_mean(get(lambda s: s.update)):.3f}"
            + f" | {_mean(get(lambda s: s.grad)):.3f}"
            + f" | {_mean(get(lambda s: s.update_norm)):.2e} |"
        )

    lines = [
        "## Router drift structure (drift probe)",
        "",
        f"{len(records)} steps, {tokens} fixed probe tokens, {experts} experts; logits after "
        "every optimizer update. Cosine of the (per-token centred) router-logit changes of "
        "updates u and u+lag on the same tokens; > 0: the drift keeps its direction (systematic, "
        f"predictable), ≈ 0: noise (independent changes give |cos| ≲ {noise:.3f} here). "
        "*Within step*: lag-1 pairs inside one rollout batch's mini-steps; *across steps*: the "
        "later update starts a new rollout batch. Router update / gradient cosine: of "
        "consecutive updates (gradients) of each router's weight matrix, lag 1. Adam's momentum "
        f"alone gives independent gradients an update cosine of about β1 = {beta1:g}; the "
        "gradient cosine has no momentum.",
        "",
        "| layer | "
        + " | ".join(f"logit cos lag {lag}" for lag in lags)
        + " | within step | across steps | router update cos | router grad cos "
        "| ‖ΔW‖/‖W‖ per update |",
        "|---|" + "---|" * (len(lags) + 5),
    ]
    for layer in sorted(stats):
        lines.append(row(str(layer), lambda get, layer=layer: get(stats[layer])))
    lines.append(row("all", lambda get: _pooled(stats, get)))
    return lines


def drift_figure(path: Path, stats: dict[int, LayerDrift], beta1: float) -> Path:
    """Left: lag-1 logit-change cosine per update and layer; right: mean cosine vs lag."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for layer, s in sorted(stats.items()):
        if s.lag1_by_update:
            left.plot(*zip(*s.lag1_by_update), lw=0.8, label=f"layer {layer}")
        lags = sorted(s.logit)
        right.plot(lags, [_mean(s.logit[lag]) for lag in lags], "o-", label=f"layer {layer}")
    left.axhline(0.0, color="k", lw=0.5)
    left.set_xlabel("optimizer update")
    left.set_ylabel("cos(Δ_u, Δ_u+1) of router logits")
    left.set_title("consecutive router-logit changes")
    left.grid(alpha=0.3)
    left.legend(fontsize=7)
    if math.isfinite(beta1) and stats:
        lags = range(1, max(len(s.logit) for s in stats.values()) + 1)
        right.plot(list(lags), [beta1**lag for lag in lags], "k:", label="β1^lag (momentum)")
    right.axhline(0.0, color="k", lw=0.5)
    right.set_xlabel("lag (optimizer updates)")
    right.set_ylabel("mean cosine of logit changes")
    right.set_title("drift direction memory")
    right.grid(alpha=0.3)
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
