"""Objectives beyond next-token prediction, built on the trainer (moe_platform.train): DPO (`DPOTrainer`, with
preference data, a reference policy that is the base model with its adapters off, and TRL's losses) and GRPO
(`GRPOTrainer`, online RL: rollouts from our serving engine in Ray actors, reward functions, group advantages, the
clipped objective, and the new weights synced to the engines through the object store after every step).

Launchers run the trainer of a config's objective: `trainer_class(cfg.train.objective)`, passed as `trainer_cls`
to `moe_platform.train.launch.launch_local` or `moe_platform.train.ray_launcher.launch_ray`. post_train sits above
serving in the layering (its rollouts run the serving engine); nothing below it imports it.
"""

from moe_platform.post_train.dpo_trainer import DPOTrainer, trainer_class
from moe_platform.post_train.grpo_trainer import GRPOTrainer

__all__ = ["DPOTrainer", "GRPOTrainer", "trainer_class"]
