"""GRPO run configuration in NeMo-RL's key layout, loaded from YAML plus dotted overrides.

Keys follow NeMo-RL (``grpo.*``, ``policy.*``, ``loss_fn.*``, ``logger.*``) so a recipe reads the
same in both projects; the model shape sits flat under ``policy`` because there is no Hugging Face
checkpoint to read it from. Unknown keys are errors: a typo must never fall back to a default.

Overrides are ``a.b.c=value`` with ``value`` parsed by ``yaml.safe_load`` (``x=3``, ``x=true``,
``x=null``, ``x=[1,2]``), like Hydra's basic override grammar.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from megatron_pr2.config import PredictorConfig, RouterReplayConfig
from megatron_pr2.errors import ConfigError
from megatron_pr2.rl.data import DataConfig
from megatron_pr2.rl.loss import ClippedPGLossConfig
from megatron_pr2.rl.task import TaskConfig

__all__ = [
    "TRAINER_MODES",
    "CheckpointingConfig",
    "DataConfig",
    "GRPOConfig",
    "GenerationConfig",
    "LoggerConfig",
    "MasterConfig",
    "PolicyConfig",
    "RouterReplaySection",
    "TokenizerSection",
    "apply_overrides",
    "config_from_dict",
    "load_config",
]

TRAINER_MODES = ("none", "r2", "r3", "pr2", "pr2_r3")


@dataclass
class GRPOConfig:
    """``grpo.*``.

    Attributes:
        off_policy_steps: κ, optimizer mini-steps per rollout batch (the batch is split into κ
            equal contiguous mini-batches; mini-step i > 0 is off-policy by i updates).
        sft_warmup_steps / sft_batch_size / sft_lr: supervised warm start on the task's answers
            before RL, so a tiny random model is right sometimes and GRPO groups carry signal.
            (Not NeMo-RL keys: NeMo-RL starts from a pretrained checkpoint instead.)
        normalize_rewards / use_leave_one_out_baseline: NeMo-RL's advantage switches.
    """

    num_prompts_per_step: int = 4
    num_generations_per_prompt: int = 4
    max_num_steps: int = 4
    seed: int = 42
    off_policy_steps: int = 2
    sft_warmup_steps: int = 40
    sft_batch_size: int = 16
    sft_lr: float = 3e-3
    normalize_rewards: bool = True
    use_leave_one_out_baseline: bool = False
    # Validation (NeMo-RL keys): accuracy avg@k every val_period steps (0 = never), on
    # data.val_files or, for the synthetic task, max_val_samples fixed prompts (default 32).
    val_period: int = 0
    max_val_samples: int | None = None
    val_num_generations_per_prompt: int = 1  # k of avg@k
    val_temperature: float | None = None  # default: generation.temperature


@dataclass
class RouterReplaySection:
    """``policy.router_replay.*``: :class:`megatron_pr2.config.RouterReplayConfig`'s keys.

    ``pr2_r3``: the rollout engine samples under ``logits + predicted offset`` and the trainer
    replays the engine's routes (R3) while training the predictor it hands to the engine.
    ``none`` with ``collect_metrics``: routing stays live; the update passes report their drift
    from the old-log-prob pass's routes under the same metric names.
    """

    mode: str = "r2"
    collect_metrics: bool = True
    metrics_token_stride: int = 1  # exact metrics: tiny runs measure every token
    allow_token_dropping: bool = False
    # Replayed passes take megatron's all-to-all sizes from a plan built once per rollout batch
    # (replay.dispatch_plan): no per-layer count all-gather or host sync. Off by default: it
    # needs moe_token_dispatcher_type alltoall and is proven exact on the tested layouts only.
    planned_dispatch: bool = False
    predictor: PredictorConfig = field(default_factory=PredictorConfig)

    def __post_init__(self) -> None:
        self.mode = str(self.mode).strip().lower()
        if self.mode in ("disabled", "off", "false"):
            self.mode = "none"
        if self.mode not in TRAINER_MODES:
            raise ConfigError(
                f"policy.router_replay.mode: unknown mode {self.mode!r}; "
                f"choose one of {', '.join(TRAINER_MODES)}"
            )
        if self.planned_dispatch and self.mode == "none":
            raise ConfigError(
                "policy.router_replay.planned_dispatch needs replayed routes; mode none routes "
                "live (choose r2, r3, pr2 or pr2_r3, or set planned_dispatch=false)"
            )

    @property
    def engine_mode(self) -> str:
        return "pr2_r3" if self.mode == "pr2_r3" else "r3"

    @property
    def uses_engine_routes(self) -> bool:
        return self.mode in ("r3", "pr2_r3")

    @property
    def engine_applies_predictor(self) -> bool:
        return self.mode == "pr2_r3"

    def worker_config(self) -> RouterReplayConfig:
        return RouterReplayConfig(
            mode=self.mode,
            collect_metrics=self.collect_metrics,
            metrics_token_stride=self.metrics_token_stride,
            allow_token_dropping=self.allow_token_dropping,
            predictor=self.predictor,
        )


@dataclass
class TokenizerSection:
    """``policy.tokenizer.*`` (NeMo-RL): ``name`` is a local Hugging Face tokenizer folder;
    by default the model's (``policy.model_path``, where ``pr2 convert`` copies it). Only runs
    on dataset files (``data.train_files``) use it; the synthetic task has its own."""

    name: str | None = None
    chat_template: str | None = None  # a Jinja template replacing the tokenizer's own


@dataclass
class PolicyConfig:
    """``policy.*``: optimizer, micro-batching, replay and the MoE model shape."""

    lr: float = 1e-3
    micro_batch_size: int = 2
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_total_sequence_length: int | None = None  # default: longest prompt + max_new_tokens
    # A converted checkpoint (`pr2 convert hf-to-mcore` output) to start from; the shape keys
    # below are then ignored (the model comes from its pr2_model.json).
    model_path: str | None = None
    # Smoke runs only (a recipe's model.random_init): build the architecture of this Hugging Face
    # folder's config.json with random weights instead of loading converted ones.
    random_init_from: str | None = None
    tokenizer: TokenizerSection = field(default_factory=TokenizerSection)
    # Memory (NeMo-RL: policy.precision, megatron_cfg.activation_checkpointing,
    # megatron_cfg.optimizer.use_distributed_optimizer). precision None: the checkpoint's dtype
    # (fp32 for the built-in tiny GPT); bfloat16 keeps fp32 main params in megatron's optimizer.
    precision: str | None = None
    activation_checkpointing: bool = False
    use_distributed_optimizer: bool = False
    num_layers: int = 2
    hidden_size: int = 32
    ffn_hidden_size: int = 64
    num_attention_heads: int = 4
    num_moe_experts: int = 8
    moe_router_topk: int = 2
    router_replay: RouterReplaySection = field(default_factory=RouterReplaySection)
    # Parallel layout (NeMo-RL's megatron_cfg names, flat here); data parallel = the rest.
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: int | None = None
    expert_model_parallel_size: int = 1
    expert_tensor_parallel_size: int | None = None
    sequence_parallel: bool | None = None  # default: on when tensor_model_parallel_size > 1
    context_parallel_size: int = 1

    def __post_init__(self) -> None:
        if self.context_parallel_size != 1:
            raise ConfigError(
                "policy.context_parallel_size > 1 is not supported by the RL loop yet (the test "
                "rollout engine has no CP); replay itself handles CP (routes.layout)"
            )
        if self.precision not in (None, "float32", "bfloat16"):
            raise ValueError(
                f"policy.precision must be float32 or bfloat16, got {self.precision!r}"
            )
        if self.model_path is not None and self.random_init_from is not None:
            raise ValueError(
                "policy.model_path and policy.random_init_from exclude each other (converted "
                "weights, or the same architecture with random weights)"
            )
        if self.sequence_parallel and self.tensor_model_parallel_size == 1:
            raise ConfigError("policy.sequence_parallel needs tensor_model_parallel_size > 1")

    @property
    def tokenizer_dir(self) -> str | None:
        return self.tokenizer.name or self.model_path

    @property
    def uses_sequence_parallel(self) -> bool:
        if self.sequence_parallel is None:
            return self.tensor_model_parallel_size > 1
        return self.sequence_parallel


GENERATION_BACKENDS = ("megatron", "vllm")


@dataclass
class GenerationConfig:
    """``generation.*`` (NeMo-RL: ``policy.generation``; top level here, as in the brief)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None  # None (or vLLM's -1): no top-k cut
    max_new_tokens: int | None = None  # default: the task's longest answer + 1
    # megatron: the KV-cached engine on the trainer's own megatron layout (rl.kv_engine);
    # vllm: a vLLM engine (rl.vllm_backend), for GPU clusters.
    backend: str = "megatron"

    def __post_init__(self) -> None:
        if self.top_k == -1:
            self.top_k = None
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"generation.top_k must be >= 1 or -1 (off), got {self.top_k}")
        if self.backend not in GENERATION_BACKENDS:
            raise ValueError(
                f"generation.backend: unknown backend {self.backend!r}; "
                f"choose one of {', '.join(GENERATION_BACKENDS)}"
            )


@dataclass
class LoggerConfig:
    """``logger.*``: ``metrics.jsonl`` is always written under ``log_dir``; TensorBoard event
    files under ``log_dir/tensorboard`` when enabled (needs the ``tensorboard`` package)."""

    log_dir: str = "logs/grpo"
    tensorboard_enabled: bool = True
    progress_bar: bool = True
    route_traces: bool = False  # per-step route traces for `pr2 analyze` (rl.traces)
    # > 0: router logits of that many fixed probe tokens after every optimizer update, and the
    # drift/* metrics (rl.drift; `pr2 analyze` reports whether the drift is systematic)
    drift_probe_tokens: int = 0

    def __post_init__(self) -> None:
        if self.drift_probe_tokens < 0:
            raise ConfigError(
                f"logger.drift_probe_tokens must be >= 0 (0: off), got {self.drift_probe_tokens}"
            )


@dataclass
class CheckpointingConfig:
    """``checkpointing.*`` (NeMo-RL's keys): a run with ``enabled`` resumes from the newest
    complete checkpoint in ``checkpoint_dir`` and saves every ``save_period`` steps (and at the
    end), keeping the newest ``keep_top_k`` (None: all)."""

    enabled: bool = False
    checkpoint_dir: str = "results/grpo"
    save_period: int = 10
    keep_top_k: int | None = None

    def __post_init__(self) -> None:
        if self.save_period < 1:
            raise ConfigError(f"checkpointing.save_period must be >= 1, got {self.save_period}")
        if self.keep_top_k is not None and self.keep_top_k < 1:
            raise ConfigError(f"checkpointing.keep_top_k must be >= 1, got {self.keep_top_k}")


@dataclass
class MasterConfig:
    """The whole run; ``loss_fn`` stays a mapping and is checked by ``ClippedPGLossConfig``."""

    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    loss_fn: dict[str, Any] = field(default_factory=dict)
    task: TaskConfig = field(default_factory=TaskConfig)
    data: DataConfig = field(default_factory=DataConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    checkpointing: CheckpointingConfig = field(default_factory=CheckpointingConfig)

    def __post_init__(self) -> None:
        self.loss_config()  # unknown / unsupported loss_fn keys fail at load time
        if self.data.enabled:
            if self.generation.max_new_tokens is None:
                raise ValueError(
                    "generation.max_new_tokens is required with data.train_files (responses "
                    "are open-ended; the synthetic task derives it from its answers)"
                )
            if self.policy.tokenizer_dir is None:
                raise ValueError(
                    "data.train_files needs the model's tokenizer: set policy.tokenizer.name "
                    "or policy.model_path (a `pr2 convert hf-to-mcore` output)"
                )
        g = self.grpo
        batch = g.num_prompts_per_step * g.num_generations_per_prompt
        if batch < 1 or g.num_generations_per_prompt < 1:
            raise ConfigError(
                "grpo.num_prompts_per_step and num_generations_per_prompt must be >= 1"
            )
        if g.off_policy_steps < 1 or batch % g.off_policy_steps:
            raise ConfigError(
                f"grpo.off_policy_steps={g.off_policy_steps} must divide the rollout batch "
                f"({batch} samples)"
            )
        mbs = self.policy.micro_batch_size
        if mbs < 1 or (batch // g.off_policy_steps) % mbs:
            raise ConfigError(
                f"policy.micro_batch_size={mbs} must divide the mini-batch "
                f"({batch // g.off_policy_steps} samples)"
            )
        if g.sft_warmup_steps > 0 and g.sft_batch_size % mbs:
            raise ConfigError(f"grpo.sft_batch_size must be a multiple of micro_batch_size={mbs}")
        if g.val_period < 0 or g.val_num_generations_per_prompt < 1:
            raise ValueError(
                "grpo.val_period must be >= 0 and grpo.val_num_generations_per_prompt >= 1"
            )
        # Data parallelism (the world size minus model parallelism) is only known at run time:
        # the worker checks that micro-batches share evenly over DP ranks.

    def loss_config(self) -> ClippedPGLossConfig:
        return ClippedPGLossConfig.from_dict(self.loss_fn)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (enums as values), for logging the resolved config."""

        def plain(value: Any) -> Any:
            if dataclasses.is_dataclass(value):
                return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
            if isinstance(value, dict):
                return {k: plain(v) for k, v in value.items()}
            return getattr(value, "value", value)

        return plain(self)


# ---------------------------------------------------------------------- loading
def _coerce(value: Any, hint: Any, key: str) -> Any:
    """YAML 1.1 reads ``1e-3`` as a string; accept numbers spelled that way for float fields."""
    args = typing.get_args(hint)
    if value is None:
        return value
    if hint is float or (float in args and type(None) in args):
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if (hint is int or (int in args and type(None) in args)) and isinstance(value, float):
        if value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    return value


def _build(cls: type, values: Mapping[str, Any], prefix: str) -> Any:
    if not isinstance(values, Mapping):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        if key not in names:
            raise ConfigError(f"unknown config key '{prefix}{key}'")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value or {}, f"{prefix}{key}.")
        elif key == "loss_fn" and cls is MasterConfig:
            kwargs[key] = dict(value or {})
        else:
            kwargs[key] = _coerce(value, hint, f"{prefix}{key}")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as err:  # a section's own check (task, loss, predictor): name the section
        where = prefix.rstrip(".")
        message = str(err) if not where or str(err).startswith(where) else f"{where}: {err}"
        raise ConfigError(message) from err


def config_from_dict(values: Mapping[str, Any]) -> MasterConfig:
    """Typed config from a nested mapping; unknown keys and bad values raise
    :class:`~megatron_pr2.errors.ConfigError` (a ``ValueError``) naming the key."""
    return _build(MasterConfig, values or {}, "")


def apply_overrides(values: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides in place (values via ``yaml.safe_load``)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r} is not of the form a.b.c=value")
        parts = key.split(".")
        node = values
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a mapping")
            node = child
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None
    return values


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> MasterConfig:
    """YAML file (or defaults when ``path`` is None) plus overrides -> :class:`MasterConfig`."""
    values: dict[str, Any] = {}
    if path is not None:
        try:
            text = Path(path).read_text()
        except OSError as err:  # missing, a directory, unreadable
            raise ConfigError(f"cannot read config file {path}: {err.strerror or err}") from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML ({err})") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
        values = loaded or {}
    return config_from_dict(apply_overrides(values, overrides))
