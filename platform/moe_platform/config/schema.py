"""The one configuration tree. Every field carries a one-line doc; jobs/configs/*.toml mirror it section by section."""

from __future__ import annotations

from dataclasses import dataclass, field

from moe_platform.model.args import ModelArgs


def _f(default, doc: str, **meta):
    return field(default=default, metadata={"doc": doc, **meta})


@dataclass
class RunConfig:
    name: str = _f("tiny", "run name; the run's files live in <storage_path>/<name>/")
    storage_path: str = _f("./runs", "local directory or pyarrow filesystem URI (s3://, gs://, file://)")
    local_dir: str = _f("", "with a URI storage_path, the node-local mirror the run works in is <local_dir>/<name> "
                            "(empty: ~/.cache/moe-platform/runs/<hash of the URI>; {rank} makes one per rank)")


@dataclass
class DataConfig:
    path: str = _f("", "text file, folder of text files, or parquet file/folder; empty uses the Python stdlib sources")
    text_column: str = _f("text", "column holding the text when the corpus is parquet")
    vocab_size: int = _f(4096, "size of the byte-level BPE vocabulary trained on the corpus")
    max_bytes: int = _f(8_000_000, "text data: read at most this many bytes of corpus text (0 = no limit)")
    cache_dir: str = _f("", "where tokenized corpora are cached; empty means ~/.cache/moe-platform")
    val_fraction: float = _f(0.01, "fraction of samples held out for validation loss")
    format: str = _f("text", "text (raw text: pretraining or continued pretraining), chat (JSONL or parquet rows of "
                             "OpenAI-style messages, rendered with the model's chat template; loss on assistant "
                             "tokens only) or preference (rows of {prompt, chosen, rejected} messages, or chosen and "
                             "rejected conversations sharing their prompt, for train.objective = 'dpo'; one sequence "
                             "per row, only response tokens count) or prompts (rows with a prompt, messages or text, "
                             "plus the fields the reward functions read, for train.objective = 'grpo')")
    messages_column: str = _f("messages", "chat data: the key (JSONL) or column (parquet) holding a row's messages")
    packing: bool = _f(True, "chat data: pack whole conversations into each sequence, each attending only to itself "
                             "(false: one conversation per sequence, padded)")
    truncation: str = _f("error", "chat and preference data: a conversation longer than train.seq_len+1 tokens is "
                                  "a bad row (error) or is cut to fit (truncate; a preference pair whose prompt "
                                  "leaves no response token is still a bad row)")
    on_bad_row: str = _f("error", "chat and preference data: a bad row (not JSON, no messages, an unknown role, no "
                                  "chosen or rejected response, an empty response, too long) stops with its file and "
                                  "line (error) or is skipped and counted (skip)")


@dataclass
class TrainConfig:
    steps: int = _f(200, "optimizer steps to run")
    objective: str = _f("lm", "lm (next-token prediction), dpo (direct preference optimisation of an imported model "
                              "on data.format = 'preference' rows, set up in [dpo]) or grpo (online RL of an imported "
                              "model on data.format = 'prompts' rows: rollouts from the serving engine, set up in "
                              "[grpo])")
    global_batch_size: int = _f(16, "sequences per optimizer step, across all data-parallel ranks (dpo: preference "
                                    "pairs, two sequences each; grpo: completions, grpo.group_size per prompt)")
    micro_batch_size: int = _f(4, "sequences per forward/backward pass on one rank (dpo: preference pairs; a pair's "
                                  "chosen and rejected sequences are always in the same micro-batch; grpo: "
                                  "completions)")
    seq_len: int = _f(128, "tokens per training sequence")
    lr: float = _f(3e-3, "peak learning rate; 0: a frozen run (the weights stay as loaded: an import/export check)")
    min_lr_ratio: float = _f(0.1, "final learning rate as a fraction of lr (cosine decay)")
    warmup: int = _f(20, "linear warmup steps")
    weight_decay: float = _f(0.1, "AdamW weight decay (not applied to norms, biases and router bias)")
    beta1: float = _f(0.9, "AdamW beta1")
    beta2: float = _f(0.95, "AdamW beta2")
    grad_clip: float = _f(1.0, "clip the global gradient norm to this value (0 disables)")
    seed: int = _f(1234, "seed for initialisation, data order and sampling")
    precision: str = _f("auto", "auto (bf16 on GPU, fp32 on CPU), fp32, bf16, or fp16 (with dynamic loss scaling: "
                                "overflow steps are skipped and counted)")
    fp16_initial_scale_power: int = _f(16, "fp16: the loss scale starts at 2**this; it halves on each overflow and "
                                           "doubles after fp16_loss_scale_window clean steps")
    fp16_loss_scale_window: int = _f(1000, "fp16: clean steps before the loss scale doubles")
    device: str = _f("auto", "auto, cpu or cuda")
    deterministic: bool = _f(True, "deterministic kernels (bitwise-reproducible runs on CPU)")
    log_interval: int = _f(1, "steps between metrics.jsonl lines")
    eval_interval: int = _f(0, "steps between validation-loss evaluations (0 = only at the end)")
    log_sample_ids: bool = _f(False, "record the sample ids of every step in metrics.jsonl (resume audits)")
    activation_checkpointing: str = _f("none", "none, full (recompute each decoder layer in backward) or selective "
                                               "(recompute attention and the expert MLPs, keep the router)")


@dataclass
class ParallelConfig:
    dp: int = _f(1, "data-parallel degree (0 = choose automatically)")
    tp: int = _f(1, "tensor-parallel degree (0 = choose automatically)")
    pp: int = _f(1, "pipeline-parallel degree (0 = choose automatically)")
    ep: int = _f(1, "expert-parallel degree, drawn from the data-parallel ranks (0 = choose automatically)")
    zero_stage: int = _f(1, "DeepSpeed ZeRO stage for the data-parallel dimension (0, 1 or 2)")


@dataclass
class CheckpointConfig:
    interval: int = _f(50, "steps between checkpoints (0 = only at the end)")
    keep: int = _f(3, "committed checkpoints to keep (older ones are deleted)")
    async_save: bool = _f(True, "write checkpoints in the background after a host-memory snapshot")
    export: bool = _f(True, "write a Hugging Face export to <run>/export at the end")
    publish_to: str = _f("", "also publish the final export to the object-store model registry under this name")
    publish_keep: int = _f(3, "versions of the published model the registry keeps (older ones are freed)")


@dataclass
class FailureConfig:
    max_failures: int = _f(3, "worker-group failures tolerated before the job fails (-1 = unlimited)")
    max_preemption_failures: int = _f(-1, "preemptions tolerated (-1 = unlimited)")
    preemption_grace_s: float = _f(30.0, "seconds a preempted node has to write a just-in-time checkpoint")
    preemption_check_steps: int = _f(1, "steps between checks for a preemption notice (each is a tiny collective)")


@dataclass
class ElasticConfig:
    min_workers: int = _f(1, "fewest training workers the job runs on")
    max_workers: int = _f(1, "most training workers the job asks for")
    use_gpu: bool = _f(False, "give each worker one GPU")
    cpus_per_worker: float = _f(1.0, "CPUs reserved per training worker")
    rank_cpus: str = _f("", "cores each training rank is pinned to, by local rank, ';' between ranks (taskset's "
                            "list form: '2-7;8-13' puts local rank 0 on cores 2-7 and local rank 1 on 8-13); every "
                            "thread of the rank moves there and torch uses that many threads. On a GPU node, leave "
                            "the other cores to Ray's daemons and actors. Empty: the OS places the ranks")
    resize_interval_s: float = _f(60.0, "seconds between Ray Train's checks for more (or less) capacity to resize into")
    resize_checkpoint_timeout_s: float = _f(120.0, "longest a resize waits for the running workers' checkpoint")


@dataclass
class InitConfig:
    from_hf: str = _f("", "Hugging Face model directory to start from (Mixtral, Qwen3-MoE, Qwen2-MoE, OLMoE, "
                          "DeepSeek-V3/V2, GLM-4.5 MoE, gpt-oss): its "
                          "architecture replaces [model], its tokenizer is used as it is (none is trained) and its "
                          "weights are the starting point; empty trains from scratch")


@dataclass
class LoRAConfig:
    enabled: bool = _f(False, "train low-rank adapters instead of every weight: the base weights are frozen and hold "
                              "no optimizer state")
    rank: int = _f(16, "rank r of each adapter (A: r x in, B: out x r)")
    alpha: float = _f(32.0, "the adapters' output is scaled by alpha / rank")
    dropout: float = _f(0.0, "dropout on the input of the attention and shared-expert adapters (0 = none)")
    targets: str = _f("attention", "comma-separated: attention (every attention projection of the model), or some of "
                                   "q_proj, k_proj, v_proj, o_proj (grouped-query attention), q_proj or q_a_proj and "
                                   "q_b_proj, kv_a_proj_with_mqa, kv_b_proj, o_proj (latent attention); experts (each "
                                   "routed expert's gate/up and down, stacked like the experts), shared_experts, "
                                   "dense_mlp (the MLP of dense layers)")


@dataclass
class DPOConfig:
    beta: float = _f(0.1, "how far the policy may move from the reference: the implicit reward of a response is beta "
                          "times its log-probability ratio, policy over reference")
    loss_type: str = _f("sigmoid", "sigmoid (the DPO paper's -log sigmoid of the reward margin), ipo (squared "
                                   "distance of the per-token log-ratio margin from 1/(2 beta)) or hinge (relu(1 - "
                                   "margin)), as TRL's DPOTrainer defines them")
    label_smoothing: float = _f(0.0, "sigmoid only: the assumed probability in [0, 0.5) that a pair's preference is "
                                     "flipped (conservative DPO: (1 - p) * loss(pair) + p * loss(reversed pair))")
    reference: str = _f("base", "the reference policy: base (the starting model, init.from_hf: with LoRA the same "
                                "weights with the adapters switched off, no second copy; without LoRA a frozen copy "
                                "sharded like the policy) or a model directory of the same architecture")


@dataclass
class GRPOConfig:
    group_size: int = _f(8, "completions sampled per prompt; each one's advantage is its reward's distance from the "
                            "group's mean in the group's standard deviations (0 where every reward is equal)")
    max_new_tokens: int = _f(64, "tokens a completion may have at most (a prompt may have train.seq_len + 1 - "
                                 "max_new_tokens)")
    temperature: float = _f(1.0, "sampling temperature of the rollouts; the learner's log-probabilities are of the "
                                 "same tempered distribution")
    top_p: float = _f(1.0, "nucleus sampling of the rollouts: keep the smallest set of tokens with this mass")
    clip_eps: float = _f(0.2, "the probability ratio, policy over the one that sampled, is clipped to [1 - clip_eps, "
                              "1 + clip_eps] (PPO's clipped objective)")
    kl_coef: float = _f(0.0, "weight of the KL penalty against the reference policy (k3 estimator per token); 0: no "
                             "reference pass")
    reference: str = _f("base", "the reference policy of the KL penalty, as dpo.reference: base (with LoRA the "
                                "same weights with the adapters off; else a frozen copy) or a model directory")
    loss_agg: str = _f("token_mean", "token_mean (every completion token of the step weighs the same) or seq_mean "
                                     "(each completion's token mean, averaged over completions)")
    reward: str = _f("moe_platform.rewards:exact_match", "reward function 'module:function' taking (row, completion "
                                                         "text) and returning a number; several (a list, or "
                                                         "comma-separated) are summed with reward_weights",
                     compound=True)
    reward_weights: str = _f("", "one weight per reward function (a list, or comma-separated); empty: all 1",
                             compound=True)
    rollout_workers: int = _f(1, "rollout engines, each a Ray actor holding our serving engine, placed beside the "
                                 "learner's rank 0; 0: one engine inside rank 0's own process (no Ray needed)")
    rollout_resources: str = _f("CPU=1", "Ray resources of each rollout worker, NAME=amount (a table, or "
                                         "comma-separated): CPU, GPU, or a custom resource", compound=True)
    rollout_device: str = _f("auto", "the rollout engines' device: auto (cuda when the worker sees one), cpu or cuda")
    rollout_dtype: str = _f("float32", "the rollout engines' weights and KV cache: float32 or bfloat16")
    rollout_timeout_s: float = _f(600.0, "longest a rollout worker may take to start or to answer a generation "
                                         "round before it is replaced")


@dataclass
class RolloutConfig:
    auto: bool = _f(False, "when the run ends, roll its published version (checkpoint.publish_to) out to a running "
                           "Serve app as a canary: it loads from the registry and takes traffic step by step while "
                           "its gates hold")
    app: str = _f("moe-platform", "the Serve application to roll out to")
    steps: str = _f("5,25,50,100", "canary percent per step, comma-separated, ending at 100")
    dwell: str = _f("10m", "how long each step holds, e.g. 30s, 10m, 1h")
    blue_green: bool = _f(False, "switch all traffic at once once the version is loaded and healthy everywhere")
    probe_file: str = _f("", "held-out texts (blank-line separated) for the quality gate; empty: no quality gate")
    max_loss_increase: float = _f(0.1, "quality gate: mean loss above the stable version's allowed (nats/token)")


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig, metadata={"doc": "run identity and storage"})
    init: InitConfig = field(default_factory=InitConfig, metadata={"doc": "where the weights start"})
    model: ModelArgs = field(default_factory=ModelArgs, metadata={"doc": "model architecture"})
    lora: LoRAConfig = field(default_factory=LoRAConfig, metadata={"doc": "low-rank adapters (LoRA)"})
    dpo: DPOConfig = field(default_factory=DPOConfig, metadata={"doc": "preference optimisation (train.objective = "
                                                                       "'dpo')"})
    grpo: GRPOConfig = field(default_factory=GRPOConfig, metadata={"doc": "online RL with group-relative advantages "
                                                                          "(train.objective = 'grpo')"})
    data: DataConfig = field(default_factory=DataConfig, metadata={"doc": "corpus and tokenizer"})
    train: TrainConfig = field(default_factory=TrainConfig, metadata={"doc": "optimisation"})
    parallel: ParallelConfig = field(default_factory=ParallelConfig, metadata={"doc": "parallel layout"})
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig, metadata={"doc": "checkpointing"})
    failure: FailureConfig = field(default_factory=FailureConfig, metadata={"doc": "failure budgets"})
    elastic: ElasticConfig = field(default_factory=ElasticConfig, metadata={"doc": "worker count range"})
    rollout: RolloutConfig = field(default_factory=RolloutConfig, metadata={"doc": "rollout of the published "
                                                                                   "version to serving"})
