"""A policy worker with NeMo-RL's Megatron worker shape: ``get_logprobs`` (the old-log-prob
pass) and ``train`` (κ mini-steps over one rollout batch), with routing replay wired in.

Per rollout batch (pr2-algorithm §2.6)::

    batch.prev_logprobs = worker.get_logprobs(batch, routes)   # r2/pr2: record; r3: replay
    metrics = worker.train(batch, loss_fn, num_mini_steps=κ)    # replay mini-batch i's routes

Everything runs through megatron's own schedule (``get_forward_backward_func``), DDP and
optimizer, in any megatron layout. Every rank holds the whole rollout batch; data-parallel rank
``d`` trains on micro-batches ``d, d + dp, ...`` (:meth:`PolicyWorker.local_microbatches`), and
loss denominators count the whole mini-batch, so the DP-summed gradient equals world 1's.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from megatron_pr2.config import RouterReplayConfig
from megatron_pr2.models.gpt import lm_forward_backward, model_device
from megatron_pr2.models.training import TrainingSetup, setup_training, train_step
from megatron_pr2.patch.dispatcher import DISPATCH_OUTCOMES
from megatron_pr2.replay.dispatch_plan import DispatchPlan, DispatchPlanner
from megatron_pr2.replay.session import PreparedRoutes, ReplaySession, Routes, RouteTrace
from megatron_pr2.rl.engine import Rollout, rollout_layouts
from megatron_pr2.rl.loss import METRIC_REDUCTIONS, ClippedPGLossFn
from megatron_pr2.rl.parallel import (
    all_gather_data_parallel,
    broadcast_from_last_stage,
    combine_last_stage_metrics,
    comm_device,
    data_parallel_rank_size,
    gather_route_traces,
)
from megatron_pr2.routes.layout import RankCoords, rank_token_keys

__all__ = ["PolicyWorker", "RLBatch"]


@dataclass
class RLBatch:
    """One rollout batch for the trainer; per-token tensors ``[batch, seq]`` aligned with
    ``tokens`` (entry ``t`` is about token ``t``).

    Attributes:
        tokens: right-padded prompt + response ids.
        lengths: real tokens per sample (the rest is padding).
        token_mask: 1.0 on tokens that carry loss (the response).
        advantages: ``[batch]`` or ``[batch, seq]``.
        generation_logprobs: μ, the rollout engine's log-probs (optional).
        prev_logprobs: π_old, set from :meth:`PolicyWorker.get_logprobs` before ``train``.
        pad_id: label used after the last token (never counted).
    """

    tokens: torch.Tensor
    lengths: torch.Tensor
    token_mask: torch.Tensor
    advantages: torch.Tensor
    generation_logprobs: torch.Tensor | None = None
    prev_logprobs: torch.Tensor | None = None
    pad_id: int = 0

    @classmethod
    def from_rollout(cls, rollout: Rollout, advantages: torch.Tensor, pad_id: int = 0) -> RLBatch:
        return cls(
            tokens=rollout.tokens,
            lengths=rollout.lengths,
            token_mask=rollout.response_mask,
            advantages=advantages,
            generation_logprobs=rollout.generation_logprobs,
            pad_id=pad_id,
        )

    @property
    def batch_size(self) -> int:
        return int(self.tokens.shape[0])

    def rows(self, start: int, stop: int) -> RLBatch:
        """Samples ``start:stop`` (views)."""

        def cut(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[start:stop]

        return RLBatch(
            self.tokens[start:stop],
            self.lengths[start:stop],
            self.token_mask[start:stop],
            self.advantages[start:stop],
            cut(self.generation_logprobs),
            cut(self.prev_logprobs),
            self.pad_id,
        )


@dataclass
class _Microbatch:
    """Model input of one micro-batch (``tokens``: what ``lm_forward_backward`` sizes by)."""

    tokens: torch.Tensor
    labels: torch.Tensor  # labels[:, t] = tokens[:, t + 1]: the loss at t is token t + 1's
    data: RLBatch


def _microbatches(
    batch: RLBatch, micro_batch_size: int, indices: Sequence[int] | None = None
) -> list[_Microbatch]:
    """Micro-batches ``indices`` (default: all) of ``batch`` cut into ``micro_batch_size`` rows."""
    if indices is None:
        indices = range(batch.batch_size // micro_batch_size)
    out = []
    for index in indices:
        start = index * micro_batch_size
        part = batch.rows(start, start + micro_batch_size)
        labels = torch.full_like(part.tokens, batch.pad_id)
        labels[:, :-1] = part.tokens[:, 1:]
        out.append(_Microbatch(part.tokens.contiguous(), labels, part))
    return out


def _token_logprobs(per_token_loss: torch.Tensor) -> torch.Tensor:
    """GPTModel's per-token CE ``[b, s]`` (of token t + 1 at t) -> token-aligned log-probs."""
    zeros = torch.zeros_like(per_token_loss[:, :1])
    return torch.cat([zeros, -per_token_loss[:, :-1]], dim=1)


def _model_forward(mb: _Microbatch, model: torch.nn.Module) -> torch.Tensor:
    device = model_device(model)
    tokens = mb.tokens.to(device)
    position_ids = torch.arange(tokens.shape[1], device=device).unsqueeze(0).expand_as(tokens)
    return model(tokens, position_ids, attention_mask=None, labels=mb.labels.to(device))


def _logprob_step(batches: Iterator[_Microbatch], model: torch.nn.Module):
    """Forward step of the old-log-prob pass: the loss dict carries the log-probs out."""
    mb = next(batches)
    output = _model_forward(mb, model)

    def loss_func(per_token_loss: torch.Tensor):
        logprobs = _token_logprobs(per_token_loss.float()).detach()
        return per_token_loss.sum() * 0.0, {"logprobs": logprobs}

    return output, loss_func


def _pg_step(
    loss_fn: ClippedPGLossFn,
    num_microbatches: int,
    valid_tokens: float,
    valid_seqs: float,
    data_parallel_size: int = 1,
) -> Callable:
    """Forward step of an update pass: ``loss_fn`` on the current per-token log-probs."""

    def step(batches: Iterator[_Microbatch], model: torch.nn.Module):
        mb = next(batches)
        output = _model_forward(mb, model)

        def loss_func(per_token_loss: torch.Tensor):
            d = mb.data
            data = {
                "prev_logprobs": d.prev_logprobs,
                "advantages": d.advantages,
                "token_mask": d.token_mask,
            }
            if d.generation_logprobs is not None:
                data["generation_logprobs"] = d.generation_logprobs
            data = {k: v.to(per_token_loss.device) for k, v in data.items()}
            loss, metrics = loss_fn(
                _token_logprobs(per_token_loss.float()), data, valid_tokens, valid_seqs
            )
            # The loss is this micro-batch's share of the mini-batch loss (denominators over
            # every DP rank's tokens). megatron divides a 2-tuple loss by the micro-batch count
            # and DDP averages gradients over DP; both are undone so the shares add up.
            return loss * (num_microbatches * data_parallel_size), metrics

        return output, loss_func

    return step


def _reduce_metrics(per_microbatch: Sequence[dict[str, torch.Tensor]]) -> dict[str, float]:
    out: dict[str, float] = {}
    if not per_microbatch:  # not a last pipeline stage
        return out
    for name in per_microbatch[0]:
        values = torch.stack([m[name].detach().double().reshape(()) for m in per_microbatch])
        how = METRIC_REDUCTIONS.get(name, "mean")
        if how == "sum":
            out[name] = float(values.sum())
        elif how == "min":
            out[name] = float(values.min())
        elif how == "max":
            out[name] = float(values.max())
        else:
            out[name] = float(values.mean())
    return out


class PolicyWorker:
    """Trainer side of one RL run: megatron DDP + optimizer over ``chunks``, replay by mode.

    ``r2`` / ``pr2``: ``get_logprobs`` records the routes (pr2: predicted, with the predictor's
    feature cache keyed by ``sample << 32 | position``) and ``train`` replays them. ``r3`` /
    ``pr2_r3``: ``get_logprobs`` and ``train`` replay the engine's routes (``pr2_r3`` also
    trains the predictor the engine applies). ``none``: live routing; with metrics on, the
    update passes measure their drift from the old-log-prob pass's routes.
    """

    def __init__(
        self,
        chunks: Sequence[torch.nn.Module],
        replay: RouterReplayConfig,
        lr: float,
        micro_batch_size: int = 1,
        weight_decay: float = 0.0,
        clip_grad: float = 0.0,
        trace_routes: bool = False,
        use_distributed_optimizer: bool = False,
        planned_dispatch: bool = False,
    ) -> None:
        self.replay = replay
        self.trace_routes = trace_routes  # keep route traces of each pass (rl.traces)
        self.old_pass_trace: dict[int, RouteTrace] = {}
        self.mini_step_traces: list[dict[int, RouteTrace]] = []
        self.micro_batch_size = micro_batch_size
        self.setup: TrainingSetup = setup_training(
            chunks,
            lr=lr,
            predictor_lr_mult=replay.predictor.lr_mult,
            weight_decay=weight_decay,
            clip_grad=clip_grad,
            use_distributed_optimizer=use_distributed_optimizer,
        )
        self.session = ReplaySession(self.setup.modules) if replay.installs_router else None
        config = self.setup.modules[0].config
        self._coords = RankCoords.from_megatron(bool(config.sequence_parallel))
        self.dp_rank, self.dp_size = data_parallel_rank_size()
        self._routes: PreparedRoutes | None = None
        self._routes_tokens: torch.Tensor | None = None
        self.logprob_metrics: dict[str, float] = {}
        # Called after each optimizer update with the mini-step index (rl.drift's probe).
        self.after_update: Callable[[int], None] | None = None
        # planned_dispatch: replayed passes take the all-to-all sizes from one plan per rollout
        # batch (chunks built with build_model_chunks(..., planned_dispatch=True)).
        self.planner: DispatchPlanner | None = None
        self._plan: DispatchPlan | None = None
        if planned_dispatch:
            if self.session is None or not replay.enabled:
                raise ValueError("planned dispatch needs a replay mode (routes known ahead)")
            self.planner = DispatchPlanner(self.setup.modules)

    @property
    def modules(self) -> list[torch.nn.Module]:
        """Unwrapped model chunks (what ``RolloutEngine.refresh`` reads)."""
        return self.setup.modules

    def local_microbatches(self, batch_size: int) -> list[int]:
        """Global micro-batch indices this data-parallel rank trains on, in order.

        Micro-batch ``j`` (rows ``j*mbs .. (j+1)*mbs``) belongs to DP rank ``j % dp``: every
        mini-batch whose micro-batch count divides by ``dp`` is then split evenly, whatever κ.
        """
        count = batch_size // self.micro_batch_size
        if batch_size % self.micro_batch_size or count % self.dp_size:
            raise ValueError(
                f"{batch_size} samples do not split into micro-batches of "
                f"{self.micro_batch_size} shared evenly by {self.dp_size} data-parallel ranks"
            )
        return list(range(self.dp_rank, count, self.dp_size))

    def _token_keys(self, batch: RLBatch, indices: Sequence[int]) -> list[torch.Tensor]:
        """Predictor keys of micro-batches ``indices`` in router order; sample id = batch row,
        so every pass and rank derives the same keys for the same token.

        With engine routes (r3, pr2_r3) each sample's last token is keyed like padding: no
        engine forwards it, so its route is synthetic (``routes.payload``) and its hidden
        states downstream of that route are not the policy's. It carries no loss either way;
        keyed as padding it is left out of the replay metrics (which would count the synthetic
        route as a deviation) and out of the predictor's training targets.
        """
        layouts = rollout_layouts(
            batch.lengths.tolist(), int(batch.tokens.shape[1]), self.micro_batch_size
        )
        keys = [rank_token_keys(layouts[j], self._coords) for j in indices]
        if self.replay.uses_external_routes:
            keys = [_key_last_token_as_padding(k, batch.lengths) for k in keys]
        return keys

    # ------------------------------------------------------------------ old log-probs
    @torch.no_grad()
    def get_logprobs(self, batch: RLBatch, routes: Routes | None = None) -> torch.Tensor:
        """π_old: token-aligned ``[batch, seq]`` log-probs, forward only.

        ``r2`` / ``pr2`` (and ``none`` with metrics, to measure drift) record this pass's routes
        and keep them for ``train`` of this batch; ``r3`` / ``pr2_r3`` need ``routes`` (the
        engine's, in this worker's micro-batching) and replay them (``pr2_r3`` also caches the
        predictor's features).
        Replay metrics of the pass (r3: engine vs trainer routes) land in ``logprob_metrics``.
        """
        mode = self.replay.mode
        local = self.local_microbatches(batch.batch_size)
        microbatches = _microbatches(batch, self.micro_batch_size, local)
        self._routes, self._routes_tokens, self._plan = None, None, None
        if self.planner is not None:
            self.planner.take_stats()  # drop calls of passes outside this worker (warm start)
        external = self.replay.uses_external_routes
        if external and routes is None:
            raise ValueError(f"router_replay.mode {mode.value}: get_logprobs needs engine routes")
        if not external and routes is not None:
            raise ValueError(f"router_replay.mode {mode.value} records its own routes")
        if self.session is None:
            outputs = self._forward_only(microbatches)
            self.logprob_metrics = {}
            return self._gather_logprobs(outputs, batch, len(local))
        with self.session.tracing(self.trace_routes) as trace:
            if external:
                assert routes is not None
                # The engine routed every micro-batch of the batch; keep this rank's, checked
                # against the tokens each router will see before any forward runs.
                all_keys = self._token_keys(batch, local)
                prepared = self.session.prepare(
                    {layer: [per_mb[j] for j in local] for layer, per_mb in routes.items()},
                    num_tokens=[len(k) for k in all_keys],
                )
                self._plan = self._build_plan(prepared)
                with (
                    self._planning(self._plan),
                    # pr2_r3: the predictor learns from this pass's router inputs and logits.
                    self.session.replaying(
                        prepared, all_keys, cache_features=self.replay.uses_predictor
                    ),
                ):
                    outputs = self._forward_only(microbatches)
                self._routes = prepared
            else:
                with self.session.recording(self._token_keys(batch, local)) as record:
                    outputs = self._forward_only(microbatches)
                self._routes = record.routes
                self._plan = self._build_plan(record.routes)
        self._routes_tokens = batch.tokens
        self.old_pass_trace = gather_route_traces(trace) if self.trace_routes else {}
        self.logprob_metrics = {f"logprobs/{k}": v for k, v in self.session.metrics().items()}
        self.logprob_metrics.update(
            {f"logprobs/{k}": v for k, v in self._dispatch_metrics().items()}
        )
        return self._gather_logprobs(outputs, batch, len(local))

    # ------------------------------------------------------------------ planned dispatch
    def _build_plan(self, routes: PreparedRoutes) -> DispatchPlan | None:
        """The batch's dispatch plan (a collective over TP x EP: every rank of the group builds
        it for the same batch), reused by the old-log-prob pass (r3) and every mini-step."""
        return None if self.planner is None else self.planner.build(routes)

    def _planning(self, plan: DispatchPlan | None) -> contextlib.AbstractContextManager:
        if self.planner is None or plan is None:
            return contextlib.nullcontext()
        return self.planner.planning(plan)

    def _dispatch_metrics(self) -> dict[str, float]:
        """Dispatcher calls since the last report, summed over every rank (each dispatches its
        own tokens through its own layers): ``dispatch/planned_calls``,
        ``dispatch/fallback_calls`` and, per reason, ``dispatch/fallback/<reason>``."""
        if self.planner is None:
            return {}
        stats = self.planner.take_stats()
        unknown = set(stats) - {f"dispatch/{k}" for k in DISPATCH_OUTCOMES}
        if unknown:
            raise RuntimeError(f"dispatch outcomes without a metric: {sorted(unknown)}")
        counts = torch.tensor(
            [float(stats.get(f"dispatch/{k}", 0)) for k in DISPATCH_OUTCOMES],
            dtype=torch.float64,
        )
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            counts = counts.to(comm_device())
            torch.distributed.all_reduce(counts)
            counts = counts.cpu()
        values = dict(zip(DISPATCH_OUTCOMES, counts.tolist(), strict=True))
        out = {"dispatch/planned_calls": values.pop("planned")}
        out["dispatch/fallback_calls"] = float(sum(values.values()))
        out.update({f"dispatch/fallback/{k}": v for k, v in values.items() if v})
        if self._plan is not None:
            out["dispatch/plan_bytes"] = float(self._plan.nbytes)
        return out

    def _gather_logprobs(self, outputs: list[dict], batch: RLBatch, num_local: int) -> torch.Tensor:
        """This rank's micro-batches' log-probs (last pipeline stage) -> the whole batch's, on
        every rank: broadcast over the pipeline, gathered over data parallelism."""
        mbs, seq = self.micro_batch_size, int(batch.tokens.shape[1])
        like = torch.empty(num_local * mbs, seq, dtype=torch.float32, device=comm_device())
        local = torch.cat([o["logprobs"] for o in outputs], dim=0) if outputs else None
        local = broadcast_from_last_stage(local, like)
        gathered = all_gather_data_parallel(local).cpu()  # DP-rank order, on the host
        if self.dp_size == 1:
            return gathered
        per_rank = gathered.view(self.dp_size, num_local, mbs, seq)
        # Global micro-batch j = local index j // dp on DP rank j % dp.
        return per_rank.transpose(0, 1).reshape(-1, seq)

    def _forward_only(self, microbatches: list[_Microbatch]) -> list[dict]:
        return lm_forward_backward(
            self.setup.chunks, microbatches, forward_only=True, forward_step_func=_logprob_step
        )

    # ------------------------------------------------------------------ updates
    def train(
        self, batch: RLBatch, loss_fn: ClippedPGLossFn, num_mini_steps: int
    ) -> list[dict[str, float]]:
        """κ = ``num_mini_steps`` optimizer steps, one per equal contiguous mini-batch.

        Mini-step i replays its mini-batch's routes; pr2 adds the predictor loss and unfreezes
        the predictor group from i >= 1 (step 0 is near on-policy: nothing to predict yet).
        Returns per mini-step the reduced loss metrics plus the session's replay/pr2 metrics,
        all prefixed ``train/``.
        """
        if batch.prev_logprobs is None:
            raise ValueError("batch.prev_logprobs is unset: call get_logprobs first")
        size = batch.batch_size
        if num_mini_steps < 1 or size % num_mini_steps:
            raise ValueError(f"{size} samples do not split into {num_mini_steps} mini-batches")
        mini = size // num_mini_steps
        per_mini = mini // self.micro_batch_size
        if mini % self.micro_batch_size or per_mini % self.dp_size:
            raise ValueError(
                f"mini-batch of {mini} samples does not split into micro-batches of "
                f"{self.micro_batch_size} shared evenly by {self.dp_size} data-parallel ranks"
            )
        local = self.local_microbatches(size)
        routes = self._routes_for(batch)
        keys = self._token_keys(batch, local)
        per_rank = per_mini // self.dp_size
        results = []
        self.mini_step_traces = []
        for i in range(num_mini_steps):
            part = batch.rows(i * mini, (i + 1) * mini)
            mb_range = slice(i * per_rank, (i + 1) * per_rank)  # this rank's, in `local` order
            predictor_on = self.replay.uses_predictor and i >= 1
            if routes is None:
                metrics = self._train_step(batch, part, local[mb_range], loss_fn, False)
            else:
                part_routes = PreparedRoutes(
                    {layer: plans[mb_range] for layer, plans in routes.plans.items()}
                )
                assert self.session is not None
                if self.replay.enabled:
                    pass_ = self.session.replaying(part_routes, keys[mb_range], predictor_on)
                else:  # none: route live, measure the drift from the old-log-prob routes
                    pass_ = self.session.observing(part_routes, keys[mb_range])
                plan = None if self._plan is None else self._plan.select(mb_range)
                with self.session.tracing(self.trace_routes) as trace, self._planning(plan), pass_:
                    metrics = self._train_step(batch, part, local[mb_range], loss_fn, predictor_on)
                metrics.update(self._dispatch_metrics())
                if self.trace_routes:
                    self.mini_step_traces.append(gather_route_traces(trace))
            if self.session is not None:
                metrics.update(self.session.metrics())
            metrics["mini_step"] = float(i)
            results.append({f"train/{k}": v for k, v in metrics.items()})
            if self.after_update is not None:
                self.after_update(i)
        return results

    def _routes_for(self, batch: RLBatch) -> PreparedRoutes | None:
        if self.session is None:
            return None
        same = self._routes_tokens is not None and (
            self._routes_tokens is batch.tokens or torch.equal(self._routes_tokens, batch.tokens)
        )
        if self._routes is None or not same:
            raise ValueError("no routes for this batch: call get_logprobs(batch) first")
        return self._routes

    def _train_step(
        self,
        batch: RLBatch,
        part: RLBatch,
        indices: Sequence[int],
        loss_fn: ClippedPGLossFn,
        predictor_active: bool,
    ) -> dict[str, float]:
        """One optimizer step on this rank's micro-batches ``indices`` of mini-batch ``part``;
        loss denominators count the whole mini-batch (every DP rank's share)."""
        microbatches = _microbatches(batch, self.micro_batch_size, indices)
        valid_tokens = float(part.token_mask.sum())
        valid_seqs = float(part.batch_size)
        step = _pg_step(loss_fn, len(microbatches), valid_tokens, valid_seqs, self.dp_size)
        outputs, grad_norm = train_step(
            self.setup, microbatches, predictor_active=predictor_active, forward_step_func=step
        )
        local = _reduce_metrics(outputs) if outputs else None
        metrics = combine_last_stage_metrics(local, dict(METRIC_REDUCTIONS))
        if grad_norm is not None and math.isfinite(float(grad_norm)):
            metrics["grad_norm"] = float(grad_norm)
        return metrics


def _key_last_token_as_padding(keys: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """``keys`` with each sample's last real token given a unique negative (padding) key."""
    real = keys >= 0
    sample = torch.where(real, keys >> 32, 0)
    position = keys & 0xFFFFFFFF
    last = real & (position == lengths.to(keys.device)[sample] - 1)
    unrouted = -(1 << 32) - torch.arange(keys.shape[0], dtype=keys.dtype, device=keys.device)
    return torch.where(last, unrouted, keys)
