"""Writes tests/assets/tiny_tokenizer/: a small byte-level BPE with Llama-3-style special tokens.

Its ids differ from the real Llama-3 ids on purpose: code that hard-codes 1280xx fails the tests.
Run once (in either venv) and commit the output; the reference-golden scripts load the same files.
"""
import sys
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

SPECIALS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
    "<|eot_id|>", "<|eom_id|>", "<|recipient|>",
    "<|audio_bos|>", "<|audio_eos|>", "<|audio_out_bos|>", "<|audio_delay|>", "<|AUDIO|>", "<|AUDIO_OUT|>",
]
CORPUS = [
    "The quick brown fox jumps over the lazy dog.", "Hello world, this is a tiny tokenizer for tests.",
    "system user assistant scene", "Generate audio following instruction.", "Please read the text aloud.",
    "0123456789 ,.;:!?'\"()[]{}-_/\\\n\t", "Speak in a calm voice. Transcribe this clip.",
]


def main(out: Path) -> None:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    tok.add_special_tokens(SPECIALS)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>",
                                   eos_token="<|eot_id|>", pad_token="<|end_of_text|>")
    fast.save_pretrained(str(out))


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "tiny_tokenizer")
