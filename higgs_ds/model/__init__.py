"""Model: DualFFN Higgs Audio v2, its checkpoint layouts, shifted per-modality losses. Knows no engine or logging."""
from ..model_config import HiggsModelConfig, read_model_config
from .checkpoint import load_model, read_port_state_dict, save_checkpoint
from .losses import LearnableCounts, LossConfig, LossNorm, learnable_counts, loss_means
from .modeling import HiggsAudioForTraining, HiggsAudioLogits, HiggsAudioOutput

__all__ = ["HiggsAudioForTraining", "HiggsAudioLogits", "HiggsAudioOutput", "HiggsModelConfig", "LearnableCounts",
           "LossConfig", "LossNorm", "learnable_counts", "load_model", "loss_means", "read_model_config",
           "read_port_state_dict", "save_checkpoint"]
