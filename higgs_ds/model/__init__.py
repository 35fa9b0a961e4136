"""Model: DualFFN Higgs Audio v2, its checkpoint layouts, shifted per-modality losses. Knows no engine or logging."""
from .checkpoint import load_model, read_config, read_port_state_dict, save_checkpoint
from .losses import LearnableCounts, LossConfig, LossNorm, learnable_counts, loss_means
from .modeling import HiggsAudioForTraining, HiggsAudioLogits, HiggsAudioOutput

__all__ = ["HiggsAudioForTraining", "HiggsAudioLogits", "HiggsAudioOutput", "LearnableCounts", "LossConfig",
           "LossNorm", "learnable_counts", "load_model", "loss_means", "read_config", "read_port_state_dict",
           "save_checkpoint"]
