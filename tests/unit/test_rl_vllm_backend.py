"""The vLLM backend on recorded outputs: hand-made ``RequestOutput``s in vLLM's shape (token ids,
per-token ``{id: Logprob}`` dicts, int16 ``prompt_routed_experts`` / ``routed_experts``) become
the same Rollout the megatron engine returns."""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from megatron_pr2.rl.backend import GenerationBackend
from megatron_pr2.rl.vllm_backend import VLLMBackend, rollout_from_vllm
from megatron_pr2.routes.layout import RankCoords
from megatron_pr2.routes.payload import RouteSpec

SPEC = RouteSpec(num_layers=3, num_experts=8, topk=2, moe_layer_freq=[0, 1, 1])  # MoE: 2, 3
PAD = 0
PROMPTS = [[5, 6, 7], [8, 9]]
COMPLETIONS = [[11, 12], [13, 14, 1]]


def rows(num: int, seed: int) -> np.ndarray:
    """Distinct expert ids per token and MoE layer, int16 as vLLM returns them."""
    g = np.random.default_rng(seed)
    return np.stack(
        [np.stack([g.permutation(8)[:2] for _ in range(2)]) for _ in range(num)]
    ).astype(np.int16)


def recorded_outputs(as_objects: bool):
    """One RequestOutput per prompt; completion routes cover every generated token (the last
    one is the surplus row vLLM reports for the unforwarded final token)."""
    outputs = []
    for i, (prompt, completion) in enumerate(zip(PROMPTS, COMPLETIONS)):
        logprobs = [
            {t: SimpleNamespace(logprob=-0.5 - j - i), 99: SimpleNamespace(logprob=-9.0)}
            if as_objects
            else {t: -0.5 - j - i}
            for j, t in enumerate(completion)
        ]
        out = dict(
            prompt_token_ids=list(prompt),
            prompt_routed_experts=rows(len(prompt), 10 + i),
            outputs=[
                dict(
                    token_ids=list(completion),
                    logprobs=logprobs,
                    routed_experts=rows(len(completion), 20 + i),
                )
            ],
        )
        if as_objects:
            out["outputs"] = [SimpleNamespace(**out["outputs"][0])]
            out = SimpleNamespace(**out)
        outputs.append(out)
    return outputs


@pytest.mark.parametrize("as_objects", [False, True])
def test_recorded_vllm_outputs_become_a_rollout(as_objects):
    outputs = recorded_outputs(as_objects)
    rollout = rollout_from_vllm(outputs, PROMPTS, pad_id=PAD, micro_batch_size=2, spec=SPEC)
    assert rollout.tokens.tolist() == [[5, 6, 7, 11, 12], [8, 9, 13, 14, 1]]
    assert rollout.lengths.tolist() == [5, 5]
    assert rollout.prompt_lengths.tolist() == [3, 2]
    assert rollout.responses() == COMPLETIONS
    assert rollout.response_mask.tolist() == [[0, 0, 0, 1, 1], [0, 0, 1, 1, 1]]
    expected_lp = torch.tensor([[0, 0, 0, -0.5, -1.5], [0, 0, -1.5, -2.5, -3.5]])
    assert torch.allclose(rollout.generation_logprobs, expected_lp)
    assert sorted(rollout.routes) == [2, 3]
    for column, layer in enumerate((2, 3)):
        (routes,) = rollout.routes[layer]  # one micro-batch of 2, [s, b] order
        per = routes.long().view(5, 2, 2)
        for b, out in enumerate(recorded_outputs(False)):
            sent = np.concatenate(
                [out["prompt_routed_experts"], out["outputs"][0]["routed_experts"]]
            )
            n = int(rollout.lengths[b])
            assert per[: n - 1, b].tolist() == sent[: n - 1, column].tolist()
            last = per[n - 1, b]  # synthetic, legal: distinct ids in range
            assert last[0] != last[1] and 0 <= int(last.min()) and int(last.max()) < 8


def test_sequence_parallel_width_and_no_routes():
    coords = RankCoords(tp_size=4, tp_rank=1, sequence_parallel=True)
    rollout = rollout_from_vllm(
        recorded_outputs(False), PROMPTS, pad_id=PAD, micro_batch_size=1, spec=None, coords=coords
    )
    assert rollout.seq_length == 8 and rollout.routes is None
    assert rollout.tokens[0, 5:].tolist() == [PAD] * 3


def test_bad_outputs_name_the_sample():
    outputs = recorded_outputs(False)
    outputs[1]["outputs"][0]["routed_experts"] = None
    with pytest.raises(ValueError, match="sample 1: no routed_experts"):
        rollout_from_vllm(outputs, PROMPTS, pad_id=PAD, micro_batch_size=2, spec=SPEC)
    outputs = recorded_outputs(False)
    outputs[0]["outputs"][0]["logprobs"][1] = {3: -1.0}
    with pytest.raises(ValueError, match="sample 0, generated token 1: no log-prob"):
        rollout_from_vllm(outputs, PROMPTS, pad_id=PAD, micro_batch_size=2, spec=SPEC)
    outputs = recorded_outputs(False)
    outputs[0]["prompt_token_ids"] = [5, 6]
    with pytest.raises(ValueError, match="sample 0: vLLM's prompt_token_ids differ"):
        rollout_from_vllm(outputs, PROMPTS, pad_id=PAD, micro_batch_size=2, spec=SPEC)
    outputs = recorded_outputs(False)
    outputs[1]["outputs"][0]["routed_experts"][0, 0] = [4, 4]  # duplicate expert
    with pytest.raises(ValueError, match=r"sample 1.*duplicate"):
        rollout_from_vllm(outputs, PROMPTS, pad_id=PAD, micro_batch_size=2, spec=SPEC)


def test_generate_without_vllm_says_so(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError
    backend = VLLMBackend(object(), lambda state: None, SPEC, pad_id=PAD)
    assert isinstance(backend, GenerationBackend)
    with pytest.raises(ImportError, match=r"generation\.backend=vllm needs the vllm package"):
        backend.generate(PROMPTS, 4)


@dataclass
class FakeSamplingParams:
    """vLLM's SamplingParams fields this backend sets."""

    n: int
    temperature: float
    top_p: float
    top_k: int
    max_tokens: int
    logprobs: int
    seed: int
    allowed_token_ids: list[int] | None = field(default=None)


def test_generate_drives_llm_with_seeded_raw_logprob_requests(monkeypatch):
    fake_vllm = types.SimpleNamespace(SamplingParams=FakeSamplingParams)
    monkeypatch.setitem(sys.modules, "vllm", fake_vllm)
    seen = {}

    class RecordedLLM:
        def generate(self, requests, params):
            seen["requests"], seen["params"] = requests, params
            return recorded_outputs(True)

    synced = {}
    backend = VLLMBackend(RecordedLLM(), synced.update, SPEC, pad_id=PAD, sample_vocab_size=16)
    rollout = backend.generate(
        PROMPTS, 3, temperature=0.7, top_p=0.9, generator=torch.Generator().manual_seed(0)
    )
    assert seen["requests"] == [{"prompt_token_ids": p} for p in PROMPTS]
    first = seen["params"][0]
    assert (first.top_k, first.logprobs, first.max_tokens, first.temperature) == (-1, 0, 3, 0.7)
    assert first.allowed_token_ids == list(range(16))
    seeds = [p.seed for p in seen["params"]]
    assert len(set(seeds)) == 2  # one seed per request, drawn from the trainer's sampler
    backend.generate(PROMPTS, 3, generator=torch.Generator().manual_seed(0))
    assert [p.seed for p in seen["params"]] == seeds
    assert rollout.responses() == COMPLETIONS and sorted(rollout.routes) == [2, 3]

    module = torch.nn.Linear(2, 2)
    assert backend.refresh([module], include_predictor=False) == 2
    assert sorted(synced) == ["bias", "weight"]
    with pytest.raises(ValueError, match="PR2 predictor"):
        backend.refresh([module], include_predictor=True)
