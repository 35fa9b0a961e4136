"""Engine: run configs, preflight, the DeepSpeed ZeRO model and step loop, crash-safe checkpoints, export,
evaluation. Imports data/, model/ and hooks/; nothing imports it back."""
from ..hooks.base import StepHook, StepReport, StopRequest
from .config import RunConfig, RunConfigError, load_config
from .runtime import main, run
from .trainer import Trainer

__all__ = ["RunConfig", "RunConfigError", "StepHook", "StepReport", "StopRequest", "Trainer", "load_config", "main",
           "run"]
