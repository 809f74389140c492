"""The GRPO loop on real megatron-core: bf16 rollout engine, fp32 policy worker, replay.

Per step (NeMo-RL's order, pr2-algorithm §2.6)::

    engine.refresh(policy)                    # refit: trainer weights -> bf16 engine
    rollout = engine.generate(P x G prompts)  # μ log-probs (+ routes for r3 / pr2_r3)
    advantages = grpo_advantages(rewards)
    prev_logprobs = worker.get_logprobs(...)  # π_old; r2/pr2 record, r3 replays engine routes
    worker.train(batch, κ mini-steps)         # replayed updates

Runs in any megatron layout the config names (``policy.*_parallel_size``), one process per rank
(``torchrun``); ``torch.distributed`` must be initialised (``examples/train.py`` on CPU,
``pr2 train`` on CUDA). Rank 0 writes the logs; every rank returns the same history.
Rollout, rewards and advantages are computed on the host (tiny models); the models live where
megatron put them.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
from megatron.core.transformer import TransformerConfig

from megatron_pr2.convert.required import require_converted
from megatron_pr2.errors import ConfigError
from megatron_pr2.models.gpt import (
    LMBatch,
    TinyMoEShape,
    build_model_chunks,
    lm_forward_step,
    moe_transformer_config,
)
from megatron_pr2.models.training import load_checkpoint, train_step
from megatron_pr2.rl.advantages import grpo_advantages
from megatron_pr2.rl.backend import GenerationBackend, build_generation_backend
from megatron_pr2.rl.checkpoint import (
    capture_rng,
    latest_checkpoint,
    load_trainer_checkpoint,
    restore_rng,
    save_trainer_checkpoint,
)
from megatron_pr2.rl.config import MasterConfig
from megatron_pr2.rl.dataset_task import DatasetTask
from megatron_pr2.rl.drift import DriftProbe
from megatron_pr2.rl.engine import bf16_engine_config
from megatron_pr2.rl.logger import RunLogger, make_progress_bar
from megatron_pr2.rl.loss import ClippedPGLossFn
from megatron_pr2.rl.parallel import (
    ParallelSizes,
    combine_last_stage_metrics,
    ensure_model_parallel,
    gather_floats,
    is_logging_rank,
)
from megatron_pr2.rl.task import SyntheticTask
from megatron_pr2.rl.tokenizer import HFTokenizer
from megatron_pr2.rl.traces import StepTrace, trace_path, write_step_trace
from megatron_pr2.rl.validation import Validator
from megatron_pr2.rl.worker import PolicyWorker, RLBatch

__all__ = ["ZERO_DEVIATION", "supervised_warm_start", "train", "training_steps"]

ZERO_DEVIATION = "train/router_replay/zero_deviation_ratio"

Task = SyntheticTask | DatasetTask


def make_task(config: MasterConfig) -> Task:
    """Prompts from ``data.train_files`` with the model's tokenizer, else the synthetic task."""
    if not config.data.enabled:
        return SyntheticTask(config.task)
    assert config.generation.max_new_tokens is not None  # MasterConfig checks it
    tokenizer = HFTokenizer(
        config.policy.tokenizer_dir, chat_template=config.policy.tokenizer.chat_template
    )
    return DatasetTask(config.data, tokenizer, config.generation.max_new_tokens)


def _task_state(task: Task) -> dict[str, Any]:
    """What a checkpoint keeps of the task: the position in the dataset's epoch."""
    return {"data": task.state_dict()} if isinstance(task, DatasetTask) else {}


def _shape(config: MasterConfig, task: Task) -> tuple[TinyMoEShape, int]:
    """Model shape and ``max_new_tokens``; the context fits the longest prompt + generation."""
    max_new = config.generation.max_new_tokens or task.max_answer_len + 1
    needed = task.max_prompt_len + max(max_new, task.max_answer_len)
    if config.policy.uses_sequence_parallel:  # widths are padded to a multiple of TP
        tp = config.policy.tensor_model_parallel_size
        needed = -(-needed // tp) * tp
    max_seq = config.policy.max_total_sequence_length or needed
    if max_seq < needed:
        raise ConfigError(
            f"policy.max_total_sequence_length={max_seq} < longest prompt + generation ({needed})"
        )
    p = config.policy
    shape = TinyMoEShape(
        num_layers=p.num_layers,
        hidden_size=p.hidden_size,
        ffn_hidden_size=p.ffn_hidden_size,
        num_attention_heads=p.num_attention_heads,
        num_moe_experts=p.num_moe_experts,
        moe_router_topk=p.moe_router_topk,
        vocab_size=task.tokenizer.vocab_size,
        max_sequence_length=max_seq,
    )
    return shape, max_new


@dataclass
class PolicyModel:
    """What the trainer builds: the model config, a chunk builder (also used by the engine, with
    its bf16 config) and, for a converted checkpoint, where its weights and description are."""

    config: TransformerConfig
    # (config, replay, planned_dispatch=False) -> chunks; planned_dispatch: the worker's MoE
    # layers take all-to-all sizes from a replay plan (the engine builds without it).
    build: Callable[..., list[torch.nn.Module]]
    vocab_size: int
    max_sequence_length: int
    max_new_tokens: int
    checkpoint: Path | None = None
    description_file: Path | None = None


def _policy_model(config: MasterConfig, task: Task) -> PolicyModel:
    """The tiny GPT of ``policy.*`` shape keys, or the converted checkpoint at
    ``policy.model_path`` (``pr2 convert hf-to-mcore``; its shape keys are then ignored)."""
    p = config.policy
    shape, max_new = _shape(config, task)
    overrides = {"sequence_parallel": p.uses_sequence_parallel, **memory_overrides(config)}
    if p.model_path is None and p.random_init_from is None:
        model_config = moe_transformer_config(shape, **overrides)
        return PolicyModel(
            model_config,
            lambda cfg, replay, planned_dispatch=False: build_model_chunks(
                cfg, shape.vocab_size, shape.max_sequence_length, replay, planned_dispatch
            ),
            shape.vocab_size,
            shape.max_sequence_length,
            max_new,
        )
    from megatron_pr2.convert.model import (
        DESCRIPTION_NAME,
        build_model_chunks_from_description,
        load_converted_model_description,
        transformer_config_from_description,
    )

    if p.model_path is not None:
        description = load_converted_model_description(p.model_path)
    else:  # policy.random_init_from: the architecture of an HF config, random weights
        description = random_init_description(p.random_init_from, shape.max_sequence_length)
    if description.vocab_size < task.tokenizer.vocab_size:
        raise ConfigError(
            f"policy.model_path: the model's vocabulary ({description.vocab_size}) is smaller "
            f"than the task tokenizer's ({task.tokenizer.vocab_size})"
        )
    if description.max_sequence_length < shape.max_sequence_length:
        raise ConfigError(
            f"policy.model_path: max_sequence_length {description.max_sequence_length} < the "
            f"task's longest prompt + generation ({shape.max_sequence_length})"
        )
    model_config = transformer_config_from_description(description, **overrides)
    return PolicyModel(
        model_config,
        lambda cfg, replay, planned_dispatch=False: build_model_chunks_from_description(
            description, replay, config=cfg, planned_dispatch=planned_dispatch
        ),
        description.vocab_size,
        description.max_sequence_length,
        max_new,
        checkpoint=Path(p.model_path) if p.model_path is not None else None,
        description_file=Path(p.model_path) / DESCRIPTION_NAME if p.model_path else None,
    )


def random_init_description(hf_folder: str, max_sequence_length: int) -> Any:
    """The model description ``pr2 convert`` would write for ``hf_folder``'s config.json
    (the weights are not read): the same architecture, built with megatron's random init."""
    from megatron_pr2.convert.hf_config import read_config_json
    from megatron_pr2.convert.hf_to_mcore import describe

    _, _, description = describe(
        read_config_json(hf_folder), dtype="float32", max_sequence_length=max_sequence_length
    )
    return description


def memory_overrides(config: MasterConfig) -> dict[str, Any]:
    """``TransformerConfig`` settings of ``policy.precision`` and
    ``policy.activation_checkpointing`` (full recompute of every layer: only layer inputs are
    kept; the routers replay the original forward's routes in the recompute)."""
    p = config.policy
    out: dict[str, Any] = {}
    if p.precision is not None:
        dtype = torch.bfloat16 if p.precision == "bfloat16" else torch.float32
        out.update(params_dtype=dtype, pipeline_dtype=dtype, bf16=dtype == torch.bfloat16)
    if p.activation_checkpointing:
        out.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    return out


def _set_lr(worker: PolicyWorker, lr: float, base: float) -> None:
    """Scale every optimizer group (predictor's lr_mult kept) from ``base`` to ``lr``."""
    for group in worker.setup.optimizer.param_groups:
        group["lr"] = group["lr"] * lr / base


def _fresh_optimizer_state(worker: PolicyWorker) -> None:
    """Forget the warm start's Adam moments: GRPO starts as it would from a pretrained model.

    Why: kept, the warm start's first moment keeps pushing in the supervised direction for the
    first ~1/(1 - beta1) GRPO updates (measured: consecutive updates with cosine 1.0 at zero
    reward), and its second moment, sized by the supervised gradients, shrinks every GRPO update
    for ~1/(1 - beta2) updates. Cleared state is rebuilt by the optimizer's next step.
    """
    optimizer = worker.setup.optimizer
    for part in getattr(optimizer, "chained_optimizers", [optimizer]):
        part.optimizer.state.clear()


def supervised_warm_start(
    worker: PolicyWorker,
    task: Task,
    config: MasterConfig,
    rng: random.Random,
    on_step: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Plain LM loss on prompt + answer, masked to the answer, through megatron's schedule.

    Why: GRPO on a random tiny model sees all-zero reward groups (no signal); a short warm start
    makes the policy right sometimes. Routers route live (no replay session is active) and the
    PR2 predictor group is frozen. Micro-batches are shared round robin over data-parallel
    ranks (each micro-batch's loss is a mean, and DDP averages). Returns the loss per step;
    ``on_step(step, loss)`` is called after each one (the progress report).
    """
    g, mbs = config.grpo, config.policy.micro_batch_size
    losses = []
    _set_lr(worker, g.sft_lr, config.policy.lr)
    try:
        for _ in range(g.sft_warmup_steps):
            batch = task.collate(task.supervised_examples(g.sft_batch_size, rng))
            ids, mask = batch["input_ids"], batch["loss_mask"]
            labels = torch.full_like(ids, task.tokenizer.pad_id)
            labels[:, :-1] = ids[:, 1:]
            loss_mask = torch.zeros_like(mask)
            loss_mask[:, :-1] = mask[:, 1:]  # the loss at t is about token t + 1
            micro = [  # this data-parallel rank's micro-batches (round robin)
                LMBatch(ids[s : s + mbs], labels[s : s + mbs], loss_mask[s : s + mbs])
                for s in range(worker.dp_rank * mbs, ids.shape[0], mbs * worker.dp_size)
            ]
            outputs, _ = train_step(worker.setup, micro, forward_step_func=lm_forward_step)
            local = (
                {"lm_loss": float(torch.stack([o["lm_loss"] for o in outputs]).mean())}
                if outputs
                else None
            )
            losses.append(combine_last_stage_metrics(local, {"lm_loss": "mean"})["lm_loss"])
            if on_step is not None:
                on_step(len(losses), losses[-1])
    finally:
        _set_lr(worker, config.policy.lr, g.sft_lr)
    return losses


def _step_metrics(steps: list[dict[str, float]]) -> dict[str, float]:
    """Every worker metric per mini-step as ``name/mini_step_{i}``, plus the plain name as the
    mean over mini-steps (what NeMo-RL logs for a step)."""
    out: dict[str, float] = {}
    names = sorted({k for s in steps for k in s if k != "train/mini_step"})
    for name in names:
        values = [s[name] for s in steps if name in s]
        for i, s in enumerate(steps):
            if name in s:
                out[f"{name}/mini_step_{i}"] = s[name]
        out[name] = sum(values) / len(values)
    return out


def train(config: MasterConfig) -> list[dict[str, Any]]:
    """Run ``grpo.max_num_steps`` GRPO steps; returns the metrics of each step (also written to
    ``{logger.log_dir}/metrics.jsonl``, one JSON object per line)."""
    return list(training_steps(config))


def training_steps(config: MasterConfig) -> Iterator[dict[str, Any]]:
    """:func:`train` one step at a time: set up on the first ``next()``, then yield each step's
    metrics after it is logged (and checkpointed). Lets a caller interleave the steps of two
    runs in one process, e.g. a benchmark pairing modes step by step."""
    if not torch.distributed.is_initialized():
        raise RuntimeError(
            "torch.distributed is not initialised: use examples/train.py or `pr2 train`"
        )
    g, p = config.grpo, config.policy
    if p.model_path is not None:  # before the tokenizer is read from it: name the fix
        require_converted(
            p.model_path,
            tp=p.tensor_model_parallel_size,
            pp=p.pipeline_model_parallel_size,
            ep=p.expert_model_parallel_size,
            etp=p.expert_tensor_parallel_size,
        )
    ensure_model_parallel(
        ParallelSizes(
            tensor=p.tensor_model_parallel_size,
            pipeline=p.pipeline_model_parallel_size,
            expert=p.expert_model_parallel_size,
            expert_tensor=p.expert_tensor_parallel_size,
            virtual_pipeline=p.virtual_pipeline_model_parallel_size,
        )
    )
    main_rank = is_logging_rank()
    replay = p.router_replay
    torch.manual_seed(g.seed)
    model_parallel_cuda_manual_seed(g.seed)
    rng = random.Random(g.seed)
    sampler = torch.Generator().manual_seed(g.seed)

    task = make_task(config)  # dataset files are read and checked here, before any model exists
    tok = task.tokenizer
    model = _policy_model(config, task)
    worker_replay = replay.worker_config()
    worker = PolicyWorker(
        model.build(model.config, worker_replay, planned_dispatch=replay.planned_dispatch),
        worker_replay,
        lr=p.lr,
        micro_batch_size=p.micro_batch_size,
        weight_decay=p.weight_decay,
        clip_grad=p.max_grad_norm,
        use_distributed_optimizer=p.use_distributed_optimizer,
        trace_routes=config.logger.route_traces and worker_replay.installs_router,
        planned_dispatch=replay.planned_dispatch,
    )
    engine = build_generation_backend(
        config.generation,
        bf16_engine_config(model.config),
        model.vocab_size,
        model.max_sequence_length,
        pad_id=tok.pad_id,
        eos_id=tok.eos_id,
        mode=replay.engine_mode,  # type: ignore[arg-type]
        predictor=replay.predictor,
        build_chunks=model.build,
        sample_vocab_size=tok.vocab_size,
    )
    max_new = model.max_new_tokens
    loss_fn = ClippedPGLossFn(config.loss_config())

    log_dir = Path(config.logger.log_dir)
    if main_rank:
        log_dir.mkdir(parents=True, exist_ok=True)
        (log_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")

    ckpt = config.checkpointing
    start_step, sft_losses, sft_time = 0, [], 0.0
    latest = latest_checkpoint(ckpt.checkpoint_dir) if ckpt.enabled else None
    if latest is not None:
        start_step, path = latest
        state = load_trainer_checkpoint(worker.setup, path)
        restore_rng(state["rng"], rng, sampler)
        if "data" in state and isinstance(task, DatasetTask):
            task.load_state_dict(state["data"])
        if main_rank:
            print(f"resumed from {path} (step {start_step})", flush=True)
    else:
        if model.checkpoint is not None:  # a converted checkpoint: its weights, zero predictor
            load_checkpoint(worker.setup, model.checkpoint, load_optimizer=False)
        t0 = time.perf_counter()
        with _WarmStartReport(config, enabled=main_rank) as report:
            sft_losses = supervised_warm_start(worker, task, config, rng, on_step=report.step)
        sft_time = time.perf_counter() - t0
        if sft_losses:
            _fresh_optimizer_state(worker)
        if sft_losses and main_rank:
            print(
                f"sft: {len(sft_losses)} steps, loss {sft_losses[0]:.3f} -> {sft_losses[-1]:.3f} "
                f"({sft_time:.1f}s)",
                flush=True,
            )

    headline = {
        "reward": "train/reward",
        f"zero_dev[{g.off_policy_steps - 1}]": f"{ZERO_DEVIATION}/mini_step_{g.off_policy_steps - 1}",
        "loss": "train/loss",
        "s/step": "timing/train/total_step_time",
    }
    logger = (
        RunLogger(
            log_dir,
            g.max_num_steps,
            tensorboard=config.logger.tensorboard_enabled,
            progress_bar=config.logger.progress_bar,
            resume_step=start_step,
            headline=headline,
        )
        if main_rank
        else None
    )
    probe = None
    if config.logger.drift_probe_tokens > 0:  # router drift probe (rl.drift), off by default
        probe = DriftProbe(worker, config.logger.drift_probe_tokens, p.use_distributed_optimizer)
        worker.after_update = probe.after_update
    validator = Validator(config, task) if g.val_period > 0 else None
    with logger if logger is not None else contextlib.nullcontext():
        for step in range(start_step, g.max_num_steps):
            before = _router_weights(worker) if worker.trace_routes else {}
            metrics = _grpo_step(
                config, task, worker, engine, loss_fn, rng, sampler, max_new, probe
            )
            metrics = {"step": step + 1, **metrics}
            if probe is not None:
                metrics.update(probe.finish_step(step + 1, log_dir if main_rank else None))
            if worker.trace_routes:
                _write_trace(config, worker, step + 1, before, main_rank)
            if step == 0 and sft_losses:
                metrics["sft/loss_first"] = sft_losses[0]
                metrics["sft/loss_last"] = sft_losses[-1]
                metrics["timing/sft"] = sft_time
            done = step + 1
            if validator is not None and (done % g.val_period == 0 or done == g.max_num_steps):
                metrics.update(_validate(validator, config, worker, engine, max_new, done))
            if logger is not None:
                logger.log(metrics)
            if ckpt.enabled and (done % ckpt.save_period == 0 or done == g.max_num_steps):
                path = save_trainer_checkpoint(
                    worker.setup,
                    ckpt.checkpoint_dir,
                    done,
                    {"rng": capture_rng(rng, sampler), **_task_state(task)},
                    keep_last=ckpt.keep_top_k,
                )
                if main_rank and model.description_file is not None:
                    # `pr2 convert mcore-to-hf` reads the description next to the weights
                    shutil.copy(model.description_file, path / "model")
                if logger is not None:
                    logger.write(f"saved {path}")
            yield metrics
    if main_rank:
        print(results_message(log_dir, config.logger.tensorboard_enabled), flush=True)


def _validate(
    validator: Validator,
    config: MasterConfig,
    worker: PolicyWorker,
    engine: GenerationBackend,
    max_new: int,
    step: int,
) -> dict[str, float]:
    """Accuracy avg@k of the current weights on the held-out prompts (see rl.validation)."""
    start = time.perf_counter()
    replay = config.policy.router_replay
    engine.refresh(worker.modules, include_predictor=replay.engine_applies_predictor)
    prompts = validator.expanded()
    rollout = engine.generate(
        prompts,
        max_new,
        temperature=validator.temperature,
        top_p=config.generation.top_p,
        generator=validator.sampler(step),
        # Any number of validation samples: micro-batches of the largest size that divides it.
        micro_batch_size=math.gcd(len(prompts), config.policy.micro_batch_size),
        return_routes=False,
    )
    metrics = validator.score(rollout.responses())
    metrics["timing/validation/total_time"] = time.perf_counter() - start
    return metrics


def _pr2_command() -> str:
    """How to call ``pr2`` from here: the script next to this interpreter (a venv that is not
    activated), relative to the working directory when inside it; else plain ``pr2``."""
    script = Path(sys.executable).parent / "pr2"
    if not script.is_file():
        return "pr2"
    try:
        return str(script.relative_to(Path.cwd()))
    except ValueError:
        return str(script)


def results_message(log_dir: Path, tensorboard: bool) -> str:
    """What the run leaves behind and the command that summarises it (printed at the end,
    after the progress bar, so a newcomer knows where to look)."""
    lines = [f"results: {log_dir / 'metrics.jsonl'} (one JSON line per step)"]
    if tensorboard:
        lines.append(f"tensorboard: {log_dir / 'tensorboard'}")
    lines.append(
        f"summary table and figure: {_pr2_command()} compare {log_dir} --out {log_dir}/comparison"
    )
    return "\n".join(lines)


class _WarmStartReport:
    """The supervised warm start's progress: one line saying what it is, then a tqdm bar with
    the loss (``logger.progress_bar``), or a plain line every tenth of the steps. Without it a
    newcomer watches a silent terminal for the whole warm start."""

    def __init__(self, config: MasterConfig, enabled: bool) -> None:
        self.total = config.grpo.sft_warmup_steps if enabled else 0
        self.bar: Any = None
        self.every = max(1, self.total // 10)
        if self.total > 0:
            print(
                f"sft warm start: {self.total} supervised steps on the task's answers, so the "
                f"policy is right sometimes and GRPO's groups carry reward signal; then "
                f"{config.grpo.max_num_steps} GRPO steps",
                flush=True,
            )
            if config.logger.progress_bar:
                self.bar = make_progress_bar(self.total, "sft")

    def step(self, step: int, loss: float) -> None:
        if self.total == 0:
            return
        if self.bar is not None:
            self.bar.set_postfix({"loss": f"{loss:.3f}"}, refresh=False)
            self.bar.update(1)
        elif step % self.every == 0 or step == self.total:
            print(f"sft step {step}/{self.total}  loss {loss:.3f}", flush=True)

    def __enter__(self) -> _WarmStartReport:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()


def _router_weights(worker: PolicyWorker) -> dict[int, torch.Tensor]:
    assert worker.session is not None
    return {k: w.detach().clone() for k, w in worker.session.router_weights().items()}


def _write_trace(
    config: MasterConfig,
    worker: PolicyWorker,
    step: int,
    before: dict[int, torch.Tensor],
    main_rank: bool,
) -> None:
    """Route traces of this step + each router's relative weight change (rl.traces)."""
    drift = {
        layer: float((w.detach() - before[layer]).norm() / before[layer].norm().clamp(min=1e-30))
        for layer, w in _router_weights(worker).items()
    }
    drift = gather_floats(drift)
    if not main_rank:
        return
    replay = config.policy.router_replay
    trace = StepTrace(
        step=step,
        mode=replay.mode,
        topk=config.policy.moe_router_topk,
        num_experts=config.policy.num_moe_experts,
        num_mini_steps=config.grpo.off_policy_steps,
        token_stride=replay.metrics_token_stride,
        old=worker.old_pass_trace,
        mini_steps=worker.mini_step_traces,
        router_drift=drift,
    )
    write_step_trace(trace_path(config.logger.log_dir, step), trace)


def _grpo_step(
    config: MasterConfig,
    task: Task,
    worker: PolicyWorker,
    engine: GenerationBackend,
    loss_fn: ClippedPGLossFn,
    rng: random.Random,
    sampler: torch.Generator,
    max_new: int,
    probe: DriftProbe | None = None,
) -> dict[str, Any]:
    """One GRPO step: refit, rollout, rewards/advantages, old log-probs, κ mini-steps."""
    g, p, gen = config.grpo, config.policy, config.generation
    replay = p.router_replay
    tok = task.tokenizer
    timing: dict[str, float] = {}
    start = time.perf_counter()
    # pr2: the predictor is trainer-side only; pr2_r3: the engine applies it.
    engine.refresh(worker.modules, include_predictor=replay.engine_applies_predictor)
    timing["prepare_for_generation"] = time.perf_counter() - start

    t = time.perf_counter()
    prompts = task.make_prompts(g.num_prompts_per_step, rng)
    rollout = engine.generate(
        [q.tokens for q in prompts for _ in range(g.num_generations_per_prompt)],
        max_new,
        temperature=gen.temperature,
        top_p=gen.top_p,
        generator=sampler,
        micro_batch_size=p.micro_batch_size,
        return_routes=replay.uses_engine_routes,
    )
    timing["generation"] = time.perf_counter() - t

    t = time.perf_counter()
    responses = rollout.responses()
    rewards = torch.tensor(
        [
            task.reward(prompts[i // g.num_generations_per_prompt], r)
            for i, r in enumerate(responses)
        ],
        dtype=torch.float32,
    )
    advantages = grpo_advantages(
        rewards,
        g.num_generations_per_prompt,
        normalize_std=g.normalize_rewards,
        leave_one_out=g.use_leave_one_out_baseline,
    )
    batch = RLBatch.from_rollout(rollout, advantages, pad_id=tok.pad_id)
    timing["reward_calculation"] = time.perf_counter() - t

    t = time.perf_counter()
    routes = rollout.routes if replay.uses_engine_routes else None
    batch.prev_logprobs = worker.get_logprobs(batch, routes)
    timing["policy_and_reference_logprobs"] = time.perf_counter() - t

    t = time.perf_counter()
    if probe is not None:  # the probe's starting point, before the step's first update
        probe.start_step(batch.tokens, batch.lengths)
    steps = worker.train(batch, loss_fn, num_mini_steps=g.off_policy_steps)
    timing["policy_training"] = time.perf_counter() - t
    timing["total_step_time"] = time.perf_counter() - start

    metrics: dict[str, Any] = {}
    metrics["train/reward"] = float(rewards.mean())
    metrics["train/accuracy"] = float((rewards == 1.0).float().mean())
    metrics["train/response_length"] = float(rollout.response_mask.sum(1).mean())
    metrics["train/zero_advantage_fraction"] = float((advantages == 0).float().mean())
    metrics["train/num_tokens"] = float(rollout.lengths.sum())
    metrics.update({f"train/{k}": v for k, v in worker.logprob_metrics.items()})
    metrics.update(_step_metrics(steps))
    metrics.update({f"timing/train/{k}": v for k, v in timing.items()})
    return metrics
