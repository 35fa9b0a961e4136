"""Prediction-vs-label slices as markdown tables (TensorBoard text), from the predictions the model returns with
`return_predictions` (top-1 at every learnable target row of the micro-batch) and the batch they came from.

Each table opens with a line of counts over all the micro-batch's learnable targets of its modality: how often the
prediction equals the input it was made from (a model that copies its input shows ~100 % there) beside how often the
label does, and how often the prediction is right.

Text: rows spread evenly over the learnable text positions: the sample, the position j in it, the input token at j,
the label at j + 1, the top-1 prediction, hit, and whether the prediction equals the input.

Audio: rows spread over the trained audio-out segments, de-delayed: row t of a segment is its code t in every
codebook, which the delay pattern puts at stream frame t + k for codebook k, where it is predicted from the code
before it. So each row has all K codebooks learnable: the input is code t - 1 (stream bos at t = 0), the label code t
(stream eos at t = T, after the segment's T codes). The delay pattern's ramps (a segment's first and last K - 1
stream frames, where some codebooks hold bos/eos and their labels are -100) are not rows; the table's note says so.

Plus one whole sample with its learnable spans marked ⟦…⟧."""
from __future__ import annotations

import torch

from ..data.batch import IGNORE

TEXT_ROWS, AUDIO_ROWS = 16, 12


def _shifts(settings, num_codebooks: int) -> torch.Tensor:
    """How many frames late each codebook runs: k under the delay pattern, else 0."""
    if settings.use_delay_pattern:
        return torch.arange(num_codebooks)
    return torch.zeros(num_codebooks, dtype=torch.long)


def sample_of(positions: torch.Tensor, segment_ids: torch.Tensor, keys: list[str]) -> list[str]:
    """The sample key of each flat position (row-major segments, as Batch.sample_keys lists them)."""
    flat = segment_ids.flatten()
    starts = (flat > 0) & torch.cat([torch.tensor([True]), flat[1:] != flat[:-1]])
    starts.view(segment_ids.shape)[:, 0] |= flat.view(segment_ids.shape)[:, 0] > 0
    before = torch.cumsum(starts.long(), 0) - 1  # index of the sample each position belongs to
    return [keys[int(before[p])] if keys and flat[p] > 0 else "?" for p in positions.tolist()]


def spread(count: int, wanted: int) -> list[int]:
    """Up to `wanted` indices of range(count), evenly spaced from the first to the last."""
    if count <= wanted:
        return list(range(count))
    return torch.linspace(0, count - 1, wanted).round().long().tolist()


def _share(part: torch.Tensor, whole: int) -> str:
    return f"{int(part.sum()) / whole:.0%}"


def _counts(what: str, learnable: torch.Tensor, inputs, labels, predictions) -> str:
    """The header line: how often the prediction (and the label) equals the input, and the prediction the label."""
    n = int(learnable.sum())
    return (f"{n} learnable {what} in this micro-batch · **prediction = input: "
            f"{_share((predictions == inputs) & learnable, n)}** (labels = input: "
            f"{_share((labels == inputs) & learnable, n)}) · prediction = label: "
            f"{_share((predictions == labels) & learnable, n)}")


def _token(tokenizer, token_id: int) -> str:
    """A token as a table cell: spaces as ␣, line breaks and other unprintables escaped (\\n), | as \\|."""
    if token_id == IGNORE:
        return "-100 (not learnable)"
    text = tokenizer.decode([token_id]) if tokenizer is not None else f"#{token_id}"
    shown = ("\\|" if ch == "|" else "␣" if ch == " " else ch if ch.isprintable() else
             ch.encode("unicode_escape").decode() for ch in text)
    return "".join(shown) or "∅"


def text_table(p: dict, tokenizer=None) -> str:
    """Counts, then | sample | position j | input at j | label at j+1 | prediction | hit | copies input | at rows
    spread over the learnable text positions."""
    positions, labels, predicted = p["text_positions"], p["text_labels"], p["text_predictions"]
    if not len(positions):
        return "no learnable text in this micro-batch"
    inputs = p["input_ids"].flatten()[positions]
    lines = [_counts("text tokens", labels != IGNORE, inputs, labels, predicted), "",
             "| sample | position j | input at j | label at j+1 | prediction | hit | copies input |",
             "|---|---|---|---|---|---|---|"]
    rows = spread(len(positions), TEXT_ROWS)
    keys = sample_of(positions[rows], p["segment_ids"], p["sample_keys"])
    for key, n in zip(keys, rows):
        x, y, z = int(inputs[n]), int(labels[n]), int(predicted[n])
        hit = "" if y == IGNORE else "✓" if y == z else "✗"
        lines.append(f"| {key} | {int(p['position_ids'].flatten()[positions[n]])} | {_token(tokenizer, x)} | "
                     f"{_token(tokenizer, y)} | {_token(tokenizer, z)} | {hit} | {'copy' if z == x else ''} |")
    return "\n".join(lines)


def audio_rows(p: dict) -> list[tuple[int, int, int]]:
    """The de-delayed rows of the trained audio-out segments: (first stream frame s of the segment, code t, the
    segment's code count T) for each t in 0..T, in frame order. Codebook k's code t sits at stream frame s + t + shift_k
    (shift_k = k under the delay pattern), predicted there from the code before it (its label column is the next)."""
    settings, frames = p["audio_settings"], p["audio_frames"]
    k = p["audio_predictions"].shape[1]
    shift = _shifts(settings, k)
    labels = torch.full((int(p["audio_out_mask"].sum()), k), IGNORE, dtype=torch.long)
    labels[frames] = p["audio_labels"]
    # A segment starts where codebook 0 (never delayed) reads stream bos: one frame per segment.
    starts = frames[p["audio_inputs"][:, 0] == settings.stream_bos_id].tolist()
    out = []
    for n, s in enumerate(starts):
        end = starts[n + 1] if n + 1 < len(starts) else labels.shape[0]
        t = torch.arange(max(end - s - int(shift[-1]), 0))
        learnable = (labels[s + t[:, None] + shift, torch.arange(k)] != IGNORE).all(dim=1)
        # Rows 0..T: all codebooks learnable, up to the eos row. An unshifted loss moves every label one frame
        # (row 0 then falls on the delay ramp's -100s): its rows are still shown, so that the copying shows.
        rows = learnable.nonzero().squeeze(1).tolist()
        out += [(s, j, len(rows) - 1) for j in rows]
    return out


def audio_table(p: dict) -> str:
    """Counts, a note on reading the rows, then | sample | segment starts at | code t of T | input | label |
    prediction | hit | copies input | with the K codebooks' values side by side in each cell, at de-delayed rows
    spread over the trained audio-out segments."""
    settings, frames = p["audio_settings"], p["audio_frames"]
    if not len(frames):
        return "no learnable audio in this micro-batch"
    inputs, labels, predicted = p["audio_inputs"], p["audio_labels"], p["audio_predictions"]
    k = predicted.shape[1]
    column = torch.full((int(p["audio_out_mask"].sum()),), -1, dtype=torch.long)
    column[frames] = torch.arange(len(frames))  # the logged row of each stream frame
    shift = _shifts(settings, k)
    delay = (f"codebook k's code t sits at stream frame t+k (the delay pattern), so a segment's first and last "
             f"{k - 1} frames hold bos/eos in some codebooks, whose labels are -100 there; those ramp frames are not "
             "rows. " if settings.use_delay_pattern else "")
    lines = [_counts("audio codes", labels != IGNORE, inputs, labels, predicted), "",
             f"Rows are segment positions, all {k} codebooks learnable: {delay}input = the code before (bos at "
             f"t = 0), label = code t (eos at t = T, after the segment's T codes), codebooks 0…{k - 1} left to "
             "right. Audio-out segments that are not trained (before start_index) have no rows.", "",
             "| sample | segment starts at | code t of T | input | label | prediction | hit | copies input |",
             "|---|---|---|---|---|---|---|---|"]

    def code(value: int) -> str:
        return {settings.stream_bos_id: "bos", settings.stream_eos_id: "eos"}.get(value, str(value))

    rows = audio_rows(p)
    frame_positions = p["audio_out_mask"].flatten().nonzero().squeeze(1)
    picked = [rows[n] for n in spread(len(rows), AUDIO_ROWS)]
    keys = sample_of(frame_positions[[s for s, _, _ in picked]], p["segment_ids"], p["sample_keys"])
    for key, (s, t, total) in zip(keys, picked):
        logged = column[s + t + shift]
        x, y, z = (values[logged, torch.arange(k)] for values in (inputs, labels, predicted))
        cells = [" ".join(code(int(v)) for v in values) for values in (x, y, z)]
        hits = "".join("✓" if a == b else "✗" for a, b in zip(y.tolist(), z.tolist()))
        segment_at = int(p["position_ids"].flatten()[frame_positions[s]])
        lines.append(f"| {key} | {segment_at} | {t} of {total} | {' | '.join(cells)} | {hits} | "
                     f"{int((z == x).sum())}/{k} |")
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
