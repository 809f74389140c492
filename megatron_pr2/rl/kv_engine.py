"""KV-cached batched generation on megatron-core's own static inference context.

Why: the recompute engine (:class:`~megatron_pr2.rl.engine.RolloutEngine.generate`) re-runs the
full forward over the whole right-padded batch for every new token, keeps finished rows, and
copies full-vocabulary logits to the host: quadratic in the response length and out of memory
at real lengths. Here:

* **One prefill, then one token per step.** megatron's ``StaticInferenceContext`` (passed as
  ``inference_context=``) holds each attention layer's keys/values; a step forwards ``[rows, 1]``
  tokens at position ``t``. It runs the same model chunks (the bf16 copy the trainer refits), on
  CPU and GPU, in megatron-core 0.16 and 0.19; no megatron code is patched.
* **Prompts of different lengths, exact positions.** The static cache has one sequence offset for
  all rows, so the batch stays right-padded and aligned by position (megatron's own static
  generation scheme): prefill runs to the shortest prompt; at a step ``t`` inside a longer
  prompt, that row feeds its next prompt token instead of a sampled one. Every row sees exactly
  the positions and keys it would see alone; no mask or position shift is involved.
* **Finished rows leave the batch.** A row that samples eos or reaches ``max_new_tokens`` stops
  at once; the cache rows (and so the forward batch) are compacted as soon as an eighth of them
  are finished, so the copy cost stays amortised while nearly all compute goes to live rows.
* **Only the last position's logits, sampled on device** (:mod:`megatron_pr2.rl.sampling`):
  ids and log-probs leave the device, never ``[tokens, vocab]`` logits.
* **Routes of the passes that sampled.** Routers record every forward (prefill: the shared
  prompt prefix; each step: one token per row); ``pr2_r3`` records the predicted routes it
  sampled under. They are reassembled per sample into the trainer's replay layout through
  :mod:`megatron_pr2.rl.rollout_routes`.

Layouts: one model chunk without pipelining (TP, EP and DP run: every rank generates the whole
batch and DP rank 0's picks are broadcast). A sequence-parallel trainer gets an engine built
without SP: a one-token step cannot be split over SP ranks, and SP changes only where
activations live, not the weights the refit copies (inference engines run TP without SP too).
Its routes are still aligned to the trainer's SP layout and its widths padded to a multiple of
TP, as the trainer needs. Pipeline-parallel trainers fall back to the recompute engine
(megatron's pipeline schedule has no inference context).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from megatron.core import parallel_state
from megatron.core.inference.contexts import StaticInferenceContext
from megatron.core.transformer import TransformerConfig

from megatron_pr2.models.gpt import model_device
from megatron_pr2.rl.engine import Rollout, RolloutEngine
from megatron_pr2.rl.parallel import broadcast_from_data_parallel_rank0, comm_device
from megatron_pr2.rl.rollout_routes import rollout_routes
from megatron_pr2.rl.sampling import SamplingParams, sample_next
from megatron_pr2.routes.layout import RankCoords
from megatron_pr2.routes.payload import RouteSpec

__all__ = ["KVCacheEngine"]

# Compact the cache once this share of its rows is finished (amortises the copy).
_COMPACT_FRACTION = 1 / 8


class KVCacheEngine(RolloutEngine):
    """The bf16 policy copy of :class:`RolloutEngine` (same ``refresh``), generating with a KV
    cache. ``top_k``: the default top-k cut of ``generate`` (``generation.top_k``)."""

    def __init__(self, config: TransformerConfig, *args, top_k: int | None = None, **kwargs):
        trainer_sp = bool(config.sequence_parallel)
        if trainer_sp and parallel_state.get_pipeline_model_parallel_world_size() == 1:
            config = dataclasses.replace(config, sequence_parallel=False)  # see module docstring
        super().__init__(config, *args, **kwargs)
        if trainer_sp:  # routes in the trainer's SP layout, widths it can split over TP
            self._coords = RankCoords.from_megatron(True)
            self.seq_multiple = self._coords.tp_size
        self.top_k = top_k
        self.route_spec = RouteSpec.from_config(self.chunks[0].config)

    @property
    def uses_kv_cache(self) -> bool:
        """False where generation falls back to the recompute engine (see module docstring)."""
        config = self.chunks[0].config
        return (
            len(self.chunks) == 1
            and parallel_state.get_pipeline_model_parallel_world_size() == 1
            and not config.sequence_parallel
        )

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        generator: torch.Generator | None = None,
        micro_batch_size: int | None = None,
        return_routes: bool = True,
        top_k: int | None = None,
    ) -> Rollout:
        """Sample up to ``max_new_tokens`` per prompt (stopping at eos); the same contract and
        result as :meth:`RolloutEngine.generate`, plus ``top_k`` (default ``self.top_k``)."""
        top_k = self.top_k if top_k is None else top_k
        if not self.uses_kv_cache:
            if top_k is not None:
                raise ValueError("top_k needs the KV-cached path (no pipeline / sequence parallel)")
            return super().generate(
                prompts,
                max_new_tokens,
                temperature,
                top_p,
                generator,
                micro_batch_size,
                return_routes,
            )
        params = SamplingParams(temperature, top_p, top_k)
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("generate needs at least one prompt, none of them empty")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        prompt_lengths = torch.tensor([len(p) for p in prompts], dtype=torch.int64)
        width = int(prompt_lengths.max()) + max_new_tokens
        if width > self.max_sequence_length:
            raise ValueError(
                f"longest prompt + max_new_tokens = {width} > max_sequence_length "
                f"{self.max_sequence_length}"
            )
        batch = len(prompts)
        mbs = micro_batch_size or batch
        if batch % mbs:
            raise ValueError(f"{batch} samples do not split into micro-batches of {mbs}")
        record = return_routes or self.applies_predictor  # pr2_r3 samples under the predictor
        recorder = self.session.recording() if record else _NoRecord()
        with recorder as recorded:
            run = _Generation(self, prompts, prompt_lengths, width, max_new_tokens, params)
            run.loop(generator)
        tokens, logprobs, lengths = run.results()
        positions = torch.arange(tokens.shape[1]).unsqueeze(0)
        response_mask = (
            (positions >= prompt_lengths[:, None]) & (positions < lengths[:, None])
        ).float()
        routes = None
        if return_routes:
            per_sample = run.routes_per_sample(recorded.routes, lengths)
            routes = rollout_routes(
                per_sample,
                lengths.tolist(),
                seq_length=tokens.shape[1],
                micro_batch_size=mbs,
                spec=self.route_spec,
                coords=self._coords,
                layers=self.session.layers,
                source="megatron kv engine",
            )
        return Rollout(tokens, lengths, prompt_lengths, response_mask, logprobs, routes, mbs)


class _Generation:
    """The state of one ``generate`` call: token/log-prob buffers on the device, the live
    cache rows, and which rows each recorded forward covered (to put the routes back)."""

    def __init__(
        self,
        engine: KVCacheEngine,
        prompts: Sequence[Sequence[int]],
        prompt_lengths: torch.Tensor,
        width: int,
        max_new_tokens: int,
        params: SamplingParams,
    ) -> None:
        self.engine, self.params, self.max_new = engine, params, max_new_tokens
        self.model = engine.chunks[0]
        self.device = model_device(self.model)
        batch = len(prompts)
        tokens = torch.full((batch, width), engine.pad_id, dtype=torch.int64)
        for i, prompt in enumerate(prompts):
            tokens[i, : len(prompt)] = torch.as_tensor(list(prompt), dtype=torch.int64)
        self.tokens = tokens.to(self.device)
        self.logprobs = torch.zeros(batch, width, dtype=torch.float32, device=self.device)
        self.prompt_lengths = prompt_lengths.to(self.device)
        self.lengths = self.prompt_lengths.clone()
        self.prefill = int(prompt_lengths.min())
        self.context = StaticInferenceContext(batch, width)
        # Forwards after the prefill: (cache rows -> batch rows, position) per step.
        self.steps: list[tuple[torch.Tensor, int]] = []

    def loop(self, generator: torch.Generator | None) -> None:
        """Prefill the shared prompt prefix, then decide one token per live row per step."""
        rows = torch.arange(self.tokens.shape[0], device=self.device)  # cache order
        alive = torch.ones_like(rows, dtype=torch.bool)
        logits = self._forward(self.tokens[:, : self.prefill], start=0)
        self.context.enable_decode_mode()
        for t in range(self.prefill, self.tokens.shape[1]):
            alive = self._decide(t, rows, alive, logits, generator)
            live = int(alive.sum())  # the one host sync per step
            if live == 0:
                break
            if (len(rows) - live) >= max(1, len(rows) * _COMPACT_FRACTION):
                keep = alive.nonzero().squeeze(1)
                self._compact_cache(keep, cached_rows=len(rows))
                rows, alive = rows[keep], alive[keep]
            logits = self._forward(self.tokens[rows, t : t + 1], start=t)
            self.steps.append((rows, t))

    def _decide(
        self,
        t: int,
        rows: torch.Tensor,
        alive: torch.Tensor,
        logits: torch.Tensor,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        """Token ``t`` of every cache row: sampled past its prompt, else its prompt token;
        returns the rows still alive after it."""
        ids, raw = sample_next(logits, self.params, generator, self.engine.sample_vocab_size)
        ids, raw = _agree_over_data_parallel(ids, raw)
        prompt_len = self.prompt_lengths[rows]
        sampling = alive & (prompt_len <= t)
        current = self.tokens[rows, t]
        pad = torch.full_like(current, self.engine.pad_id)
        # Rows inside their prompt keep it; finished rows stay padding past their end.
        self.tokens[rows, t] = torch.where(sampling, ids, torch.where(alive, current, pad))
        self.logprobs[rows, t] = torch.where(sampling, raw, 0.0)
        ends = sampling & ((ids == self.engine.eos_id) | (t + 1 >= prompt_len + self.max_new))
        self.lengths[rows] = torch.where(ends, t + 1, self.lengths[rows])
        return alive & ~ends

    def _forward(self, tokens: torch.Tensor, start: int) -> torch.Tensor:
        """fp32-castable logits ``[rows, vocab]`` of the last position of ``tokens``, which sit
        at positions ``start ..`` (the cache holds everything before)."""
        self.context.sequence_len_offset = start
        rows, length = tokens.shape
        positions = torch.arange(start, start + length, device=self.device).expand(rows, -1)
        logits = self.model(
            tokens,
            positions,
            attention_mask=None,
            inference_context=self.context,
            runtime_gather_output=True,  # 0.16 asserts it under inference
        )
        # 0.16 materialises only the last position here; 0.19 only under its engine's
        # InferenceMode (which also switches the routers to its own paths), so slice.
        return logits[:, -1, : self.engine.vocab_size]

    def _compact_cache(self, keep: torch.Tensor, cached_rows: int) -> None:
        """Drop finished rows from every layer's cached keys/values ``[seq, rows, ...]``.

        The static context's per-layer ``(key, value)`` buffers are megatron's; their layout
        (sequence first, then batch) is checked here so a change in a megatron release fails
        loudly instead of mixing rows."""
        memory = self.context.key_value_memory_dict
        for layer, (key, value) in memory.items():
            if key.shape[1] != cached_rows or value.shape[1] != cached_rows:
                raise RuntimeError(
                    f"megatron's KV cache of layer {layer} has shape {tuple(key.shape)}; "
                    f"expected [seq, {cached_rows} rows, ...] (static inference layout changed?)"
                )
            memory[layer] = (key.index_select(1, keep), value.index_select(1, keep))

    def results(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Host ``(tokens, log-probs, lengths)`` cut to the longest sample (padded to the
        trainer's width multiple: TP under sequence parallelism)."""
        lengths = self.lengths.cpu()
        seq = self.engine._padded_width(int(lengths.max()))
        extra = max(0, seq - self.tokens.shape[1])
        tokens = self.tokens[:, :seq].cpu()
        logprobs = self.logprobs[:, :seq].cpu()
        if extra:
            tokens = torch.nn.functional.pad(tokens, (0, extra), value=self.engine.pad_id)
            logprobs = torch.nn.functional.pad(logprobs, (0, extra), value=0.0)
        return tokens.contiguous(), logprobs.contiguous(), lengths

    def routes_per_sample(self, recorded, lengths: torch.Tensor) -> list[torch.Tensor]:
        """Each sample's routes of its forwarded tokens, ``[length - 1, moe layers, topk]``,
        from the per-forward records (prefill ``[prefix * rows, k]`` in ``[s, b]`` order, then
        one ``[cache rows, k]`` per step)."""
        spec = self.engine.route_spec
        batch, width = self.tokens.shape
        layers = list(spec.moe_layers)
        if sorted(recorded) != layers:
            raise RuntimeError(f"engine recorded layers {sorted(recorded)}, expected {layers}")
        buf = torch.zeros(batch, width, len(layers), spec.topk, dtype=torch.int16)
        buf = buf.to(self.device)
        for column, layer in enumerate(layers):
            forwards = recorded[layer]
            if len(forwards) != 1 + len(self.steps):
                raise RuntimeError(
                    f"layer {layer}: {len(forwards)} recorded forwards, expected "
                    f"{1 + len(self.steps)}"
                )
            prefix = forwards[0].view(self.prefill, batch, spec.topk).transpose(0, 1)
            buf[:, : self.prefill, column] = prefix.to(torch.int16)
            for (rows, t), routes in zip(self.steps, forwards[1:]):
                buf[rows, t, column] = routes.to(torch.int16)
        host = buf.cpu()
        return [host[i, : int(n) - 1] for i, n in enumerate(lengths)]


def _agree_over_data_parallel(
    ids: torch.Tensor, raw: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """DP rank 0's picks on every DP rank: replicas generate the same rollout even where their
    kernels differ in the last bit (as the recompute engine broadcasts its logits)."""
    if parallel_state.get_data_parallel_world_size() == 1:
        return ids, raw
    packed = torch.stack([ids.double(), raw.double()]).to(comm_device())
    packed = broadcast_from_data_parallel_rank0(packed).to(ids.device)
    return packed[0].long(), packed[1].float()


class _NoRecord:
    """``session.recording()``'s stand-in when routes are neither wanted nor sampled under."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None
