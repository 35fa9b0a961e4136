"""Rank-0 hooks: they receive the engine's all-reduced step values (base.StepReport) and never reach back
into the engine, the model or the data."""
from .base import Hooks, StepHook, StepReport, StopRequest
from .guards import CollapseGuard
from .tensorboard import TensorBoardHook

__all__ = ["CollapseGuard", "Hooks", "StepHook", "StepReport", "StopRequest", "TensorBoardHook"]
