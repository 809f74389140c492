"""vLLM as the rollout engine: its request outputs -> the trainer's :class:`Rollout`.

Why a conversion layer and not a vLLM wrapper: the parts that can go wrong for replay are the
output formats (token ids, per-token log-probs, routed experts), and those are checked here,
with recorded outputs, on any machine. Driving vLLM itself (engine construction, weight
transfer) depends on the cluster, so it is injected: an ``llm`` with vLLM's ``generate`` and a
``weight_sync`` that pushes the trainer's tensors into it.

What vLLM must be started with for this contract:

* ``enable_return_routed_experts=True``: each ``RequestOutput`` carries
  ``prompt_routed_experts`` ``[P, layers, topk]`` and each completion ``routed_experts``
  ``[G, layers, topk]`` (int16); :func:`megatron_pr2.routes.payload.parse_vllm` reads that
  split layout (``P`` = the prompt's tokens, ``P + G`` = ``num_tokens - 1`` or ``num_tokens``).
* ``logprobs_mode="raw_logprobs"`` and ``SamplingParams(logprobs=0)``: the sampled token's
  log-prob of the unmodified distribution, which is what the importance ratio needs.

``pr2_r3`` (sampling under the PR2 predictor) is not available: vLLM's router has no predictor.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from megatron_pr2.models.training import export_state_dict
from megatron_pr2.rl.engine import Rollout
from megatron_pr2.rl.rollout_routes import rollout_routes
from megatron_pr2.routes.layout import RankCoords
from megatron_pr2.routes.payload import RouteSpec, VllmRoutes

__all__ = ["VLLMBackend", "WeightSync", "rollout_from_vllm"]

WeightSync = Callable[[dict[str, torch.Tensor]], None]


class VLLMBackend:
    """A :class:`~megatron_pr2.rl.backend.GenerationBackend` over a vLLM ``LLM``.

    ``llm``: a vLLM ``LLM`` (or anything with its ``generate(prompts, sampling_params)``);
    ``weight_sync``: receives the trainer's megatron state dict on every refit (converting
    names to the served checkpoint's and loading them is the cluster's business);
    ``layers``: this rank's MoE layer numbers (default: all of ``spec``'s).
    """

    applies_predictor = False

    def __init__(
        self,
        llm: Any,
        weight_sync: WeightSync,
        spec: RouteSpec,
        *,
        pad_id: int,
        sample_vocab_size: int | None = None,
        coords: RankCoords | None = None,
        layers: Sequence[int] | None = None,
    ) -> None:
        self.llm, self.weight_sync, self.spec = llm, weight_sync, spec
        self.pad_id = pad_id
        self.sample_vocab_size = sample_vocab_size
        self.coords = coords or RankCoords()
        self.layers = tuple(layers) if layers is not None else spec.moe_layers

    def refresh(self, trainer_modules: Sequence[torch.nn.Module], include_predictor: bool) -> int:
        """Send the trainer's weights to vLLM through ``weight_sync``."""
        if include_predictor:
            raise ValueError("vLLM cannot apply the PR2 predictor (pr2_r3); use r3 or pr2")
        modules = [getattr(m, "module", m) for m in trainer_modules]  # unwrap megatron DDP
        state = export_state_dict(modules, include_predictor=False)
        self.weight_sync(state)
        return len(state)

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
        """One vLLM request per prompt (seeded from ``generator``), converted to a Rollout."""
        try:
            from vllm import SamplingParams
        except ImportError as error:
            raise ImportError(
                "generation.backend=vllm needs the vllm package, which is not importable here "
                f"({error}); install vLLM on the GPU nodes or use generation.backend=megatron"
            ) from error
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("generate needs at least one prompt, none of them empty")
        seeds = torch.randint(0, 2**31 - 1, (len(prompts),), generator=generator).tolist()
        allowed = (
            list(range(self.sample_vocab_size)) if self.sample_vocab_size is not None else None
        )
        params = [
            SamplingParams(
                n=1,
                temperature=temperature,
                top_p=top_p,
                top_k=-1 if top_k is None else top_k,
                max_tokens=max_new_tokens,
                logprobs=0,
                seed=seed,
                allowed_token_ids=allowed,
            )
            for seed in seeds
        ]
        requests = [{"prompt_token_ids": list(p)} for p in prompts]
        outputs = self.llm.generate(requests, params)
        return rollout_from_vllm(
            outputs,
            prompts,
            pad_id=self.pad_id,
            micro_batch_size=micro_batch_size or len(prompts),
            spec=self.spec if return_routes else None,
            coords=self.coords,
            layers=self.layers,
        )


def rollout_from_vllm(
    outputs: Sequence[Any],
    prompts: Sequence[Sequence[int]],
    *,
    pad_id: int,
    micro_batch_size: int,
    spec: RouteSpec | None,
    coords: RankCoords | None = None,
    layers: Sequence[int] | None = None,
) -> Rollout:
    """vLLM ``RequestOutput``s (objects or mappings, one completion each, in prompt order) ->
    a right-padded :class:`Rollout` (width a multiple of the SP split, as the recompute
    engine pads it). ``spec=None``: no routes."""
    if len(outputs) != len(prompts):
        raise ValueError(f"vLLM returned {len(outputs)} outputs for {len(prompts)} prompts")
    sequences: list[list[int]] = []
    logprob_rows: list[list[float]] = []
    route_rows: list[Any] = []  # VllmRoutes, or combined rows
    for i, (output, prompt) in enumerate(zip(outputs, prompts)):
        reported = _get(output, "prompt_token_ids")
        if reported is not None and list(reported) != list(prompt):
            raise ValueError(f"sample {i}: vLLM's prompt_token_ids differ from the prompt sent")
        completions = _get(output, "outputs") or []
        if len(completions) != 1:
            raise ValueError(f"sample {i}: expected one completion, got {len(completions)}")
        completion = completions[0]
        ids = [int(t) for t in _get(completion, "token_ids")]
        if not ids:
            raise ValueError(f"sample {i}: vLLM returned an empty completion")
        sequences.append(list(prompt) + ids)
        logprob_rows.append(_sampled_logprobs(i, ids, _get(completion, "logprobs")))
        if spec is not None:
            route_rows.append(_sample_routes(i, output, completion, len(prompt)))
    batch = len(sequences)
    lengths = torch.tensor([len(s) for s in sequences], dtype=torch.int64)
    prompt_lengths = torch.tensor([len(p) for p in prompts], dtype=torch.int64)
    coords = coords or RankCoords()
    split = coords.sp_split  # sequence parallelism: the width must divide over TP ranks
    seq = -(-int(lengths.max()) // split) * split
    tokens = torch.full((batch, seq), pad_id, dtype=torch.int64)
    logprobs = torch.zeros(batch, seq, dtype=torch.float32)
    for i, (sequence, row) in enumerate(zip(sequences, logprob_rows)):
        tokens[i, : len(sequence)] = torch.tensor(sequence)
        logprobs[i, len(prompts[i]) : len(sequence)] = torch.tensor(row)
    positions = torch.arange(seq).unsqueeze(0)
    response_mask = (
        (positions >= prompt_lengths[:, None]) & (positions < lengths[:, None])
    ).float()
    routes = None
    if spec is not None:
        routes = rollout_routes(
            route_rows,
            lengths.tolist(),
            seq_length=seq,
            micro_batch_size=micro_batch_size,
            spec=spec,
            coords=coords,
            layers=layers if layers is not None else spec.moe_layers,
            source="vllm",
        )
    return Rollout(
        tokens, lengths, prompt_lengths, response_mask, logprobs, routes, micro_batch_size
    )


def _get(obj: Any, key: str) -> Any:
    return obj.get(key) if isinstance(obj, Mapping) else getattr(obj, key, None)


def _sampled_logprobs(sample: int, ids: Sequence[int], logprobs: Any) -> list[float]:
    """The sampled token's log-prob at each generated position (vLLM: a list, one
    ``{token_id: Logprob | float}`` per generated token, the sampled id always present)."""
    if logprobs is None or len(logprobs) != len(ids):
        got = None if logprobs is None else len(logprobs)
        raise ValueError(
            f"sample {sample}: expected {len(ids)} per-token log-prob entries (vLLM "
            f"SamplingParams(logprobs=0)), got {got}"
        )
    out = []
    for position, (token, entry) in enumerate(zip(ids, logprobs)):
        value = entry.get(token) if isinstance(entry, Mapping) else None
        if value is None:
            raise ValueError(
                f"sample {sample}, generated token {position}: no log-prob for sampled id {token}"
            )
        out.append(float(getattr(value, "logprob", value)))
    return out


def _sample_routes(sample: int, output: Any, completion: Any, prompt_tokens: int) -> Any:
    """vLLM's routes of one sample as it returns them: the request's ``prompt_routed_experts``
    and the completion's ``routed_experts`` apart (:class:`VllmRoutes`, parsed by
    :func:`parse_vllm`), or the completion's rows alone from an engine that reports the whole
    sequence there."""
    generated = _get(completion, "routed_experts")
    if generated is None:
        raise ValueError(
            f"sample {sample}: no routed_experts in vLLM's completion (start vLLM with "
            "enable_return_routed_experts=True)"
        )
    prompt = _get(output, "prompt_routed_experts")
    if prompt is None:  # an engine that reports the whole sequence on the completion
        return generated
    return VllmRoutes(prompt, generated, prompt_tokens)
