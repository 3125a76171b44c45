"""Training backends: one optimizer step over a rank's micro-batches, on one process or on a parallel layout.

`LocalBackend` is plain PyTorch on one process (the reference every layout is tested against). `DeepSpeedBackend`
takes the same model with tensor and expert parallelism already applied (`train.trainer.prepare_model`), cuts it into
pipeline stages when pp > 1, and hands it to DeepSpeed, which owns the data-parallel dimension (ZeRO 0/1/2), the 1F1B
schedule, gradient accumulation, clipping and bf16. Both expose the state as `LocalState` (full names, shard boxes),
so checkpoints move between them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from moe_platform.checkpoint.sharded import LocalState, ShardedReader, ShardSpec
from moe_platform.config import Config
from moe_platform.model.moe import MoE
from moe_platform.model.transformer import MoETransformer, has_meta_tensors, materialize
from moe_platform.parallel.layout import Layout, ProcessGroups
from moe_platform.parallel.pipeline import ExpertPlaceholder, build_pipeline_module
from moe_platform.parallel.placement import is_expert_tensor, local_shard_spec
from moe_platform.train.data import IGNORE_INDEX
from moe_platform.train.optim import (
    EXPERT_PLACEHOLDER,
    build_optimizer,
    clip_grad_norm,
    deepspeed_param_groups,
    set_lr,
)

log = logging.getLogger("moe_platform.train")
ADAM_KEYS = ("exp_avg", "exp_avg_sq")
# Set as a backend's `gradient_probe`, called once per step with this rank's gradient of every trainable parameter
# (full names; the local shard under tensor/expert parallelism), summed over the step's micro-batches and reduced
# over data parallelism, before clipping and the update. For tests and debugging, e.g. comparing layouts parameter by
# parameter; not under pipeline parallelism (DeepSpeed's pipeline engine steps inside its own train_batch).
GradientProbe = Callable[[dict[str, torch.Tensor]], None]


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the counted targets (not IGNORE_INDEX)."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX)


class TokenLoss:
    """A micro-batch's summed cross-entropy over its counted targets, times `scale`.

    The trainer sets `scale` = (micro-batches in the global batch) / (counted targets in the global batch) before
    each step. Every backend averages micro-batch losses (over accumulation steps and data-parallel ranks), so the
    step's objective is the mean over every counted token of the global batch: the same loss and gradients on every
    layout, however the counted tokens (assistant turns of chat data) fall into micro-batches.
    """

    def __init__(self) -> None:
        self.scale = 1.0

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                                ignore_index=IGNORE_INDEX, reduction="sum")
        return total * self.scale


def _forward(model, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Logits of a micro-batch (tokens, targets) or, packing documents, (tokens, targets, segments)."""
    return model(batch[0], segments=batch[2]) if len(batch) > 2 else model(batch[0])


def pipeline_batch(batch: tuple[torch.Tensor, ...]) -> tuple:
    """A micro-batch as DeepSpeed's pipeline engine takes it: (inputs, labels)."""
    return ((batch[0], batch[2]) if len(batch) > 2 else batch[0]), batch[1]


def _plain_optimizer_state(optimizer: torch.optim.Optimizer, named: Iterable[tuple[str, nn.Parameter]], state,
                           copy: bool = True):
    for name, p in named:
        s = optimizer.state.get(p)
        if not s:
            continue
        for key in ADAM_KEYS:
            getattr(state, key)[name] = s[key].detach().float().cpu().clone() if copy else s[key]
        state.step[name] = int(s["step"])


def _restore_plain_optimizer_state(optimizer, named, reader: ShardedReader, specs: dict[str, ShardSpec]) -> None:
    for name, p in named:
        if not reader.has(name, "exp_avg"):
            continue
        optimizer.state[p] = {
            "step": torch.tensor(float(reader.step(name))),
            **{key: reader.read(name, specs[name], key).to(p.device, p.dtype) for key in ADAM_KEYS},
        }


def _load_model_tensors(named: Iterable[tuple[str, torch.Tensor]], reader, specs: dict[str, ShardSpec]) -> None:
    """Fill the model's tensors with their local share from `reader`: a checkpoint (ShardedReader) or, at the start
    of a fine-tuning run, the imported model directory (HFWeights, which reads only that share)."""
    with torch.no_grad():
        for name, t in named:
            value = reader.read(name, specs[name])
            if value.shape != t.shape:
                raise ValueError(f"checkpoint tensor {name} has shape {tuple(value.shape)} here, the model needs "
                                 f"{tuple(t.shape)} (different model config?)")
            t.copy_(value)


class LossScaler:
    """fp16 dynamic loss scaling on one process (torch.amp.GradScaler, set up like DeepSpeed's: start at
    2**train.fp16_initial_scale_power, halve on an overflow and skip that step, double after
    train.fp16_loss_scale_window clean steps). Disabled for every other precision, where it does nothing."""

    def __init__(self, cfg: Config, device: torch.device):
        self.enabled = cfg.train.precision == "fp16"
        self.scaler = torch.amp.GradScaler(device.type, init_scale=2.0 ** cfg.train.fp16_initial_scale_power,
                                           growth_interval=cfg.train.fp16_loss_scale_window, enabled=self.enabled)
        self.skipped_steps = 0
        self.overflow = False

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return self.scaler.scale(loss)

    def current_scale(self) -> float:
        """What the loss is multiplied by now (1.0 unless fp16)."""
        return float(self.scaler.get_scale()) if self.enabled else 1.0

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        if self.enabled:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """Step unless the gradients overflowed (then count the skip); update the scale."""
        if not self.enabled:
            optimizer.step()
            return
        before = self.scaler.get_scale()
        self.scaler.step(optimizer)
        self.scaler.update()
        self.overflow = self.scaler.get_scale() < before
        self.skipped_steps += int(self.overflow)

    def metrics(self) -> dict:
        if not self.enabled:
            return {}
        return {"loss_scale": self.scaler.get_scale(), "overflow": self.overflow, "skipped_steps": self.skipped_steps}

    def state_dict(self) -> dict | None:
        if not self.enabled:
            return None
        state = self.scaler.state_dict()
        return {"scale": float(state["scale"]), "growth_tracker": int(state["_growth_tracker"]),
                "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state: dict | None) -> None:
        if not self.enabled or not state:
            return
        self.scaler.load_state_dict({**self.scaler.state_dict(), "scale": state["scale"],
                                     "_growth_tracker": state.get("growth_tracker", 0)})
        self.skipped_steps = int(state.get("skipped_steps", 0))


class DeepSpeedLossScaler:
    """The same view of DeepSpeed's own dynamic loss scaler (the engine skips overflow steps itself)."""

    def __init__(self, engine, enabled: bool):
        self.engine = engine
        self.enabled = enabled

    def _scaler(self):
        return getattr(self.engine.optimizer, "loss_scaler", None)

    def current_scale(self) -> float:
        """What DeepSpeed multiplies the loss by now (1.0 unless fp16)."""
        scaler = self._scaler() if self.enabled else None
        return float(scaler.cur_scale) if scaler is not None else 1.0

    def metrics(self) -> dict:
        if not self.enabled:
            return {}
        scaler = self._scaler()
        return {"loss_scale": float(scaler.cur_scale) if scaler is not None else None,
                "overflow": not self.engine.was_step_applied(), "skipped_steps": int(self.engine.skipped_steps)}

    def state_dict(self) -> dict | None:
        if not self.enabled:
            return None
        scaler = self._scaler()
        keys = ("cur_iter", "last_overflow_iter", "cur_hysteresis")
        return {"scale": float(scaler.cur_scale), "skipped_steps": int(self.engine.skipped_steps),
                "deepspeed": {k: getattr(scaler, k) for k in keys if hasattr(scaler, k)}}

    def load_state_dict(self, state: dict | None) -> None:
        if not self.enabled or not state:
            return
        scaler = self._scaler()
        scaler.cur_scale = state["scale"]
        for k, v in state.get("deepspeed", {}).items():
            setattr(scaler, k, v)
        self.engine.skipped_steps = int(state.get("skipped_steps", 0))


def set_aux_grad_scale(moe_layers: Iterable[MoE], loss_scale: float) -> None:
    """Scale the balancing losses' gradients by fp16's loss scale, as the main loss's are (see MoE.aux_grad_scale)."""
    for moe in moe_layers:
        moe.aux_grad_scale = loss_scale


class LocalBackend:
    """One process, plain PyTorch: the single-process reference."""

    def __init__(self, model: MoETransformer, cfg: Config, device: torch.device, autocast_dtype, accum: int,
                 loss_fn: Callable | None = None):
        if has_meta_tensors(model):  # built on meta for an import: its weights come from load_state
            materialize(model, device)
        self.model = model
        self.device = device
        self.autocast_dtype = autocast_dtype
        self.accum = accum
        self.grad_clip = cfg.train.grad_clip
        self.optimizer = build_optimizer(model, cfg.train)
        self.loss_scaler = LossScaler(cfg, device)
        self.loss_fn = loss_fn or TokenLoss()
        self.moe_layers = model.moe_layers()
        for moe in self.moe_layers:
            moe.aux_loss_scale = 1.0 / accum
        self.specs = {name: ShardSpec.whole(tuple(t.shape)) for name, t in model.state_dict().items()}
        self.dp_group = None
        self.is_logging_rank = True
        self._staging: LocalState | None = None
        self.gradient_probe: GradientProbe | None = None

    def set_lr(self, lr: float) -> None:
        set_lr(self.optimizer, lr)

    def forward_loss(self, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            return self.loss_fn(_forward(self.model, batch), batch[1])

    def train_batch(self, micro_batches: list[tuple[torch.Tensor, ...]]) -> tuple[float, float]:
        self.model.train()
        set_aux_grad_scale(self.moe_layers, self.loss_scaler.current_scale())
        total = torch.zeros((), device=self.device)
        for batch in micro_batches:
            loss = self.forward_loss(batch) / self.accum
            self.loss_scaler.scale(loss).backward()
            total += loss.detach()
        self.loss_scaler.unscale(self.optimizer)
        if self.gradient_probe is not None:
            self.gradient_probe({n: p.grad for n, p in self.model.named_parameters() if p.grad is not None})
        norm = clip_grad_norm(self.model.parameters(), self.grad_clip)  # reported even when clipping is off
        self.loss_scaler.step(self.optimizer)
        self.optimizer.zero_grad(set_to_none=True)
        return float(total), float(norm)

    def eval_loss(self, micro_batches: list[tuple[torch.Tensor, ...]]) -> float:
        return sum(float(loss) for loss in self.eval_outputs(micro_batches)) / len(micro_batches)

    @torch.no_grad()
    def eval_outputs(self, micro_batches: list[tuple]) -> list[torch.Tensor]:
        """The loss function's output for each micro-batch, in eval mode and without gradients, as it is (labels
        may be a tuple of tensors, as any backend's loss function takes them)."""
        self.model.eval()
        return [self.forward_loss(batch).detach() for batch in micro_batches]

    def local_state(self) -> LocalState:
        """A host copy of the state in reused staging buffers: after the first checkpoint a snapshot is a memcpy
        into memory that is already mapped (the checkpointer writes one snapshot at a time, so reuse is safe)."""
        live = LocalState(model=dict(self.model.state_dict()), specs=self.specs)
        _plain_optimizer_state(self.optimizer, self.model.named_parameters(), live, copy=False)
        if self._staging is None:
            self._staging = LocalState(model={}, specs=self.specs)
        staging = self._staging
        staging.step = dict(live.step)
        for kind in ("model", "exp_avg", "exp_avg_sq"):
            src, dst = getattr(live, kind), getattr(staging, kind)
            for name, t in src.items():
                if name not in dst or dst[name].shape != t.shape:
                    dst[name] = torch.empty(t.shape, dtype=torch.float32, device="cpu")
                dst[name].copy_(t.detach())
        return staging

    def load_state(self, reader: ShardedReader) -> None:
        _load_model_tensors(self.model.state_dict().items(), reader, self.specs)
        _restore_plain_optimizer_state(self.optimizer, self.model.named_parameters(), reader, self.specs)


def fp16_kernels() -> tuple[bool, str]:
    """(whether this machine's DeepSpeed accelerator has fp16 kernels, its device name). DeepSpeed's fp16 engine
    refuses to start without them ("Type fp16 is not supported on your device"). A GPU has them; on CPU it asks
    oneDNN, which has them on CPUs with AVX512-FP16 or AMX-FP16 (Sapphire Rapids and later), so the answer is the
    machine's, not the code's: with them, fp16 on several CPU ranks trains like fp16 on one process."""
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    return bool(accelerator.is_fp16_supported()), accelerator.device_name()


def check_precision(cfg: Config, world_size: int, kernels: tuple[bool, str] | None = None) -> None:
    """fp16 on several ranks runs DeepSpeed's fp16 engine: refuse it up front (before any process starts) on a
    device without fp16 kernels, where DeepSpeed would refuse it later. `kernels` is `fp16_kernels()` (this
    machine's) unless given."""
    if cfg.train.precision != "fp16" or world_size == 1:
        return
    supported, device = kernels if kernels is not None else fp16_kernels()
    if not supported:
        raise ValueError(f"train.precision = 'fp16' on {world_size} ranks runs DeepSpeed's fp16 engine, which this "
                         f"{device} device does not support (no fp16 kernels; on CPU they need AVX512-FP16 or "
                         f"AMX-FP16): train on GPUs, or use bf16, fp32, or fp16 on one process")


class DeepSpeedMPU:
    """The model-parallel unit DeepSpeed asks for group information (tensor parallelism without a pipeline)."""

    def __init__(self, groups: ProcessGroups):
        import torch.distributed as dist

        self.g = groups
        self._world = dist.group.WORLD

    def get_model_parallel_rank(self):
        return self.g.tp_rank

    def get_model_parallel_world_size(self):
        return self.g.tp_size

    def get_model_parallel_group(self):
        return self.g.tp

    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group

    def get_data_parallel_rank(self):
        return self.g.dp_rank

    def get_data_parallel_world_size(self):
        return self.g.dp_size

    def get_data_parallel_group(self):
        return self.g.dp if self.g.dp is not None else _single_rank_group(self.g.rank)

    def get_pipeline_model_parallel_world_size(self):
        return 1

    get_pipe_parallel_world_size = get_pipeline_model_parallel_world_size


_SINGLE_GROUPS: dict[int, object] = {}


def _single_rank_group(rank: int):
    """A group of just this rank (DeepSpeed wants a group object even where a degree is 1)."""
    import torch.distributed as dist

    if rank not in _SINGLE_GROUPS:
        for r in range(dist.get_world_size()):  # every rank must create every group, in the same order
            _SINGLE_GROUPS[r] = dist.new_group([r])
    return _SINGLE_GROUPS[rank]


def build_deepspeed_config(cfg: Config, layout: Layout, device_type: str, local_numel: int) -> dict:
    """DeepSpeed's config for `cfg` on `layout`: batch split, ZeRO stage, clipping and precision. Pure: no process
    group or device is touched. `local_numel` (this rank's parameter count) sizes the ZeRO buckets, which DeepSpeed
    otherwise preallocates at 5e8 elements (2 GB of fp32 per rank) whatever the model."""
    train = cfg.train
    gas = layout.num_micro_batches(train.global_batch_size, train.micro_batch_size)
    bucket = int(min(5e8, max(2**20, local_numel)))
    return {
        "train_batch_size": train.global_batch_size,
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": gas,
        "gradient_clipping": train.grad_clip,
        "zero_optimization": {"stage": cfg.parallel.zero_stage, "contiguous_gradients": True, "reduce_scatter": True,
                              "overlap_comm": False, "reduce_bucket_size": bucket, "allgather_bucket_size": bucket},
        "bf16": {"enabled": train.precision == "bf16" or (train.precision == "auto" and device_type == "cuda")},
        # DeepSpeed's dynamic loss scaling: an overflow step is skipped and halves the scale.
        "fp16": {"enabled": train.precision == "fp16", "loss_scale": 0,
                 "initial_scale_power": train.fp16_initial_scale_power,
                 "loss_scale_window": train.fp16_loss_scale_window, "hysteresis": 2, "min_loss_scale": 1},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


class DeepSpeedBackend:
    """A layout (dp, tp, pp, ep) of the same model on DeepSpeed."""

    def __init__(self, model: MoETransformer, cfg: Config, groups: ProcessGroups, device: torch.device,
                 full_shapes: dict[str, tuple[int, ...]], reader: ShardedReader | None = None,
                 loss_fn: Callable | None = None):
        """`model` is already parallelized (`train.trainer.prepare_model`); `full_shapes` are its tensors' shapes
        before sharding, which map this rank's shards onto the full checkpoint tensors."""
        import deepspeed

        from moe_platform import deepspeed_compat

        # DeepSpeed's communication layer wraps the process group we already joined (pipeline modules need it).
        deepspeed_compat.clear_stale_build_locks()
        deepspeed.init_distributed(dist_backend=torch.distributed.get_backend())
        self.cfg = cfg
        self.groups = groups
        self.device = device
        layout = groups.layout
        self.gas = layout.num_micro_batches(cfg.train.global_batch_size, cfg.train.micro_batch_size)
        self.moe_layers = model.moe_layers()
        for moe in self.moe_layers:
            moe.aux_loss_scale = 1.0 / self.gas
        # Full names by tensor identity, fixed before the model is cut into stages.
        self.names = {id(t): n for n, t in model.state_dict(keep_vars=True).items()}
        self.model = model  # this rank's (tensor/expert-sharded) copy; stages hold parts of it when pp > 1
        self.loss_fn = loss_fn or TokenLoss()
        # Built on meta for an import: only this rank's share gets memory, and its weights are read below.
        on_meta = has_meta_tensors(model)
        if layout.pp_enabled:
            module = build_pipeline_module(model, groups, self.loss_fn, materialize_on=device if on_meta else None)
            self.moe_layers = [m for m in module.modules() if isinstance(m, MoE)]
        else:
            module = model
            if on_meta:
                materialize(module, device)
        module.to(device)
        if on_meta:  # materializing made new tensors; the stages hold the model's own modules, so it names them all
            self.names = {id(t): n for n, t in model.state_dict(keep_vars=True).items()}
        tensors = module.state_dict(keep_vars=True).values()
        placeholders = [t for t in tensors if id(t) not in self.names]  # a dense stage's expert placeholder
        assert len(placeholders) <= 1, f"{len(placeholders)} tensors of the pipeline stage have no model name"
        local = [(self.names[id(t)], t) for t in tensors if id(t) in self.names]
        self.local_tensors = local
        self.local_params = [(n, t) for n, t in local if isinstance(t, nn.Parameter)]
        self.specs = {n: local_shard_spec(n, full_shapes[n], groups) for n, _ in local}
        if reader is not None:  # weights go in before DeepSpeed copies them into its fp32 partitions
            _load_model_tensors(local, reader, self.specs)
        if layout.ep_enabled:
            self._create_deepspeed_expert_groups(module)
            # not with frozen experts; a pipeline stage without experts has its placeholder instead
            if placeholders or any(p.requires_grad and is_expert_tensor(n) for n, p in self.local_params):
                deepspeed_compat.make_moe_visible(module, (MoE, ExpertPlaceholder), layout.ep)
        check_precision(cfg, layout.world_size)
        ds_config = build_deepspeed_config(cfg, layout, device.type, sum(p.numel() for _, p in self.local_params))
        fp16 = ds_config["fp16"]["enabled"]
        group_params = self.local_params + [(EXPERT_PLACEHOLDER, t) for t in placeholders]
        optimizer = torch.optim.AdamW(deepspeed_param_groups(group_params, cfg.train, layout.ep_enabled),
                                      lr=cfg.train.lr, betas=(cfg.train.beta1, cfg.train.beta2), eps=1e-8,
                                      foreach=False)
        mpu = DeepSpeedMPU(groups) if layout.tp_enabled and not layout.pp_enabled else None
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=ds_config,
                                                                 mpu=mpu)
        self.loss_scaler = DeepSpeedLossScaler(self.engine, fp16)
        self.is_pipeline = layout.pp_enabled
        self.gradient_probe: GradientProbe | None = None  # not called under pipeline parallelism
        self.dp_group = groups.dp
        # Metrics come from the last pipeline stage (it has the loss), first data/tensor rank.
        self.is_logging_rank = groups.dp_rank == 0 and groups.tp_rank == 0 and groups.pp_rank == layout.pp - 1
        if reader is not None:
            self._restore_optimizer(reader)

    def _create_deepspeed_expert_groups(self, module) -> None:
        from moe_platform import deepspeed_compat

        ep = self.groups.ep_size
        theirs = deepspeed_compat.create_expert_groups(
            ep, mpu=DeepSpeedMPU(self.groups) if self.groups.layout.tp_enabled else None,
            pipeline_module=module if self.is_pipeline_layout else None)
        ours = sorted(self.groups.ranks("ep"))
        assert ours == sorted(theirs), f"expert-parallel groups disagree with DeepSpeed's: {ours} vs {theirs}"

    @property
    def is_pipeline_layout(self) -> bool:
        return self.groups.layout.pp_enabled

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def train_batch(self, micro_batches: list[tuple[torch.Tensor, ...]]) -> tuple[float, float]:
        import torch.distributed as dist

        set_aux_grad_scale(self.moe_layers, self.loss_scaler.current_scale())
        if self.is_pipeline:
            loss = self.engine.train_batch(data_iter=iter([pipeline_batch(b) for b in micro_batches]))
            loss = loss.detach().float()
        else:
            self.engine.train()
            total = torch.zeros((), device=self.device)
            for i, batch in enumerate(micro_batches):
                loss = self.loss_fn(_forward(self.engine, batch), batch[1])
                self.engine.backward(loss)
                if self.gradient_probe is not None and i == len(micro_batches) - 1:  # reduced at the boundary
                    self.gradient_probe(self._local_gradients())
                self.engine.step()
                total += loss.detach().float()
            loss = total / len(micro_batches)
            if self.groups.dp is not None:
                dist.all_reduce(loss, group=self.groups.dp)
                loss /= self.groups.dp_size
        norm = self.engine.get_global_grad_norm()
        return float(loss), float(norm if norm is not None else 0.0)

    def _local_gradients(self) -> dict[str, torch.Tensor]:
        """Every trainable local parameter's gradient, reduced over data parallelism (ZeRO keeps it partitioned;
        assembling it is a collective over the data-parallel group). fp16: still times the loss scale."""
        from deepspeed.utils import safe_get_full_grad

        grads = {n: safe_get_full_grad(p) for n, p in self.local_params if p.requires_grad}
        return {n: g for n, g in grads.items() if g is not None}

    @torch.no_grad()
    def eval_loss(self, micro_batches: list[tuple[torch.Tensor, ...]]) -> float:
        """Mean loss over this rank's micro-batches, averaged over data-parallel ranks."""
        import torch.distributed as dist

        if self.is_pipeline:
            loss = self.engine.eval_batch(data_iter=iter([pipeline_batch(b) for b in micro_batches]),
                                          num_micro_batches=len(micro_batches))
            return float(loss)
        loss = sum(out.float() for out in self.eval_outputs(micro_batches)) / len(micro_batches)
        if self.groups.dp is not None:
            dist.all_reduce(loss, group=self.groups.dp)
            loss /= self.groups.dp_size
        return float(loss)

    @torch.no_grad()
    def eval_outputs(self, micro_batches: list[tuple]) -> list[torch.Tensor] | None:
        """The loss function's output for each of this rank's micro-batches, in eval mode and without gradients, as
        it is (not averaged); None on pipeline stages before the last, which compute no loss."""
        if self.is_pipeline:
            from moe_platform import deepspeed_compat

            return deepspeed_compat.pipeline_eval_outputs(self.engine, [pipeline_batch(b) for b in micro_batches])
        self.engine.eval()
        return [self.loss_fn(_forward(self.engine, b), b[1]).detach() for b in micro_batches]

    # -- state ---------------------------------------------------------------------------------------------------

    def _zero(self):
        from moe_platform import deepspeed_compat

        return deepspeed_compat.zero_optimizer(self.optimizer)

    def local_state(self) -> LocalState:
        """This rank's shard of every tensor (collective: every rank of the layout must call it)."""
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        from moe_platform import deepspeed_compat

        zo = self._zero()
        model: dict[str, torch.Tensor] = {}
        state = LocalState(model=model, specs=self.specs)
        step = None
        if zo is not None:
            steps = [s["step"] for s in zo.optimizer.state.values() if "step" in s]
            step = int(steps[0]) if steps else None
            if step is not None:
                deepspeed_compat.link_optimizer_fragments(zo)
        for name, t in self.local_tensors:
            full = safe_get_full_fp32_param(t) if (zo is not None and isinstance(t, nn.Parameter)) else None
            model[name] = (full if full is not None else t.detach()).float().cpu().clone()
            if zo is not None and isinstance(t, nn.Parameter) and t.requires_grad and step is not None:
                for key in ADAM_KEYS:
                    getattr(state, key)[name] = safe_get_full_optimizer_state(t, key).float().cpu().clone()
                state.step[name] = step
        if zo is None:
            _plain_optimizer_state(self.optimizer, self.local_params, state)
        # One writer per distinct shard: dense tensors from data-parallel rank 0, experts from edp rank 0.
        state.owned = {n for n, _ in self.local_tensors
                       if (self.groups.edp_rank == 0 if (is_expert_tensor(n) and self.groups.layout.ep_enabled)
                           else self.groups.dp_rank == 0)}
        return state

    def _restore_optimizer(self, reader: ShardedReader) -> None:
        from deepspeed.utils import safe_set_full_optimizer_state

        from moe_platform import deepspeed_compat

        if not any(reader.has(n, "exp_avg") for n, _ in self.local_params):
            return
        zo = self._zero()
        if zo is None:
            _restore_plain_optimizer_state(self.optimizer, self.local_params, reader, self.specs)
            return
        step = next(reader.step(n) for n, _ in self.local_params if reader.has(n, "exp_avg"))
        base = zo.optimizer
        # Create the optimizer state DeepSpeed would create at its first step, link the per-parameter views into it,
        # then fill each parameter's fragment from the checkpoint.
        for flat in deepspeed_compat.flat_partitions(zo):
            base.state[flat] = {"step": torch.tensor(float(step)), "exp_avg": torch.zeros_like(flat),
                                "exp_avg_sq": torch.zeros_like(flat)}
        deepspeed_compat.link_optimizer_fragments(zo)
        for name, p in self.local_params:
            for key in ADAM_KEYS:
                safe_set_full_optimizer_state(p, reader.read(name, self.specs[name], key).to(p.device), key)
