"""Per-router PR2 state: feature cache of the recording pass, loss of the update passes, and
the predictive metrics counters."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from megatron_pr2.config import PredictorConfig
from megatron_pr2.predictor.cache import FeatureCache, sampled
from megatron_pr2.predictor.loss import per_token_predictor_loss
from megatron_pr2.predictor.module import EvolutionPredictor
from megatron_pr2.replay.keys import MicrobatchKeys

# Layout of the predictive counter vector (float64).
LOSS_SUM, LOSS_CALLS, ACC_OVERLAP, ACC_TOKENS, BIAS_ABS, LOGIT_ABS, CACHE_TOKENS, CACHE_BYTES = (
    range(8)
)
NUM_COUNTERS = 8
_FOLD_TERMS = 256  # per-call metric terms kept per counter before they are summed


class PredictorState:
    def __init__(self, config: PredictorConfig, topk: int) -> None:
        self.config = config
        self.topk = topk
        self.cache = FeatureCache(config.cache_dtype)
        self.compute_loss = False
        self.cache_features = False  # a REPLAY pass that caches features (pr2_r3)
        self._host_counts = [0.0] * NUM_COUNTERS  # plain floats: no torch op per call
        # Per-call terms kept on the router's device and summed once per metrics() call: no
        # host sync and no torch op per call (a list append), folded when a list grows long.
        self._device_terms: dict[int, list[torch.Tensor]] = {}

    def start_recording(self) -> None:
        """New rollout batch: drop the previous batch's cache."""
        self.cache.clear()

    def _add_on_device(self, index: int, value: torch.Tensor) -> None:
        """Add a 0-dim device tensor without autograd history to counter ``index``."""
        terms = self._device_terms.setdefault(index, [])
        terms.append(value)
        if len(terms) >= _FOLD_TERMS:  # bounded memory if metrics are never taken (a trainer
            terms[:] = [torch.stack(terms).sum()]  # takes them every step: no fold happens)

    @torch.no_grad()
    def record(
        self,
        predictor: EvolutionPredictor,
        hidden: torch.Tensor,
        logits: torch.Tensor,
        keys: MicrobatchKeys,
    ) -> torch.Tensor:
        """Cache the sampled tokens' features; return the predicted offset for all tokens
        (clipped by ``offset_clip``)."""
        offset = predictor(hidden)
        if self.config.offset_clip > 0:
            bound = self.config.offset_clip * logits.detach().float().std(dim=-1, keepdim=True)
            offset = torch.maximum(torch.minimum(offset, bound), -bound)
        room = self.config.cache_tokens_per_step - self.cache.num_tokens
        if room > 0:
            device_rows, row_keys = self._sampled_rows(keys)
            if room < row_keys.shape[0]:
                device_rows, row_keys = device_rows[:room], row_keys[:room]
            self.cache.add(row_keys, hidden[device_rows], logits[device_rows])
        self._add_on_device(BIAS_ABS, offset.norm(p=1))
        self._add_on_device(LOGIT_ABS, logits.norm(p=1))
        return offset

    def _sampled_rows(self, keys: MicrobatchKeys) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows on the device, their host keys) of the tokens the cache samples: the same for
        every layer, so derived once per microbatch, on the host."""
        fraction = self.config.cache_keep_fraction

        def compute() -> tuple[torch.Tensor, torch.Tensor]:
            # Negative keys mark padding (routes.layout): never a training target.
            rows = (sampled(keys.host, fraction) & (keys.host >= 0)).nonzero().flatten()
            return rows.to(keys.on_device.device, non_blocking=True), keys.host[rows]

        return keys.derived(("cache_rows", fraction), compute)

    def _cached_rows(self, keys: MicrobatchKeys) -> tuple[torch.Tensor, torch.Tensor]:
        """(device rows of ``keys`` found in the cache, their cache positions); shared by the
        layers whose caches share a key tensor (see ``FeatureCache.share_keys_with``)."""
        cached = self.cache.sorted_keys

        def compute() -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
            rows, positions = self.cache.locate(keys.host)
            return cached, rows.to(keys.on_device.device, non_blocking=True), positions

        # The memo holds ``cached`` itself, so its id cannot be reused while the memo lives.
        found = keys.derived(("cache_rows_of", id(cached)), compute)
        return found[1], found[2]

    def loss(
        self,
        predictor: EvolutionPredictor,
        current_logits: torch.Tensor,
        keys: MicrobatchKeys,
        token_group: torch.distributed.ProcessGroup | None = None,
    ) -> torch.Tensor:
        """Mean loss over this microbatch's cached tokens (gradient to the predictor only).

        ``token_group``: ranks that hold other tokens of the same microbatch (TP under sequence
        parallelism, CP). The mean is taken over all of their cached tokens, so the predictor
        gradient summed over that group (megatron's all-reduce of ``sequence_parallel``
        params) equals the single-rank gradient.
        """
        rows, positions = self._cached_rows(keys)
        num_rows = rows.numel()
        denominator: float | torch.Tensor = max(float(num_rows), 1.0)
        if token_group is not None and token_group.size() > 1:  # stays on device: no host sync
            total = torch.tensor([float(num_rows)], device=current_logits.device)
            torch.distributed.all_reduce(total, group=token_group)
            denominator = total.clamp(min=1.0).squeeze(0)
        if num_rows == 0:  # still join the backward so every rank's predictor gets a grad
            return predictor.weight.sum() * 0.0
        old_hidden, old_logits = self.cache.features(positions, current_logits.device)
        offset = predictor(old_hidden)
        current = current_logits.detach()[rows]  # the loss takes it in fp32
        per_token = per_token_predictor_loss(self.config.loss_type, offset, old_logits, current)
        loss = per_token.sum() / denominator
        with torch.no_grad():
            k = self.topk
            predicted = (old_logits + offset).topk(k, dim=1).indices
            target = current.topk(k, dim=1).indices
            # top-k ids within a row are distinct: the pair matches count the shared experts
            overlap = (predicted.unsqueeze(2) == target.unsqueeze(1)).sum()
            self._add_on_device(LOSS_SUM, loss.detach())
            self._add_on_device(ACC_OVERLAP, overlap)
            self._host_counts[LOSS_CALLS] += 1
            self._host_counts[ACC_TOKENS] += num_rows
        return loss

    def take_counters(self) -> list[float]:
        """The counter vector since the last call (one host read of the device terms)."""
        counters = self._host_counts
        if self._device_terms:
            sums = torch.stack(
                [torch.stack(terms).double().sum() for terms in self._device_terms.values()]
            )
            for index, total in zip(self._device_terms, sums.tolist()):
                counters[index] += total
            self._device_terms = {}
        counters[CACHE_TOKENS] = float(self.cache.num_tokens)
        counters[CACHE_BYTES] = float(self.cache.nbytes)
        self._host_counts = [0.0] * NUM_COUNTERS
        return counters


def summarize(per_layer: Mapping[int, Sequence[float]], topk: int) -> dict[str, float]:
    """``pr2/{predictive_loss, predictive_topk_accuracy, bias_to_logits_ratio, cache_tokens,
    cache_bytes}``, layer-averaged and per layer (``/layer_{n}``), from (reduced) counter
    vectors."""
    out: dict[str, float] = {}

    def named(c: Sequence[float], suffix: str) -> dict[str, float]:
        metrics = {
            f"pr2/cache_tokens{suffix}": c[CACHE_TOKENS],
            f"pr2/cache_bytes{suffix}": c[CACHE_BYTES],
        }
        if c[LOGIT_ABS] > 0:
            metrics[f"pr2/bias_to_logits_ratio{suffix}"] = c[BIAS_ABS] / c[LOGIT_ABS]
        if c[LOSS_CALLS] > 0:
            metrics[f"pr2/predictive_loss{suffix}"] = c[LOSS_SUM] / c[LOSS_CALLS]
        if c[ACC_TOKENS] > 0:
            metrics[f"pr2/predictive_topk_accuracy{suffix}"] = c[ACC_OVERLAP] / (
                c[ACC_TOKENS] * topk
            )
        return metrics

    if not per_layer:
        return out
    layers = sorted(per_layer)
    for layer in layers:
        out.update(named(per_layer[layer], f"/layer_{layer}"))
    for name in ("predictive_loss", "predictive_topk_accuracy", "bias_to_logits_ratio"):
        values = [
            out[f"pr2/{name}/layer_{layer}"]
            for layer in layers
            if f"pr2/{name}/layer_{layer}" in out
        ]
        if values:
            out[f"pr2/{name}"] = sum(values) / len(values)
    out["pr2/cache_tokens"] = float(sum(per_layer[layer][CACHE_TOKENS] for layer in layers))
    out["pr2/cache_bytes"] = float(sum(per_layer[layer][CACHE_BYTES] for layer in layers))
    return out
