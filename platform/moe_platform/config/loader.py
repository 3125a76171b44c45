"""TOML loading, `--section.key=value` overrides and validation of the config tree."""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import re
import typing
from pathlib import Path
from typing import Any

import tomllib

from moe_platform.checks import requirer
from moe_platform.config.schema import Config
from moe_platform.model.lora import parse_targets

log = logging.getLogger("moe_platform.config")
DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge")
OBJECTIVES = {"lm": ("text", "chat"), "dpo": ("preference",), "grpo": ("prompts",)}  # objective -> data formats
GRPO_LOSS_AGGS = ("token_mean", "seq_mean")
_REWARD_SPEC = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*$")
_BOOL_WORDS = {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False, "no": False, "off": False}


def rank_cpu_sets(spec: str) -> list[list[int]]:
    """`elastic.rank_cpus` as the sorted cores of each local rank: "0,2-3;4-7" -> [[0, 2, 3], [4, 5, 6, 7]]; ""
    -> [] (no pinning). Raises ValueError naming the part that is not a core list, or a core given to two ranks."""
    sets: list[list[int]] = []
    for part in spec.split(";") if spec.strip() else []:
        cores: set[int] = set()
        for item in part.split(","):
            lo, sep, hi = item.strip().partition("-")
            if not (lo.isdigit() and (hi.isdigit() if sep else True)) or (sep and int(hi) < int(lo)):
                raise ValueError(f"elastic.rank_cpus: {item.strip()!r} in {spec!r} is not a core or a range "
                                 f"like 2-7")
            cores.update(range(int(lo), int(hi or lo) + 1))
        if taken := cores & {c for s in sets for c in s}:
            raise ValueError(f"elastic.rank_cpus: cores {sorted(taken)} in {spec!r} are given to two ranks")
        sets.append(sorted(cores))
    return sets


def reward_specs(reward: str, weights: str) -> list[tuple[str, float]]:
    """`grpo.reward` and `grpo.reward_weights` as [("module:function", weight), ...]; raises ValueError naming the
    entry that is not a 'module:function' or not a finite weight, or a count that does not match."""
    specs = [s.strip() for s in reward.split(",") if s.strip()]
    if not specs:
        raise ValueError("grpo.reward must name at least one reward function 'module:function'")
    for spec in specs:
        if not _REWARD_SPEC.match(spec):
            raise ValueError(f"grpo.reward: {spec!r} is not 'module:function' (e.g. moe_platform.rewards:exact_match)")
    texts = [w.strip() for w in weights.split(",")] if weights.strip() else ["1"] * len(specs)
    if len(texts) != len(specs):
        raise ValueError(f"grpo.reward_weights has {len(texts)} weights for {len(specs)} reward functions ({reward!r})")
    out = []
    for spec, text in zip(specs, texts, strict=True):
        try:
            weight = float(text)
        except ValueError:
            weight = math.nan
        if not math.isfinite(weight):
            raise ValueError(f"grpo.reward_weights: {text!r} (the weight of {spec}) is not a finite number")
        out.append((spec, weight))
    return out


def resource_amounts(spec: str) -> dict[str, float]:
    """`grpo.rollout_resources` "CPU=1, GPU=0.5, custom=1" -> {"CPU": 1.0, ...}; raises ValueError naming the entry."""
    out: dict[str, float] = {}
    for item in (x.strip() for x in spec.split(",")):
        if not item:
            continue
        name, sep, value = item.partition("=")
        try:
            amount = float(value) if sep else math.nan
        except ValueError:
            amount = math.nan
        if not name.strip() or not math.isfinite(amount) or amount < 0:
            raise ValueError(f"grpo.rollout_resources: {item!r} in {spec!r} is not NAME=amount with an amount >= 0")
        out[name.strip()] = amount
    return out


def _section_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _compound_keys(cls) -> set[str]:
    """String keys that hold a list (or, for resources, a table): TOML may give them as arrays or inline tables."""
    return {f.name for f in dataclasses.fields(cls) if f.metadata.get("compound")}


def _join_compound(value: Any, where: str) -> Any:
    """A TOML array or inline table of a compound key as its comma-separated string form."""
    if isinstance(value, list) and all(isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in value):
        return ", ".join(str(v) for v in value)
    if isinstance(value, dict) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value.values()):
        return ", ".join(f"{k}={v}" for k, v in value.items())
    if isinstance(value, (list, dict)):
        raise ValueError(f"{where} must be a string, a list of strings or numbers, or a table of numbers, got "
                         f"{value!r}")
    return value


def _coerce(value: Any, typ: Any, where: str) -> Any:
    """Convert a TOML value or a command-line string to the field's type, or say what is wrong."""
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _BOOL_WORDS:
            return _BOOL_WORDS[value.lower()]
        raise ValueError(f"{where} must be a boolean (true/false), got {value!r}")
    if typ is int:
        if isinstance(value, bool):
            raise ValueError(f"{where} must be an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            if value.strip().lower() == "auto":
                return 0
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ValueError(f"{where} must be an integer, got {value!r}")
    if typ is float:
        if isinstance(value, bool):
            raise ValueError(f"{where} must be a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ValueError(f"{where} must be a number, got {value!r}")
    if typ is str:
        if isinstance(value, str):
            return value
        raise ValueError(f"{where} must be a string, got {value!r}")
    raise TypeError(f"unsupported config field type {typ} at {where}")


def config_from_dict(data: dict[str, Any], base: Config | None = None, validate: bool = True) -> Config:
    """Build a Config from nested dicts, rejecting unknown sections/keys and values of the wrong type."""
    cfg = base if base is not None else Config()
    sections = _section_types(Config)
    for section, values in data.items():
        if section not in sections:
            raise ValueError(f"unknown config section [{section}]; known sections: {sorted(sections)}")
        if not isinstance(values, dict):
            raise ValueError(f"config section [{section}] must be a table, got {values!r}")
        section_obj = getattr(cfg, section)
        types = _section_types(type(section_obj))
        compound = _compound_keys(type(section_obj))
        updates = {}
        for key, value in values.items():
            if key not in types:
                raise ValueError(f"unknown config key '{section}.{key}'; known keys in [{section}]: {sorted(types)}")
            if key in compound:
                value = _join_compound(value, f"{section}.{key}")
            updates[key] = _coerce(value, types[key], f"{section}.{key}")
        setattr(cfg, section, _replace(section_obj, updates))
    if validate:
        validate_config(cfg)
    return cfg


def _replace(obj, updates: dict[str, Any]):
    """dataclasses.replace without __post_init__ checks (ModelArgs validates itself): the whole tree is validated
    once at the end, so a file may be completed or corrected by later overrides."""
    new = copy.copy(obj)
    for key, value in updates.items():
        object.__setattr__(new, key, value)
    return new


def parse_overrides(args: list[str]) -> dict[str, dict[str, str]]:
    """['--train.lr=1e-3', '--parallel.dp', '2'] -> {'train': {'lr': '1e-3'}, 'parallel': {'dp': '2'}}."""
    out: dict[str, dict[str, str]] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            raise ValueError(f"expected an override of the form --section.key=value, got {arg!r}")
        if "=" in arg:
            key, value = arg[2:].split("=", 1)
        else:
            if i + 1 >= len(args):
                raise ValueError(f"override {arg!r} has no value")
            key, value = arg[2:], args[i + 1]
            i += 1
        section, _, name = key.partition(".")
        out.setdefault(section, {})[name.replace("-", "_")] = value
        i += 1
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- TOML file <- command-line overrides, validated once at the end."""
    cfg = Config()
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"config file not found: {p}")
        try:
            data = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"config file {p} is not valid TOML: {e}") from e
        cfg = config_from_dict(data, cfg, validate=False)
    explicit = parse_overrides(overrides) if overrides else {}
    if explicit:
        cfg = config_from_dict(explicit, cfg, validate=False)
    t = cfg.train
    if t.warmup > t.steps > 0 and "warmup" not in explicit.get("train", {}):
        # A short run (`--train.steps=12`) is the first thing people try: the file's warmup yields to it. A warmup
        # given on the command line beyond the run stays an error (validate_config).
        log.warning("train.warmup (%d) is longer than the run: using train.steps (%d) warmup steps", t.warmup,
                    t.steps)
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(t, warmup=t.steps))
    validate_config(cfg)
    return cfg


def config_to_dict(cfg: Config) -> dict[str, dict[str, Any]]:
    return dataclasses.asdict(cfg)


def config_to_toml(cfg: Config) -> str:
    lines = []
    for section, values in config_to_dict(cfg).items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            if isinstance(value, bool):
                lines.append(f"{key} = {'true' if value else 'false'}")
            elif isinstance(value, str):
                escaped = value.replace("\\", "\\\\").replace('"', '\\"')
                lines.append(f'{key} = "{escaped}"')
            else:
                lines.append(f"{key} = {value!r}")
        lines.append("")
    return "\n".join(lines)


def validate_config(cfg: Config) -> None:
    """Cross-field checks; each message names the key at fault."""

    need = requirer("config")

    cfg.model.validate()
    t = cfg.train
    need(bool(cfg.run.name) and "/" not in cfg.run.name, f"run.name must be a non-empty name without '/', got "
                                                         f"{cfg.run.name!r}")
    need(bool(cfg.run.storage_path), "run.storage_path must not be empty")
    need(t.steps > 0, f"train.steps must be > 0, got {t.steps}")
    need(t.micro_batch_size > 0, f"train.micro_batch_size must be > 0, got {t.micro_batch_size}")
    need(t.global_batch_size > 0, f"train.global_batch_size must be > 0, got {t.global_batch_size}")
    need(t.global_batch_size % t.micro_batch_size == 0,
         f"train.global_batch_size ({t.global_batch_size}) must be a multiple of train.micro_batch_size "
         f"({t.micro_batch_size})")
    need(t.seq_len > 1, f"train.seq_len must be > 1, got {t.seq_len}")
    need(bool(cfg.init.from_hf) or t.seq_len <= cfg.model.max_seq_len,  # an import's own limit: checked at set-up
         f"train.seq_len ({t.seq_len}) must be <= model.max_seq_len ({cfg.model.max_seq_len})")
    need(t.lr >= 0, f"train.lr must be >= 0 (0: a frozen run, the weights never move), got {t.lr}")
    need(0 <= t.min_lr_ratio <= 1, f"train.min_lr_ratio must be in [0, 1], got {t.min_lr_ratio}")
    need(0 <= t.warmup <= t.steps, f"train.warmup must be in [0, train.steps], got {t.warmup}")
    need(0 <= t.beta1 < 1 and 0 <= t.beta2 < 1, f"train.beta1/beta2 must be in [0, 1), got {t.beta1}, {t.beta2}")
    need(t.grad_clip >= 0, f"train.grad_clip must be >= 0, got {t.grad_clip}")
    need(t.precision in ("auto", "fp32", "bf16", "fp16"),
         f"train.precision must be auto, fp32, bf16 or fp16, got {t.precision!r}")
    need(0 <= t.fp16_initial_scale_power <= 64, f"train.fp16_initial_scale_power must be in [0, 64], got "
                                                f"{t.fp16_initial_scale_power}")
    need(t.fp16_loss_scale_window >= 1, f"train.fp16_loss_scale_window must be >= 1, got {t.fp16_loss_scale_window}")
    need(t.device in ("auto", "cpu", "cuda"), f"train.device must be auto, cpu or cuda, got {t.device!r}")
    need(t.log_interval > 0, f"train.log_interval must be > 0, got {t.log_interval}")
    need(t.eval_interval >= 0, f"train.eval_interval must be >= 0, got {t.eval_interval}")
    need(t.activation_checkpointing in ("none", "full", "selective"),
         f"train.activation_checkpointing must be none, full or selective, got {t.activation_checkpointing!r}")
    lora = cfg.lora
    need(lora.rank >= 1, f"lora.rank must be >= 1, got {lora.rank}")
    need(lora.alpha > 0, f"lora.alpha must be > 0, got {lora.alpha}")
    need(0 <= lora.dropout < 1, f"lora.dropout must be in [0, 1), got {lora.dropout}")
    try:
        parse_targets(lora.targets)
    except ValueError as e:
        need(False, str(e))
    d = cfg.data
    need(d.vocab_size >= 256 + 8, f"data.vocab_size must be >= 264 (256 bytes + special tokens), got {d.vocab_size}")
    need(cfg.model.vocab_size in (0, d.vocab_size),
         f"model.vocab_size ({cfg.model.vocab_size}) must be 0 or equal data.vocab_size ({d.vocab_size})")
    need(d.max_bytes >= 0, f"data.max_bytes must be >= 0, got {d.max_bytes}")
    need(0 <= d.val_fraction < 0.5, f"data.val_fraction must be in [0, 0.5), got {d.val_fraction}")
    formats = [f for fs in OBJECTIVES.values() for f in fs]
    need(d.format in formats, f"data.format must be {', '.join(formats[:-1])} or {formats[-1]}, got {d.format!r}")
    need(d.truncation in ("error", "truncate"), f"data.truncation must be error or truncate, got {d.truncation!r}")
    need(d.on_bad_row in ("error", "skip"), f"data.on_bad_row must be error or skip, got {d.on_bad_row!r}")
    need(bool(d.messages_column), "data.messages_column must not be empty")
    _validate_objective(cfg, need)
    p = cfg.parallel
    for name in ("dp", "tp", "pp", "ep"):
        need(getattr(p, name) >= 0, f"parallel.{name} must be >= 0 (0 = auto), got {getattr(p, name)}")
    need(p.zero_stage in (0, 1, 2), f"parallel.zero_stage must be 0, 1 or 2, got {p.zero_stage} (ZeRO-3 partitions "
                                     f"expert weights across data-parallel ranks without their expert groups, and "
                                     f"DeepSpeed refuses MoE under stage 3; see docs/operations.md)")
    c = cfg.checkpoint
    need(c.interval >= 0, f"checkpoint.interval must be >= 0, got {c.interval}")
    need(c.keep >= 1, f"checkpoint.keep must be >= 1, got {c.keep}")
    need(c.publish_keep >= 1, f"checkpoint.publish_keep must be >= 1, got {c.publish_keep}")
    f = cfg.failure
    need(f.max_failures >= -1, f"failure.max_failures must be >= -1, got {f.max_failures}")
    need(f.max_preemption_failures >= -1, f"failure.max_preemption_failures must be >= -1, got "
                                          f"{f.max_preemption_failures}")
    need(f.preemption_grace_s > 0, f"failure.preemption_grace_s must be > 0, got {f.preemption_grace_s}")
    need(f.preemption_check_steps >= 1, f"failure.preemption_check_steps must be >= 1, got {f.preemption_check_steps}")
    e = cfg.elastic
    need(e.min_workers >= 1, f"elastic.min_workers must be >= 1, got {e.min_workers}")
    need(e.max_workers >= e.min_workers,
         f"elastic.max_workers ({e.max_workers}) must be >= elastic.min_workers ({e.min_workers})")
    need(e.cpus_per_worker > 0, f"elastic.cpus_per_worker must be > 0, got {e.cpus_per_worker}")
    try:
        rank_cpu_sets(e.rank_cpus)
    except ValueError as err:
        need(False, str(err))
    need(not cfg.rollout.auto or bool(c.publish_to), "rollout.auto needs checkpoint.publish_to: the rollout serves "
                                                     "the version the run publishes to the model registry")
    need(all(x.strip().isdigit() for x in cfg.rollout.steps.split(",")),
         f"rollout.steps must be comma-separated whole percentages like 5,25,50,100, got {cfg.rollout.steps!r}")
    need(e.resize_interval_s >= 0, f"elastic.resize_interval_s must be >= 0, got {e.resize_interval_s}")
    need(e.resize_checkpoint_timeout_s > 0,
         f"elastic.resize_checkpoint_timeout_s must be > 0, got {e.resize_checkpoint_timeout_s}")


def _validate_objective(cfg: Config, need) -> None:
    """train.objective, the data it reads and, for dpo and grpo, their sections."""
    t, d, dpo = cfg.train, cfg.data, cfg.dpo
    need(t.objective in OBJECTIVES, f"train.objective must be lm, dpo or grpo, got {t.objective!r}")
    if t.objective == "dpo":
        need(d.format == "preference", f"train.objective = 'dpo' reads preference pairs: set data.format = "
                                       f"'preference' (got {d.format!r})")
    elif t.objective == "grpo":
        need(d.format == "prompts", f"train.objective = 'grpo' reads prompts: set data.format = 'prompts' (got "
                                    f"{d.format!r})")
    else:
        for objective in ("dpo", "grpo"):
            need(d.format not in OBJECTIVES[objective],
                 f"data.format = {d.format!r} is read by train.objective = {objective!r} only")
    _validate_grpo(cfg, need)
    need(dpo.beta > 0 and math.isfinite(dpo.beta), f"dpo.beta must be a positive number, got {dpo.beta}")
    need(dpo.loss_type in DPO_LOSS_TYPES, f"dpo.loss_type must be one of {', '.join(DPO_LOSS_TYPES)}, got "
                                          f"{dpo.loss_type!r}")
    need(0 <= dpo.label_smoothing < 0.5, f"dpo.label_smoothing must be in [0, 0.5), got {dpo.label_smoothing}")
    need(dpo.label_smoothing == 0 or dpo.loss_type == "sigmoid",
         f"dpo.label_smoothing applies to loss_type = 'sigmoid' only (conservative DPO), got "
         f"{dpo.label_smoothing} with loss_type = {dpo.loss_type!r}")
    need(bool(dpo.reference.strip()), "dpo.reference must be 'base' or a model directory, got an empty string")


def _validate_grpo(cfg: Config, need) -> None:
    g, t = cfg.grpo, cfg.train
    need(g.group_size >= 2, f"grpo.group_size must be >= 2 (advantages compare completions of one prompt), got "
                            f"{g.group_size}")
    need(g.max_new_tokens >= 1, f"grpo.max_new_tokens must be >= 1, got {g.max_new_tokens}")
    need(math.isfinite(g.temperature) and g.temperature > 0,
         f"grpo.temperature must be a number > 0 (the completions of a group must differ), got {g.temperature}")
    need(0 < g.top_p <= 1, f"grpo.top_p must be in (0, 1], got {g.top_p}")
    need(math.isfinite(g.clip_eps) and 0 < g.clip_eps < 1, f"grpo.clip_eps must be in (0, 1), got {g.clip_eps}")
    need(math.isfinite(g.kl_coef) and g.kl_coef >= 0, f"grpo.kl_coef must be a number >= 0, got {g.kl_coef}")
    need(bool(g.reference.strip()), "grpo.reference must be 'base' or a model directory, got an empty string")
    need(g.loss_agg in GRPO_LOSS_AGGS, f"grpo.loss_agg must be {' or '.join(GRPO_LOSS_AGGS)}, got {g.loss_agg!r}")
    need(g.rollout_workers >= 0, f"grpo.rollout_workers must be >= 0 (0: an engine inside rank 0), got "
                                 f"{g.rollout_workers}")
    need(g.rollout_device in ("auto", "cpu", "cuda"), f"grpo.rollout_device must be auto, cpu or cuda, got "
                                                      f"{g.rollout_device!r}")
    need(g.rollout_dtype in ("float32", "bfloat16"), f"grpo.rollout_dtype must be float32 or bfloat16, got "
                                                     f"{g.rollout_dtype!r}")
    need(g.rollout_timeout_s > 0, f"grpo.rollout_timeout_s must be > 0, got {g.rollout_timeout_s}")
    for check in (lambda: reward_specs(g.reward, g.reward_weights), lambda: resource_amounts(g.rollout_resources)):
        try:
            check()
        except ValueError as e:
            need(False, str(e))
    if t.objective != "grpo":
        return
    need(t.global_batch_size % g.group_size == 0,
         f"train.global_batch_size ({t.global_batch_size}) counts completions: it must be a multiple of "
         f"grpo.group_size ({g.group_size})")
    need(g.max_new_tokens < t.seq_len, f"grpo.max_new_tokens ({g.max_new_tokens}) must be below train.seq_len "
                                       f"({t.seq_len}): a prompt and its completion share seq_len + 1 tokens")
