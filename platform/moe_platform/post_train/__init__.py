"""Objectives beyond next-token prediction, built on the trainer (moe_platform.train): DPO (`DPOTrainer`, with
preference data, a reference policy that is the base model with its adapters off, and TRL's losses).

Launchers run the trainer of a config's objective: `trainer_class(cfg.train.objective)`, passed as `trainer_cls`
to `moe_platform.train.launch.launch_local` or `moe_platform.train.ray_launcher.launch_ray`.
"""

from moe_platform.post_train.dpo_trainer import DPOTrainer, trainer_class

__all__ = ["DPOTrainer", "trainer_class"]
