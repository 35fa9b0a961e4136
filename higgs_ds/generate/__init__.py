"""Generation from a training model: prompts (ChatML up to the assistant turn) → text and audio codes, with a KV
cache, batched, and in lockstep across ZeRO-3 ranks (docs/generate.md)."""
from .decode import STOPS, Generation, SamplingConfig, generate
from .delay import revert_delay
from .prompts import Prompt, build_prompt

__all__ = ["STOPS", "Generation", "Prompt", "SamplingConfig", "build_prompt", "generate", "revert_delay"]
