"""A rollout engine for RL tests: a bf16 copy of the policy that samples completions and reports
the routes it used (R3), optionally with the PR2 predictor applied (``pr2_r3``).

Why a separate bf16 copy: in a real run the rollout engine (vLLM, SGLang) holds its own weights in
bf16 and runs different kernels from the fp32-master Megatron trainer, so the behaviour policy μ
and the trainer's π_old differ even with identical weights (pr2-algorithm §1.1, the first factor
of the importance ratio). Building the engine with ``params_dtype=bfloat16`` on the same megatron
layout reproduces that gap in miniature, including routes that flip near expert ties.

Parallel layouts: the engine is built in the trainer's megatron layout (TP/SP, PP/VPP, EP, DP)
and runs its forwards through megatron's own schedule (``forward_only``). Every rank generates
the whole batch: the next-token logits are gathered over TP, broadcast from the last pipeline
stage and from data-parallel rank 0, and every rank samples with the same generator, so all
ranks hold the same rollout. Routes stay rank-local: each rank records its own MoE layers in its
own token order (its SP slice), which is exactly what the trainer's router on that rank replays.
Generation is redundant over data parallelism; fine for tests, a real run uses vLLM or SGLang.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region
from megatron.core.transformer import TransformerConfig

from megatron_pr2.config import PredictorConfig, RouterReplayConfig
from megatron_pr2.models.gpt import build_model_chunks, lm_forward_backward, model_device
from megatron_pr2.models.training import PREDICTOR_KEY_FRAGMENT, export_state_dict
from megatron_pr2.replay.session import ReplaySession
from megatron_pr2.rl.parallel import (
    broadcast_from_data_parallel_rank0,
    broadcast_from_last_stage,
    comm_device,
)
from megatron_pr2.rl.sampling import SamplingParams, sampling_probs
from megatron_pr2.routes.layout import MicrobatchLayout, RankCoords, rank_token_keys

EngineMode = Literal["r3", "pr2_r3"]
ChunkBuilder = Callable[[TransformerConfig, RouterReplayConfig], list[torch.nn.Module]]

__all__ = ["EngineMode", "Rollout", "RolloutEngine", "bf16_engine_config", "rollout_layouts"]


def bf16_engine_config(config: TransformerConfig) -> TransformerConfig:
    """The trainer's config with bf16 parameters and activations (the engine's numerics)."""
    return dataclasses.replace(
        config, params_dtype=torch.bfloat16, bf16=True, pipeline_dtype=torch.bfloat16
    )


def rollout_layouts(
    lengths: Sequence[int], seq_length: int, micro_batch_size: int
) -> list[MicrobatchLayout]:
    """BSHD layouts of consecutive micro-batches of a right-padded ``[batch, seq_length]`` batch;
    sample ids are batch rows, so trainer and engine derive the same token keys."""
    if micro_batch_size < 1 or len(lengths) % micro_batch_size:
        raise ValueError(
            f"{len(lengths)} samples do not split into micro-batches of {micro_batch_size}"
        )
    return [
        MicrobatchLayout.bshd(
            range(start, start + micro_batch_size),
            [int(n) for n in lengths[start : start + micro_batch_size]],
            seq_length=seq_length,
        )
        for start in range(0, len(lengths), micro_batch_size)
    ]


@dataclass
class Rollout:
    """Sampled sequences of one rollout batch, right-padded to a common length.

    Per-token tensors are ``[batch, seq]`` and aligned with ``tokens``: entry ``t`` belongs to
    token ``t`` (its log-prob is of token ``t`` given tokens ``< t``; entry 0 is always 0).

    Attributes:
        tokens: prompt + response ids, ``pad_id`` after each sample's end.
        lengths: real tokens per sample (prompt + response, eos included).
        prompt_lengths: prompt tokens per sample.
        response_mask: 1.0 on generated tokens (eos included), else 0.
        generation_logprobs: μ's log-prob of each generated token at sampling time (0 elsewhere).
        routes: ``{layer: [[micro_batch_size * seq, topk] per micro-batch]}`` in the router's
            ``[s, b]`` token order, or ``None`` when not requested.
        micro_batch_size: the micro-batching ``routes`` were recorded with.
    """

    tokens: torch.Tensor
    lengths: torch.Tensor
    prompt_lengths: torch.Tensor
    response_mask: torch.Tensor
    generation_logprobs: torch.Tensor
    routes: dict[int, list[torch.Tensor]] | None
    micro_batch_size: int

    @property
    def batch_size(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def seq_length(self) -> int:
        return int(self.tokens.shape[1])

    def responses(self) -> list[list[int]]:
        """Each sample's generated ids (eos included when sampled)."""
        return [
            self.tokens[i, int(p) : int(n)].tolist()
            for i, (p, n) in enumerate(zip(self.prompt_lengths, self.lengths))
        ]


class RolloutEngine:
    """bf16 policy copy: ``refresh`` from the trainer, ``generate`` rollouts with their routes.

    ``mode``: ``r3`` records the routes its live routers choose; ``pr2_r3`` builds the routers in
    pr2 mode and samples *and* records under ``logits + predicted offset`` (the predictor comes
    from the trainer through ``refresh(..., include_predictor=True)``).
    """

    def __init__(
        self,
        config: TransformerConfig,
        vocab_size: int,
        max_sequence_length: int,
        *,
        pad_id: int,
        eos_id: int,
        mode: EngineMode = "r3",
        predictor: PredictorConfig | None = None,
        build_chunks: ChunkBuilder | None = None,
        sample_vocab_size: int | None = None,
    ) -> None:
        """``build_chunks(config, replay_config)``: how to build the model (default: the tiny
        GPT of ``models.gpt``; a converted checkpoint brings its own). ``sample_vocab_size``:
        sample only ids below it (a task tokenizer smaller than the model's vocabulary);
        ``generation_logprobs`` stay the full-vocabulary ones, like vLLM's raw log-probs."""
        if mode not in ("r3", "pr2_r3"):
            raise ValueError(f"engine mode must be r3 or pr2_r3, got {mode!r}")
        self.mode: EngineMode = mode
        self.applies_predictor = mode == "pr2_r3"
        replay = RouterReplayConfig(
            mode="pr2" if self.applies_predictor else "r3",
            collect_metrics=False,  # the engine never replays
            predictor=predictor or PredictorConfig(),
        )
        if build_chunks is None:
            self.chunks = build_model_chunks(config, vocab_size, max_sequence_length, replay)
        else:
            self.chunks = build_chunks(config, replay)
        for chunk in self.chunks:
            chunk.eval()
            _to_bf16_except_predictor(chunk)
        self.session = ReplaySession(self.chunks)
        self.vocab_size = vocab_size
        self.sample_vocab_size = sample_vocab_size or vocab_size
        self.max_sequence_length = max_sequence_length
        self.pad_id, self.eos_id = pad_id, eos_id
        self._coords = RankCoords.from_megatron(bool(config.sequence_parallel))
        # Sequence parallelism splits the sequence over TP ranks: widths must divide evenly.
        self.seq_multiple = self._coords.tp_size if config.sequence_parallel else 1

    # ------------------------------------------------------------------ weights
    @torch.no_grad()
    def refresh(self, trainer_modules: Sequence[torch.nn.Module], include_predictor: bool) -> int:
        """Copy the trainer's weights in, cast to the engine's dtype (a refit after each rollout
        batch's updates). Returns the number of tensors copied.

        ``include_predictor``: also copy the PR2 predictor; only valid when the engine applies
        it (``pr2_r3``). Any other key or shape mismatch is an error, so a stale tensor can never
        survive a refit unnoticed.
        """
        if include_predictor and not self.applies_predictor:
            raise ValueError("include_predictor=True but this engine does not apply a predictor")
        modules = [getattr(m, "module", m) for m in trainer_modules]  # unwrap megatron DDP
        source = export_state_dict(modules, include_predictor=include_predictor)
        target = _named_tensors(self.chunks)
        skipped = {k for k in target if PREDICTOR_KEY_FRAGMENT in k and not include_predictor}
        missing = sorted(set(target) - set(source) - skipped)
        extra = sorted(set(source) - set(target))
        if missing or extra:
            raise ValueError(f"refresh: engine-only keys {missing}, trainer-only keys {extra}")
        for name, tensor in source.items():
            dst = target[name]
            if dst.shape != tensor.shape:
                raise ValueError(
                    f"refresh: {name} has shape {tuple(tensor.shape)} in the trainer, "
                    f"{tuple(dst.shape)} in the engine"
                )
            dst.data.copy_(tensor.detach().to(device=dst.device, dtype=dst.dtype))
        return len(source)

    # ------------------------------------------------------------------ sampling
    def _padded_width(self, width: int) -> int:
        return -(-width // self.seq_multiple) * self.seq_multiple

    def _next_token_logits(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """fp32 logits ``[b, vocab]`` of each row's next token (after ``lengths - 1``), the
        same on every rank (see module docstring)."""
        batch = _EngineMicrobatch(tokens, lengths)
        outputs = lm_forward_backward(
            self.chunks, [batch], forward_only=True, forward_step_func=self._next_token_step
        )
        local = outputs[0]["logits"] if outputs else None
        like = torch.empty(tokens.shape[0], self.vocab_size, device=comm_device())
        logits = broadcast_from_last_stage(local, like)
        return broadcast_from_data_parallel_rank0(logits).cpu()  # sampling runs on the host

    def _next_token_step(self, batches, model: torch.nn.Module):
        mb = next(batches)
        output = _forward(mb, model)

        def loss_func(logits: torch.Tensor):
            rows = torch.arange(logits.shape[0], device=logits.device)
            last = logits[rows, mb.lengths.to(logits.device) - 1].float()  # [b, vocab / tp]
            full = gather_from_tensor_model_parallel_region(last)[:, : self.vocab_size]
            return logits.sum() * 0.0, {"logits": full}

        return output, loss_func

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
    ) -> Rollout:
        """Sample up to ``max_new_tokens`` per prompt (stopping at eos) and record the routes.

        No KV cache: every step re-runs the full forward on the growing right-padded batch.
        ``generation_logprobs`` are of the *unmodified* distribution (vLLM's ``raw_logprobs``),
        so they compare with the trainer's log-probs; with ``temperature != 1`` or
        ``top_p < 1`` the sampling distribution differs from them. ``micro_batch_size`` (default:
        the whole batch) is the trainer's micro-batching that ``routes`` must match.
        """
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("generate needs at least one prompt, none of them empty")
        if temperature <= 0 or not 0 < top_p <= 1:
            raise ValueError(f"need temperature > 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
        batch = len(prompts)
        prompt_lengths = torch.tensor([len(p) for p in prompts], dtype=torch.int64)
        total = int(prompt_lengths.max()) + max_new_tokens
        if total > self.max_sequence_length:
            raise ValueError(
                f"longest prompt + max_new_tokens = {total} > max_sequence_length "
                f"{self.max_sequence_length}"
            )
        total = self._padded_width(total)
        if total > self.max_sequence_length:
            raise ValueError(
                f"generation width {total} (padded to a multiple of {self.seq_multiple} for "
                f"sequence parallelism) > max_sequence_length {self.max_sequence_length}"
            )
        tokens = torch.full((batch, total), self.pad_id, dtype=torch.int64)
        for i, prompt in enumerate(prompts):
            tokens[i, : len(prompt)] = torch.as_tensor(list(prompt), dtype=torch.int64)
        lengths = prompt_lengths.clone()
        logprobs = torch.zeros(batch, total, dtype=torch.float32)
        done = torch.zeros(batch, dtype=torch.bool)
        rows = torch.arange(batch)
        for _ in range(max_new_tokens):
            if bool(done.all()):
                break
            width = min(self._padded_width(int(lengths.max())), total)
            with self._predicted_routes():
                last = self._next_token_logits(tokens[:, :width].contiguous(), lengths)
            sampled = _sample(last[:, : self.sample_vocab_size], temperature, top_p, generator)
            raw = torch.log_softmax(last, dim=-1).gather(1, sampled[:, None]).squeeze(1)
            active = ~done
            tokens[rows[active], lengths[active]] = sampled[active]
            logprobs[rows[active], lengths[active]] = raw[active]
            lengths = torch.where(active, lengths + 1, lengths)
            done |= active & (sampled == self.eos_id)
        seq = min(self._padded_width(int(lengths.max())), total)
        tokens, logprobs = tokens[:, :seq].contiguous(), logprobs[:, :seq].contiguous()
        positions = torch.arange(seq).unsqueeze(0)
        response_mask = (
            (positions >= prompt_lengths[:, None]) & (positions < lengths[:, None])
        ).float()
        mbs = micro_batch_size or batch
        routes = self.record_routes(tokens, lengths, mbs) if return_routes else None
        return Rollout(tokens, lengths, prompt_lengths, response_mask, logprobs, routes, mbs)

    def _predicted_routes(self):
        """pr2_r3: sample under ``logits + predicted offset`` (the router's RECORD action applies
        the predictor; the recorded routes of these steps are dropped on exit)."""
        if not self.applies_predictor:
            return contextlib.nullcontext()
        return self.session.recording()

    @torch.no_grad()
    def record_routes(
        self, tokens: torch.Tensor, lengths: torch.Tensor, micro_batch_size: int
    ) -> dict[int, list[torch.Tensor]]:
        """The engine's routes for the final sequences, one forward per micro-batch.

        One forward over the finished sequences gives the same routes as the sampling steps:
        attention is causal, so position ``t`` only sees tokens ``<= t``, which did not change
        after ``t`` was generated, and the weights are fixed during generation. (Bit-equality
        across different sequence widths is up to the kernels; CPU matmuls here are row-wise
        deterministic, and a real engine reports the routes of its own passes instead.)
        Padding rows get the routes the engine happens to give them; they carry no loss.
        """
        layouts = rollout_layouts(lengths.tolist(), tokens.shape[1], micro_batch_size)
        keys = [rank_token_keys(layout, self._coords) for layout in layouts]
        microbatches = [
            _EngineMicrobatch(tokens[s : s + micro_batch_size], lengths[s : s + micro_batch_size])
            for s in range(0, tokens.shape[0], micro_batch_size)
        ]
        with self.session.recording(keys) as record:
            lm_forward_backward(
                self.chunks, microbatches, forward_only=True, forward_step_func=self._route_step
            )
        return {layer: list(record.routes[layer]) for layer in record.routes}

    @staticmethod
    def _route_step(batches, model: torch.nn.Module):
        output = _forward(next(batches), model)
        return output, lambda logits: (logits.sum() * 0.0, {})


@dataclass
class _EngineMicrobatch:
    tokens: torch.Tensor  # [b, s]; what megatron's schedule sizes the pass by
    lengths: torch.Tensor  # [b] real tokens per row


def _forward(mb: _EngineMicrobatch, model: torch.nn.Module) -> torch.Tensor:
    device = model_device(model)
    tokens = mb.tokens.to(device)
    position_ids = torch.arange(tokens.shape[1], device=device).unsqueeze(0).expand_as(tokens)
    return model(tokens, position_ids, attention_mask=None)


def _named_tensors(chunks: Sequence[torch.nn.Module]) -> dict[str, torch.Tensor]:
    """Parameters and buffers by the names ``export_state_dict`` gives them (chunk prefixes
    under virtual pipelining)."""
    out = {}
    for i, chunk in enumerate(chunks):
        prefix = "" if len(chunks) == 1 else f"chunk{i}."
        for name, t in chunk.state_dict(keep_vars=True).items():
            if torch.is_tensor(t):
                out[prefix + name] = t
    return out


def _to_bf16_except_predictor(model: torch.nn.Module) -> None:
    """What megatron's ``Float16Module`` does to a bf16 model (norms built in fp32 included),
    except the PR2 predictor, which is fp32 by design."""
    for name, param in model.named_parameters():
        if PREDICTOR_KEY_FRAGMENT not in name and param.is_floating_point():
            param.data = param.data.to(torch.bfloat16)
    for module in model.modules():
        for name, buf in module.named_buffers(recurse=False):
            if buf.is_floating_point():
                setattr(module, name, buf.to(torch.bfloat16))


def _sample(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None
) -> torch.Tensor:
    """Temperature + nucleus sampling of one token per row of ``[b, vocab]`` fp32 logits."""
    probs = sampling_probs(logits, SamplingParams(temperature=temperature, top_p=top_p))
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)
