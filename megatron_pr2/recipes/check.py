"""``pr2 check-recipe``: does a recipe fit its model and its cluster, and how much memory per GPU.

Checks (each failure is one message naming the keys involved):

* the trainer accepts the config (unknown keys, batch divisibility: :mod:`megatron_pr2.rl.config`);
* ``policy``'s model shape equals the HF config's (layers, hidden, heads, experts, top-k, expert
  FFN);
* parallel sizes vs world size ``W = cluster.nodes x procs per node``: ``TP*PP*CP`` divides ``W``;
  ``ETP*EP*PP`` divides ``W``; ``TP`` divides the attention heads and the query groups (GQA);
  ``EP`` divides the routed experts; ``PP`` (``PP*VPP`` when interleaved) divides the layers;
  ``ETP`` divides the expert FFN; ``TP`` divides the dense FFN; ``2*CP`` divides the sequence
  length; MoE with ``TP > 1`` and ``EP > 1`` needs ``sequence_parallel`` (megatron says so);
* batch vs data parallel: every DP rank gets whole micro-batches of each mini-batch;
* sequence length fits the model's positions, and the static memory fits ``gpu_memory_gb``
  (an error); static memory plus activations and logits over ``gpu_memory_gb`` is a warning
  (activations with full recompute when ``policy.activation_checkpointing`` is set).

Static memory estimate per GPU (bytes; the worst pipeline stage; the KV cache of the rollout
engine and allocator slack are *not* included). With ``DP = W/(TP*PP*CP)``,
``EDP = W/(ETP*EP*PP)``, ``L_s = ceil(moe_layers/PP)``:

* ``P_dense = (non_expert_params - embeddings) / (PP*TP) + embeddings_on_stage / TP`` (first stage
  holds the input embedding, last the output layer; with PP = 1 both);
* ``P_expert = L_s * (N/EP) * 3*H*I_moe / ETP``;
* weights ``2 B * (P_dense + P_expert)`` with ``policy.precision: bfloat16`` (unset: bf16 for a
  recipe's converted model, fp32 for the tiny GPT), else ``4 B``; grads ``4 B * (P_dense +
  P_expert)`` (megatron's fp32 grad buffers, fp32 reduce as in the paper's runs);
* optimizer (Adam): two fp32 moments plus, for bf16 weights, fp32 main params: ``s = 12 B``
  (bf16) or ``8 B`` (fp32) per parameter; ``s * (P_dense/DP + P_expert/EDP)`` with
  ``policy.use_distributed_optimizer``, else ``s * (P_dense + P_expert)``;
* predictor (PR2 only; fp32, replicated over TP/EP/CP): ``P_pred = L_s*H*N``, weights + grads
  ``8 B * P_pred``, Adam moments ``8 B * P_pred / DP``;
* tokens routed per rank and step, padded: ``T = B * S / (DP * CP * (TP if SP else 1))`` with
  ``B = prompts x generations``, ``S = policy.max_total_sequence_length``;
* route payloads (R2/R3/PR2; device): the replayed top-k of every routed token of the rollout
  batch stays on the device through the kappa mini-steps, ``T * L_s * k * 8 B`` (int64);
  R3 also holds the engine's payload on the host, ``T * L_s * k * b`` with ``b`` the narrowest
  signed integer that holds ``N - 1``;
* feature cache (PR2 only; host): ``min(keep * T, cache_tokens_per_step) * L_s * (H + N) * c``
  with ``c`` the bytes of ``cache_dtype``.

Activations and logits of the training forward/backward: :func:`estimate_activations`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from megatron_pr2.launch.spec import LaunchSpec, cluster_from_section
from megatron_pr2.recipes.loader import (
    Recipe,
    RecipeError,
    trainer_values,
    unsupported_parallel_keys,
)
from megatron_pr2.recipes.models import (
    ModelShape,
    load_hf_config,
    shape_from_hf,
    shape_from_policy,
)

__all__ = [
    "Activations",
    "CheckResult",
    "Layout",
    "MemoryEstimate",
    "check_recipe",
    "estimate_activations",
    "format_result",
]

GIB = 1024**3
_SHAPE_KEYS = (  # policy key -> ModelShape attribute
    ("num_layers", "num_layers"),
    ("hidden_size", "hidden_size"),
    ("num_attention_heads", "num_attention_heads"),
    ("num_moe_experts", "num_experts"),
    ("moe_router_topk", "topk"),
    ("ffn_hidden_size", "moe_ffn_hidden_size"),
)
_CACHE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


@dataclass
class Layout:
    """Parallel sizes of a run (NeMo-RL names under ``policy.``)."""

    world: int
    tp: int = 1
    pp: int = 1
    ep: int = 1
    etp: int = 1
    cp: int = 1
    vpp: int | None = None
    sequence_parallel: bool = False

    @property
    def dp(self) -> int:
        return self.world // (self.tp * self.pp * self.cp)

    @property
    def edp(self) -> int:
        return self.world // (self.etp * self.ep * self.pp)

    def describe(self) -> str:
        vpp = f" VPP{self.vpp}" if self.vpp else ""
        sp = " SP" if self.sequence_parallel else ""
        return (
            f"world {self.world} = TP{self.tp} x PP{self.pp} x CP{self.cp} x DP{self.dp}; "
            f"experts EP{self.ep} x ETP{self.etp} x EDP{self.edp}{vpp}{sp}"
        )


@dataclass
class MemoryEstimate:
    """Bytes per GPU (``device``) and per training process on the host (``host``)."""

    device: dict[str, float] = field(default_factory=dict)
    host: dict[str, float] = field(default_factory=dict)
    tokens_per_rank: int = 0
    activations: Activations | None = None

    @property
    def device_total(self) -> float:
        """Static device memory (weights, grads, optimizer, predictor, route payloads)."""
        return sum(self.device.values())

    def peak(self, recompute: bool = False) -> float:
        """Static memory plus the training step's activations and logits."""
        if self.activations is None:
            return self.device_total
        act = self.activations
        layers = act.with_recompute if recompute else act.without_recompute
        return self.device_total + layers + act.logits


@dataclass
class Activations:
    """Bytes per GPU of one training step's live tensors (:func:`estimate_activations`)."""

    micro_batch_tokens: int  # T: tokens of one micro-batch on a rank (after CP)
    in_flight: int  # micro-batches whose activations are alive at once (1F1B: min(PP, M))
    layers: int  # L_s: layers on the stage
    per_layer: float  # bytes of one layer for one micro-batch, no recompute
    without_recompute: float
    with_recompute: float
    logits: float


@dataclass
class CheckResult:
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    layout: Layout | None = None
    shape: ModelShape | None = None
    shape_source: str = ""
    memory: MemoryEstimate | None = None
    cluster: LaunchSpec | None = None

    @property
    def ok(self) -> bool:
        return not self.errors


def _layout(recipe: Recipe, world: int) -> Layout:
    policy = recipe.section("policy")

    def size(key: str, default: int | None) -> int | None:
        value = policy.get(key, default)
        if value is None:
            return None
        if isinstance(value, bool) or int(value) < 1:
            raise RecipeError(f"policy.{key} must be a positive integer, got {value!r}")
        return int(value)

    tp = size("tensor_model_parallel_size", 1) or 1
    etp = size("expert_tensor_parallel_size", None)
    sp = policy.get("sequence_parallel")
    return Layout(
        world=world,
        tp=tp,
        pp=size("pipeline_model_parallel_size", 1) or 1,
        ep=size("expert_model_parallel_size", 1) or 1,
        etp=etp if etp is not None else tp,  # megatron's default: ETP = TP
        cp=size("context_parallel_size", 1) or 1,
        vpp=size("virtual_pipeline_model_parallel_size", None),
        # the trainer's default: sequence parallelism on whenever TP > 1
        sequence_parallel=bool(sp if sp is not None else tp > 1),
    )


def _check_parallel(shape: ModelShape, lay: Layout, errors: list[str], warn: list[str]) -> None:
    def need(ok: bool, message: str) -> None:
        if not ok:
            errors.append(message)

    w = lay.world
    need(
        w % (lay.tp * lay.pp * lay.cp) == 0,
        f"world size {w} is not divisible by TP*PP*CP = {lay.tp}*{lay.pp}*{lay.cp}",
    )
    need(
        w % (lay.etp * lay.ep * lay.pp) == 0,
        f"world size {w} is not divisible by ETP*EP*PP = {lay.etp}*{lay.ep}*{lay.pp} "
        "(policy.expert_tensor_parallel_size defaults to TP)",
    )
    need(
        shape.num_attention_heads % lay.tp == 0,
        f"policy.tensor_model_parallel_size={lay.tp} does not divide the "
        f"{shape.num_attention_heads} attention heads",
    )
    need(
        shape.num_query_groups % lay.tp == 0,
        f"policy.tensor_model_parallel_size={lay.tp} does not divide the "
        f"{shape.num_query_groups} key/value heads (query groups)",
    )
    need(
        shape.num_experts % lay.ep == 0,
        f"policy.expert_model_parallel_size={lay.ep} does not divide the "
        f"{shape.num_experts} routed experts",
    )
    stages = lay.pp * (lay.vpp or 1)
    need(
        shape.num_layers % stages == 0,
        f"pipeline stages PP*VPP = {stages} do not divide the {shape.num_layers} layers",
    )
    if lay.vpp and lay.pp == 1:
        errors.append("policy.virtual_pipeline_model_parallel_size needs pipeline parallelism > 1")
    need(
        shape.moe_ffn_hidden_size % lay.etp == 0,
        f"expert tensor parallel size {lay.etp} does not divide the expert FFN "
        f"({shape.moe_ffn_hidden_size})",
    )
    for name, size in (
        ("dense FFN", shape.dense_ffn_hidden_size if shape.dense_layers else 0),
        ("shared-expert FFN", shape.shared_expert_ffn_hidden_size),
    ):
        need(
            size % lay.tp == 0,
            f"policy.tensor_model_parallel_size={lay.tp} does not divide the {name} ({size})",
        )
    if lay.tp > 1 and lay.ep > 1 and not lay.sequence_parallel:
        errors.append(
            "MoE with tensor and expert parallelism needs policy.sequence_parallel=true "
            "(megatron-core: 'sequence parallelism must be used')"
        )
    if lay.sequence_parallel and lay.tp == 1:
        warn.append("policy.sequence_parallel=true is a no-op at TP=1")


def _check_shape(recipe: Recipe, shape: ModelShape, errors: list[str]) -> None:
    policy = recipe.section("policy")
    for key, attr in _SHAPE_KEYS:
        if key in policy and int(policy[key]) != int(getattr(shape, attr)):
            errors.append(
                f"policy.{key}={policy[key]} does not match the model's {attr} "
                f"({getattr(shape, attr)})"
            )
    if shape.topk > shape.num_experts:
        errors.append(f"top-k {shape.topk} exceeds the {shape.num_experts} experts")


def _narrow_bytes(max_id: int) -> int:
    for size in (1, 2, 4):
        if max_id <= 2 ** (8 * size - 1) - 1:
            return size
    return 8


def _trains_in_bf16(recipe: Recipe) -> bool:
    """``policy.precision``; unset, a recipe's converted model trains in its checkpoint dtype
    (``pr2 convert --dtype bfloat16``, what the recipes name) and the tiny GPT in fp32."""
    precision = recipe.get("policy.precision")
    if precision is None:
        return bool(recipe.section("model"))
    return precision == "bfloat16"


def estimate_memory(shape: ModelShape, lay: Layout, recipe: Recipe, mode: str) -> MemoryEstimate:
    """The per-GPU estimate documented in this module's docstring."""
    h, n = shape.hidden_size, shape.num_experts
    embeddings = shape.vocab_size * h * (1 if shape.tie_word_embeddings else 2)
    per_stage_embeddings = embeddings if lay.pp == 1 else shape.vocab_size * h
    body = shape.non_expert_params() - embeddings
    p_dense = body / (lay.pp * lay.tp) + per_stage_embeddings / lay.tp
    moe_per_stage = math.ceil(shape.moe_layers / lay.pp)
    p_expert = moe_per_stage * (n / lay.ep) * 3 * h * shape.moe_ffn_hidden_size / lay.etp
    est = MemoryEstimate()
    bf16 = _trains_in_bf16(recipe)
    distributed = bool(recipe.get("policy.use_distributed_optimizer", False))
    est.device[f"weights ({'bf16' if bf16 else 'fp32'})"] = (2 if bf16 else 4) * (
        p_dense + p_expert
    )
    est.device["grads (fp32)"] = 4 * (p_dense + p_expert)
    # Adam's two fp32 moments, plus fp32 main params when the weights are bf16
    state = 12 if bf16 else 8
    if distributed:
        optimizer = state * (p_dense / lay.dp + p_expert / lay.edp)
    else:
        optimizer = state * (p_dense + p_expert)
    kind = "distributed" if distributed else "replicated"
    est.device[f"optimizer (Adam, {kind})"] = optimizer
    if mode in ("pr2", "pr2_r3"):
        p_pred = moe_per_stage * h * n
        est.device["predictor (fp32 + grad + Adam)"] = 8 * p_pred + 8 * p_pred / lay.dp

    grpo = recipe.section("grpo")
    batch = int(grpo.get("num_prompts_per_step", 1)) * int(
        grpo.get("num_generations_per_prompt", 1)
    )
    seq = recipe.get("policy.max_total_sequence_length") or 0
    sp_split = lay.tp if lay.sequence_parallel else 1
    tokens = math.ceil(batch * int(seq) / (lay.dp * lay.cp * sp_split)) if seq else 0
    est.tokens_per_rank = tokens
    if mode != "none":
        est.device["route payloads (int64)"] = tokens * moe_per_stage * shape.topk * 8
    if mode in ("r3", "pr2_r3"):
        narrow = _narrow_bytes(n - 1)
        est.host["engine route payloads"] = tokens * moe_per_stage * shape.topk * narrow
    if mode in ("pr2", "pr2_r3"):
        pred = recipe.get("policy.router_replay.predictor") or {}
        keep = float(pred.get("cache_keep_fraction", 0.03))
        cap = int(pred.get("cache_tokens_per_step", 65536))
        width = _CACHE_BYTES.get(str(pred.get("cache_dtype", "bf16")), 2)
        cached = min(math.ceil(keep * tokens), cap)
        est.host["feature cache"] = cached * moe_per_stage * (h + n) * width
    return est


def _layer_activation_bytes(shape: ModelShape, lay: Layout, tokens: int, moe: bool) -> float:
    """Bytes one layer keeps for backward, for ``tokens`` tokens (see estimate_activations)."""
    h, a = shape.hidden_size, shape.num_attention_heads
    q, kv, out = shape.attention_widths()
    sp = lay.tp if lay.sequence_parallel else 1
    t_sp = tokens / sp  # tokens of the sequence-parallel shard
    attention = t_sp * 4 * h + tokens * (2 * (q + kv + out) + 4 * a) / lay.tp
    pre_mlp_norm = t_sp * 4 * h
    if not moe:
        return attention + pre_mlp_norm + tokens * 6 * shape.dense_ffn_hidden_size / lay.tp
    n, k, i_moe = shape.num_experts, shape.topk, shape.moe_ffn_hidden_size
    router = t_sp * 8 * n
    experts = k * t_sp * lay.etp * (4 * h + 6 * i_moe / lay.etp)
    shared = tokens * 6 * shape.shared_expert_ffn_hidden_size / lay.tp
    return attention + pre_mlp_norm + router + experts + shared


def estimate_activations(shape: ModelShape, lay: Layout, recipe: Recipe) -> Activations:
    """Activation and logits bytes per GPU of one training step (the worst pipeline stage).

    Assumptions: bf16 activations (2 B), fp32 where megatron keeps fp32 (router logits and
    probabilities, the softmax log-sum-exp), flash attention (no ``S x S`` scores), no dropout
    masks, balanced routing (every rank gets its share of the ``k`` expert copies of a token),
    SwiGLU FFNs. Per micro-batch, a rank holds ``T = micro_batch_size x S / CP`` tokens
    (``S = policy.max_total_sequence_length``); ``s = TP`` with sequence parallelism, else 1.

    Bytes one layer keeps for backward:

    * attention: ``T/s x 4H`` (norm input and output) ``+ T x (2(q + kv + o) + 4a) / TP``
      (Q, K+V, the core attention output o, fp32 log-sum-exp per head a; heads split by TP);
    * before the MLP: ``T/s x 4H`` (residual sum and norm output);
    * dense MLP layer: ``T x 6F / TP`` (fc1 output 2 x 2F, activation output 2F);
    * MoE layer: router ``T/s x 8N`` (fp32 logits and probabilities), routed experts
      ``k x T/s x ETP x (4H + 6 I/ETP)`` (permuted input 2H, fc1 output 4I, activation 2I,
      fc2 output 2H, for the top-k copies of each token; ETP ranks gather their shards),
      shared experts ``T x 6 I_shared / TP``.

    Pipeline: 1F1B keeps ``min(PP, M)`` micro-batches alive on the first stage (``M``
    micro-batches per optimizer mini-step and DP rank), each with ``L_s = ceil(L/PP)`` layers;
    interleaving (VPP) is not modelled. ``without_recompute = min(PP, M) x L_s x A_layer``.
    Full recompute keeps only each layer's input, ``T/s x 2H``, and rebuilds one layer at a
    time in backward: ``with_recompute = min(PP, M) x L_s x T/s x 2H + A_layer``.

    Logits (last stage): ``T x V/TP x 4 B`` fp32 logits plus the same again for the fp32
    softmax (log-probabilities) computed from them; recompute does not shrink them. The worst
    stage is taken as first-stage activations plus last-stage logits (exact at PP = 1).
    """
    seq = int(recipe.get("policy.max_total_sequence_length") or 0)
    mbs = int(recipe.get("policy.micro_batch_size") or 1)
    tokens = math.ceil(mbs * seq / lay.cp)
    grpo = recipe.section("grpo")
    batch = int(grpo.get("num_prompts_per_step", 1)) * int(
        grpo.get("num_generations_per_prompt", 1)
    )
    mini = batch // max(1, int(grpo.get("off_policy_steps", 1)))
    micro_batches = max(1, mini // max(1, lay.dp * mbs))
    in_flight = min(lay.pp, micro_batches)
    layers = math.ceil(shape.num_layers / lay.pp)
    moe_share = shape.moe_layers / shape.num_layers if shape.num_layers else 0.0
    per_layer = moe_share * _layer_activation_bytes(shape, lay, tokens, True) + (
        1 - moe_share
    ) * _layer_activation_bytes(shape, lay, tokens, False)
    biggest = max(
        _layer_activation_bytes(shape, lay, tokens, shape.moe_layers > 0),
        _layer_activation_bytes(shape, lay, tokens, shape.moe_layers == shape.num_layers),
    )
    sp = lay.tp if lay.sequence_parallel else 1
    kept_inputs = in_flight * layers * tokens / sp * 2 * shape.hidden_size
    return Activations(
        micro_batch_tokens=tokens,
        in_flight=in_flight,
        layers=layers,
        per_layer=per_layer,
        without_recompute=in_flight * layers * per_layer,
        with_recompute=kept_inputs + biggest,
        logits=tokens * shape.vocab_size / lay.tp * 4 * 2,
    )


def _check_weights(recipe: Recipe, model_path: str | None, lay: Layout) -> str | None:
    """The refusal of a ``model.checkpoint`` (or ``policy.model_path``) that was never
    converted, with the ``pr2 convert hf-to-mcore`` line for this recipe's layout; None when
    the weights are there or the run uses none (``model.random_init``, the tiny GPT)."""
    from megatron_pr2.convert.required import (
        convert_command,
        is_converted,
        not_converted_message,
    )

    if model_path is None or is_converted(model_path):
        return None
    model = recipe.section("model")
    from_model = not recipe.get("policy.model_path") and model.get("checkpoint")
    key = "model.checkpoint" if from_model else "policy.model_path"
    hf_path = model.get("hf_path")
    command = convert_command(hf_path, model_path, lay.tp, lay.pp, lay.ep, lay.etp)
    return not_converted_message(key, model_path, command)


def check_recipe(
    recipe: Recipe,
    cluster_flags: dict[str, Any] | None = None,
    missing_weights: str = "error",
) -> CheckResult:
    """Run every check; never raises for a bad recipe, returns the messages instead.

    ``missing_weights``: what a ``model.checkpoint`` without converted weights is, ``"error"``
    (check-recipe, a real launch) or ``"warn"`` (a dry run, which only prints the job)."""
    result = CheckResult()
    errors, warn = result.errors, result.warnings
    try:
        result.cluster = cluster_from_section(recipe.section("cluster"), cluster_flags or {})
    except (ValueError, TypeError) as exc:
        errors.append(f"cluster: {exc}")
        return result
    try:
        from megatron_pr2.rl.config import config_from_dict

        config = config_from_dict(trainer_values(recipe, strict=False))
    except (ValueError, TypeError) as exc:
        errors.append(f"trainer config: {exc}")
        return result
    try:
        if recipe.section("model"):
            hf, result.shape_source = load_hf_config(recipe.section("model"), recipe.base_dir)
            shape = result.shape = shape_from_hf(hf)
        else:
            result.shape_source = "the trainer's tiny GPT (no model: section)"
            shape = result.shape = shape_from_policy(recipe.section("policy"))
    except (KeyError, ValueError, FileNotFoundError) as exc:
        errors.append(f"model: {exc.args[0] if exc.args else exc}")
        return result
    try:
        lay = result.layout = _layout(recipe, result.cluster.world_size)
    except (ValueError, TypeError) as exc:
        errors.append(str(exc))
        return result
    _check_shape(recipe, shape, errors)
    _check_parallel(shape, lay, errors, warn)
    unconverted = _check_weights(recipe, config.policy.model_path, lay)
    if unconverted:
        (warn if missing_weights == "warn" else errors).append(unconverted)

    g = config.grpo
    batch = g.num_prompts_per_step * g.num_generations_per_prompt
    mini = batch // g.off_policy_steps
    mbs = config.policy.micro_batch_size
    if lay.dp >= 1 and mini % (lay.dp * mbs):
        errors.append(
            f"mini-batch of {mini} samples (batch {batch} / off_policy_steps "
            f"{g.off_policy_steps}) does not split into whole micro-batches of {mbs} over "
            f"DP={lay.dp} ranks"
        )
    seq = config.policy.max_total_sequence_length
    if seq is not None:
        if shape.max_position_embeddings and seq > shape.max_position_embeddings:
            errors.append(
                f"policy.max_total_sequence_length={seq} exceeds the model's "
                f"max_position_embeddings ({shape.max_position_embeddings})"
            )
        if lay.cp > 1 and seq % (2 * lay.cp):
            errors.append(
                f"policy.max_total_sequence_length={seq} is not divisible by 2*CP={2 * lay.cp}"
            )
    pending = unsupported_parallel_keys(recipe)
    if pending:
        warn.append(
            "the trainer in this checkout has no "
            + ", ".join(p.split("=")[0] for p in pending)
            + " yet: pr2 launch refuses this layout until it does"
        )
    if lay.pp > 1 and config.generation.backend == "megatron":
        warn.append(
            f"PP={lay.pp}: the megatron rollout engine has no KV cache under pipeline "
            "parallelism (megatron's pipeline schedule has no inference context) and re-runs "
            "the whole sequence for every new token, quadratic in generation.max_new_tokens"
            f"={config.generation.max_new_tokens}: use generation.backend=vllm, or a PP=1 layout"
        )
    mode = config.policy.router_replay.mode
    if errors:
        return result
    result.memory = estimate_memory(shape, lay, recipe, mode)
    result.memory.activations = estimate_activations(shape, lay, recipe)
    cap = result.cluster.gpu_memory_gb
    if cap and result.cluster.uses_gpus:
        used = result.memory.device_total / GIB
        if used > cap:
            errors.append(
                f"static memory {used:.1f} GiB per GPU exceeds cluster.gpu_memory_gb={cap} "
                "before activations: raise PP/EP or the node count"
            )
        else:
            recompute = bool(getattr(config.policy, "activation_checkpointing", False))
            total = result.memory.peak(recompute=recompute) / GIB
            recomputed = result.memory.peak(recompute=True) / GIB
            if total > cap:
                if recompute:
                    fix = "raise TP/CP/PP or the node count, or shorten the sequences"
                else:
                    fix = (
                        f"policy.activation_checkpointing=true (full recompute) would bring it "
                        f"to {recomputed:.1f} GiB"
                        + (" (fits)" if recomputed <= cap else " (still too much)")
                        + "; or raise TP/CP/PP, or shorten the sequences"
                    )
                warn.append(
                    f"static memory + activations + logits = {total:.1f} GiB per GPU exceeds "
                    f"cluster.gpu_memory_gb={cap} "
                    f"({'full recompute' if recompute else 'no recompute'}); {fix}"
                )
            elif used > 0.8 * cap:
                warn.append(f"static memory {used:.1f} GiB is over 80% of {cap} GiB")
    return result


def _fmt(num_bytes: float) -> str:
    if num_bytes >= 0.1 * GIB:
        return f"{num_bytes / GIB:9.2f} GiB"
    return f"{num_bytes / 1024**2:9.2f} MiB"


def format_result(recipe: Recipe, result: CheckResult) -> str:
    """Human-readable report: verdict, layout, memory table."""
    name = str(recipe.path) if recipe.path else "<overrides>"
    if recipe.variants_applied:
        name += f" [variants: {', '.join(recipe.variants_applied)}]"
    lines = [f"recipe {name}"]
    if result.shape is not None:
        s = result.shape
        lines.append(
            f"  model    {s.model_type}: {s.num_layers} layers ({s.moe_layers} MoE), hidden "
            f"{s.hidden_size}, {s.num_experts} experts top-{s.topk}, "
            f"{s.total_params() / 1e9:.2f} B params ({result.shape_source})"
        )
    if result.layout is not None:
        lines.append(f"  layout   {result.layout.describe()}")
    if result.memory is not None:
        mem = result.memory
        lines.append(f"  memory per GPU ({mem.tokens_per_rank} tokens/rank/step):")
        for key, value in mem.device.items():
            lines.append(f"    {key:<40}{_fmt(value)}")
        lines.append(f"    {'static total':<40}{_fmt(mem.device_total)}")
        act = mem.activations
        if act is not None:
            where = (
                f"{act.micro_batch_tokens} tokens/micro-batch x {act.layers} layers"
                f" x {act.in_flight} in flight"
            )
            lines.append(f"    activations ({where}):")
            lines.append(f"    {'  no recompute':<40}{_fmt(act.without_recompute)}")
            lines.append(f"    {'  full recompute':<40}{_fmt(act.with_recompute)}")
            lines.append(f"    {'logits (fp32 + fp32 softmax copy)':<40}{_fmt(act.logits)}")
            lines.append(f"    {'total, no recompute':<40}{_fmt(mem.peak(False))}")
            lines.append(f"    {'total, full recompute':<40}{_fmt(mem.peak(True))}")
        for key, value in mem.host.items():
            lines.append(f"    {key + ' (host)':<40}{_fmt(value)}")
    for message in result.warnings:
        lines.append(f"  warning: {message}")
    for message in result.errors:
        lines.append(f"  error: {message}")
    lines.append("  OK" if result.ok else f"  FAILED ({len(result.errors)} error(s))")
    return "\n".join(lines)
