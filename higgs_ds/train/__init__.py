"""Engine: run configs, DeepSpeed ZeRO training loop, crash-safe checkpoints, export. Imports data/ and model/."""
from .config import RunConfig, RunConfigError, load_config
from .trainer import StepHook, StepReport, Trainer, main, run

__all__ = ["RunConfig", "RunConfigError", "StepHook", "StepReport", "Trainer", "load_config", "main", "run"]
