"""Prediction-vs-label slices as markdown tables (TensorBoard text), from the rows the model logs with
`return_predictions` (the first and last learnable rows of the batch): only learnable positions, never prompts or
padding. Text: the sample, the position, the label token and the top-1 prediction. Audio: for each logged frame and
codebook the input code, the label and the prediction (stream bos/eos and the delay pattern's -100 show at a
segment's first and last frames). Plus one whole sample with its learnable spans marked ⟦…⟧."""
from __future__ import annotations

import torch

from ..data.batch import IGNORE


def sample_of(positions: torch.Tensor, segment_ids: torch.Tensor, keys: list[str]) -> list[str]:
    """The sample key of each flat position (row-major segments, as Batch.sample_keys lists them)."""
    flat = segment_ids.flatten()
    starts = (flat > 0) & torch.cat([torch.tensor([True]), flat[1:] != flat[:-1]])
    starts.view(segment_ids.shape)[:, 0] |= flat.view(segment_ids.shape)[:, 0] > 0
    before = torch.cumsum(starts.long(), 0) - 1  # index of the sample each position belongs to
    return [keys[int(before[p])] if keys and flat[p] > 0 else "?" for p in positions.tolist()]


def _token(tokenizer, token_id: int) -> str:
    if token_id < 0:  # -100: not learnable (only a planted unshifted loss logs such targets)
        return str(token_id)
    text = tokenizer.decode([token_id]) if tokenizer is not None else f"#{token_id}"
    return text.replace("|", "\\|").replace("\n", "\\n") or "∅"


def text_table(p: dict, tokenizer=None) -> str:
    """| sample | position | label | prediction | hit | at each logged learnable text row."""
    seq_len = p["input_ids"].shape[1]
    positions = p["text_positions"]
    keys = sample_of(positions + 1, p["segment_ids"], p["sample_keys"])  # the label sits at t + 1
    lines = ["| sample | row, column | label | prediction | hit |", "|---|---|---|---|---|"]
    for key, position, label, predicted in zip(keys, positions.tolist(), p["text_labels"].tolist(),
                                               p["text_predictions"].tolist()):
        row, column = divmod(position + 1, seq_len)
        lines.append(f"| {key} | {row}, {column} | {_token(tokenizer, label)} | {_token(tokenizer, predicted)} | "
                     f"{'✓' if label == predicted else '✗'} |")
    return "\n".join(lines)


def audio_table(p: dict) -> str:
    """| sample | frame | codebook | input | label | prediction | hit | for each logged audio-out frame."""
    frame_positions = p["audio_out_mask"].flatten().nonzero().squeeze(1)
    frames = p["audio_frames"]
    keys = sample_of(frame_positions[frames], p["segment_ids"], p["sample_keys"])
    lines = ["| sample | frame j → j+1 | codebook | input at j | label | prediction | hit |",
             "|---|---|---|---|---|---|---|"]
    for key, frame, inputs, labels, predicted in zip(keys, frames.tolist(), p["audio_inputs"].tolist(),
                                                     p["audio_labels"].tolist(), p["audio_predictions"].tolist()):
        for k, (x, y, z) in enumerate(zip(inputs, labels, predicted)):
            hit = "" if y == IGNORE else ("✓" if y == z else "✗")
            lines.append(f"| {key} | {frame} | {k} | {x} | {'-100' if y == IGNORE else y} | {z} | {hit} |")
    return "\n".join(lines)


def marked_sample(p: dict, tokenizer=None) -> str:
    """The first sample of the batch as text, learnable tokens inside ⟦…⟧, each audio-out run as <audio-out ×T>."""
    segments, ids, labels = p["segment_ids"][0], p["input_ids"][0], p["label_ids"][0]
    audio = p["audio_out_mask"][0]
    keep = segments == 1
    out, run, learnable_run = [], [], None

    def close():
        if run:
            text = "".join(_token(tokenizer, t) for t in run) if tokenizer is None else tokenizer.decode(run)
            out.append(f"⟦{text}⟧" if learnable_run else text)
            run.clear()

    column, length = 0, int(keep.sum())
    while column < length:
        if audio[column]:
            close()
            end = column
            while end < length and audio[end]:
                end += 1
            out.append(f"<audio-out ×{end - column}>")
            column = end
            continue
        learnable = bool(labels[column] != IGNORE)
        if run and learnable != learnable_run:
            close()
        learnable_run = learnable
        run.append(int(ids[column]))
        column += 1
    close()
    key = p["sample_keys"][0] if p["sample_keys"] else "?"
    return f"sample {key}:\n\n```\n{''.join(out)}\n```"
