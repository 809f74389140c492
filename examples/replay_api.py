"""The README's "Using it" code, runnable: R2 replay around megatron-core's own schedule, then
PR2 with megatron's optimizer and the evolution predictor::

    .venv/bin/python examples/replay_api.py

The code between ``# [readme:NAME]`` and ``# [/readme:NAME]`` is what README.md shows
(``tests/unit/test_readme.py`` runs this file and checks that the README matches it byte for
byte). On a machine without CUDA it uses the project's test-only CPU shim (``tests/support``),
which lets real megatron-core run on gloo; the package itself never imports it.
"""

from __future__ import annotations

import os
import sys
import warnings

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB, SEQ, MICRO_BATCH = 128, 32, 2  # the stand-in data (the model: vocab 128, up to 64)


def _microbatches(count: int, seed: int = 0) -> list:
    """``count`` random LM microbatches of ``MICRO_BATCH`` x ``SEQ`` tokens (stand-in data)."""
    from megatron_pr2.models.gpt import LMBatch

    torch.manual_seed(seed)  # the model's initial weights too
    generator = torch.Generator().manual_seed(seed)
    return [LMBatch.random(MICRO_BATCH, SEQ, VOCAB, generator) for _ in range(count)]


def r2_replay(num_mini_steps: int = 2, seed: int = 0) -> dict[str, float]:
    """R2 on a plain megatron GPTModel: record the routes of the old-log-prob pass, replay them
    in each update on that batch; returns the replay metrics of the updates."""
    microbatches = _microbatches(2 * num_mini_steps, seed)  # one rollout batch
    # [readme:using-it]
    import torch
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_pr2.config import RouterReplayConfig
    from megatron_pr2.models.gpt import lm_forward_step, moe_transformer_config
    from megatron_pr2.patch import with_replay_router
    from megatron_pr2.replay.session import ReplaySession

    config = moe_transformer_config()  # any MoE TransformerConfig; this one is tiny and CPU-safe
    spec = with_replay_router(
        get_gpt_decoder_block_spec(config, use_transformer_engine=False),  # True with TE
        RouterReplayConfig(mode="r2"),
    )
    model = GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=128,
        max_sequence_length=64,
        position_embedding_type="rope",
    )
    if torch.cuda.is_available():
        model.cuda()  # as megatron's get_model does after CPU initialisation
    session = ReplaySession([model])  # this rank's model chunks; routers keyed by layer number
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)

    def forward_backward(batches: list, forward_only: bool = False) -> list[dict]:
        return get_forward_backward_func()(
            forward_step_func=lm_forward_step,  # your forward step
            data_iterator=iter(batches),
            model=[model],
            num_microbatches=len(batches),
            seq_length=batches[0].tokens.shape[1],
            micro_batch_size=batches[0].tokens.shape[0],
            forward_only=forward_only,
        )

    with torch.no_grad(), session.recording() as record:  # r2: the old-log-prob pass
        forward_backward(microbatches, forward_only=True)
    per_step = len(microbatches) // num_mini_steps
    for i in range(num_mini_steps):  # mini-step i: the i-th mini-batch, i updates off-policy
        part = slice(i * per_step, (i + 1) * per_step)
        routes = {layer: plans[part] for layer, plans in record.routes.items()}
        optimizer.zero_grad()
        with session.replaying(routes):  # r3: the rollout engine's routes instead
            forward_backward(microbatches[part])
        optimizer.step()
    metrics = session.metrics()  # collective over all ranks
    # [/readme:using-it]
    return metrics


def pr2_replay(num_mini_steps: int = 3, seed: int = 0) -> tuple[dict[str, float], float]:
    """PR2: routes from ``old logits + predicted offset``, the predictor trained from mini-step
    1 on. Returns the replay/pr2 metrics of the updates and the predictor weights' norm."""
    microbatches = _microbatches(2 * num_mini_steps, seed)
    # [readme:pr2]
    import torch

    from megatron_pr2.config import PredictorConfig, RouterReplayConfig
    from megatron_pr2.models.gpt import (
        LMBatch,
        build_model_chunks,
        lm_forward_backward,
        moe_transformer_config,
    )
    from megatron_pr2.models.training import predictor_named_parameters, setup_training, train_step
    from megatron_pr2.predictor.cache import token_keys
    from megatron_pr2.replay.session import ReplaySession

    replay = RouterReplayConfig(mode="pr2", predictor=PredictorConfig(lr_mult=1000.0))
    chunks = build_model_chunks(moe_transformer_config(), 128, 64, replay)  # predictor = 0
    setup = setup_training(chunks, lr=1e-5, predictor_lr_mult=replay.predictor.lr_mult)
    session = ReplaySession(setup.modules)  # setup: megatron DDP + optimizer (predictor group)

    def router_token_keys(batch: LMBatch, first_sample: int) -> torch.Tensor:
        """``sample << 32 | position`` of each router row (sequence-major ``[s, b]`` order)."""
        b, s = batch.tokens.shape
        samples = torch.arange(first_sample, first_sample + b)[None, :].expand(s, b)
        return token_keys(samples, torch.arange(s)[:, None].expand(s, b)).flatten()

    keys = [router_token_keys(mb, j * mb.tokens.shape[0]) for j, mb in enumerate(microbatches)]
    with torch.no_grad(), session.recording(keys) as record:  # top-k of logits + offset; caches
        lm_forward_backward(setup.chunks, microbatches, forward_only=True)  # (input, old logits)
    per_step = len(microbatches) // num_mini_steps
    for i in range(num_mini_steps):
        part = slice(i * per_step, (i + 1) * per_step)
        routes = {layer: plans[part] for layer, plans in record.routes.items()}
        with session.replaying(routes, keys[part], predictor_loss=i >= 1):
            train_step(setup, microbatches[part], predictor_active=i >= 1)
    metrics = session.metrics()  # also pr2/predictive_loss, pr2/predictive_topk_accuracy, ...
    predictor = predictor_named_parameters(setup.modules)  # zero until mini-step 1 trained it
    # [/readme:pr2]
    return metrics, float(sum(p.detach().norm() for p in predictor.values()))


def main() -> None:
    r2 = r2_replay()
    print(f"r2: zero-deviation ratio {r2['router_replay/zero_deviation_ratio']:.3f}", flush=True)
    pr2, norm = pr2_replay()
    print(
        f"pr2: predictive loss {pr2['pr2/predictive_loss']:.4f}, predictor weight norm {norm:.4f}",
        flush=True,
    )


if __name__ == "__main__":
    warnings.filterwarnings("ignore", category=UserWarning)
    sys.path.insert(0, REPO_ROOT)
    if torch.cuda.is_available():
        from megatron.core import parallel_state

        torch.distributed.init_process_group(
            "nccl", init_method="tcp://127.0.0.1:29513", rank=0, world_size=1
        )
        parallel_state.initialize_model_parallel()
    else:
        from tests.support.dist import init_single_process  # installs the CPU shim

        init_single_process()
    main()
