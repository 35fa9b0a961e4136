"""Rank-0 hooks: they receive the engine's all-reduced step values (higgs_ds.train.StepReport) and never reach back
into the engine, the model or the data."""
from .guards import CollapseGuard
from .tensorboard import TensorBoardHook

__all__ = ["CollapseGuard", "TensorBoardHook"]
