"""End-to-end context-parallel check of replayed routes (needs 2 GPUs and Transformer Engine).

Context parallelism needs TE attention, so the CPU tests only check the CP split functions
against megatron's own ``get_batch_on_this_cp_rank``. This script closes the loop on GPUs:
the same batch, with the same engine-format (vLLM) routes, is replayed with CP=1 (data-parallel
world of 2 on identical data) and with CP=2 (zig-zag split of tokens and of routes through
``megatron_pr2.routes.layout``); losses and router gradients must agree.

    torchrun --nproc-per-node 2 bench/gpu/check_cp_replay.py

Not run yet (no session so far had two GPUs; a lent machine has one). Exit status 2 when the
hardware or TE is missing, 1 when the check fails.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO_ROOT)

SEQ, MICRO_BATCH, MICROBATCHES = 256, 2, 2


def _require_hardware() -> None:
    if not torch.cuda.is_available() or int(os.environ.get("WORLD_SIZE", "1")) != 2:
        print("check_cp_replay: needs torchrun with 2 processes on 2 GPUs", file=sys.stderr)
        raise SystemExit(2)
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        print("check_cp_replay: needs Transformer Engine (CP attention)", file=sys.stderr)
        raise SystemExit(2) from None


def _run(cp: int) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    from megatron.core.utils import get_batch_on_this_cp_rank

    from megatron_pr2.config import RouterReplayConfig
    from megatron_pr2.models.gpt import TinyMoEShape, moe_transformer_config
    from megatron_pr2.patch import with_replay_router
    from megatron_pr2.replay.session import ReplaySession
    from megatron_pr2.routes.layout import MicrobatchLayout, RankCoords, batch_routes
    from megatron_pr2.routes.payload import RouteSpec, parse_vllm

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(context_parallel_size=cp)
    model_parallel_cuda_manual_seed(7)
    torch.manual_seed(7)
    shape = TinyMoEShape(num_layers=2, hidden_size=256, num_attention_heads=8, vocab_size=512)
    config = moe_transformer_config(shape, context_parallel_size=cp, batch_p2p_comm=True)
    spec = with_replay_router(
        get_gpt_decoder_block_spec(config, use_transformer_engine=True),
        RouterReplayConfig(mode="r3"),
    )
    model = GPTModel(config, spec, shape.vocab_size, SEQ, position_embedding_type="rope").cuda()
    session = ReplaySession([model])

    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(
        0, shape.vocab_size, (MICROBATCHES * MICRO_BATCH, SEQ + 1), generator=generator
    )
    route_spec = RouteSpec.from_config(config)
    payloads = []
    for sample in range(tokens.shape[0]):
        g = torch.Generator().manual_seed(100 + sample)
        rows = torch.rand(SEQ - 1, len(route_spec.moe_layers), shape.num_moe_experts, generator=g)
        rows = rows.argsort(-1)[..., : shape.moe_router_topk].to(torch.int16).numpy()
        payloads.append(parse_vllm(sample, rows, num_tokens=SEQ, spec=route_spec))
    layouts = [
        MicrobatchLayout.bshd(
            [m * MICRO_BATCH + i for i in range(MICRO_BATCH)], [SEQ] * MICRO_BATCH, SEQ
        )
        for m in range(MICROBATCHES)
    ]
    routes = batch_routes(
        payloads, layouts, RankCoords.from_megatron(config.sequence_parallel), session.layers
    )

    batches = iter(range(MICROBATCHES))

    def forward_step(_iterator, module):
        m = next(batches)
        rows = slice(m * MICRO_BATCH, (m + 1) * MICRO_BATCH)
        seq = torch.arange(SEQ).expand(MICRO_BATCH, SEQ)
        batch = {
            "tokens": tokens[rows, :-1],
            "labels": tokens[rows, 1:],
            "position_ids": seq,
            "loss_mask": torch.ones(MICRO_BATCH, SEQ),
        }
        batch = get_batch_on_this_cp_rank({k: v.cuda() for k, v in batch.items()})
        out = module(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])

        def loss_func(per_token):
            local = (per_token * batch["loss_mask"]).sum()  # this CP rank's tokens
            total = local.detach().clone()
            dist.all_reduce(total, group=parallel_state.get_context_parallel_group())
            return local / (MICRO_BATCH * SEQ), {"lm_loss": total / (MICRO_BATCH * SEQ)}

        return out, loss_func

    with session.replaying(routes):
        losses = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=None,
            model=model,
            num_microbatches=MICROBATCHES,
            seq_length=SEQ,
            micro_batch_size=MICRO_BATCH,
        )
    grads = {}
    for layer in session.layers:
        weight = session._routers[layer].weight
        grad = weight.grad.detach().clone()
        dist.all_reduce(grad)  # CP=2: the two halves of the tokens; CP=1: identical DP copies
        grads[layer] = grad if cp > 1 else grad / dist.get_world_size()
    loss = torch.stack([d["lm_loss"] for d in losses])
    return loss, grads


def main() -> None:
    _require_hardware()
    dist.init_process_group("nccl")
    torch.cuda.set_device(dist.get_rank())
    reference_loss, reference_grads = _run(cp=1)
    loss, grads = _run(cp=2)
    ok = torch.allclose(loss, reference_loss, rtol=1e-3)
    for layer in reference_grads:
        ok &= torch.allclose(grads[layer], reference_grads[layer], rtol=1e-2, atol=1e-5)
    if dist.get_rank() == 0:
        print(f"GPU: {torch.cuda.get_device_name()}; CP=1 loss {reference_loss.tolist()}")
        print(f"CP=2 loss {loss.tolist()}; router grads agree: {ok}")
    dist.destroy_process_group()
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
