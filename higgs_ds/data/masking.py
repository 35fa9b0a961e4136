"""Who learns what: the role (system/user/assistant/...) and modality of every token of a sample, and the masking
summary (positions and learnable labels per role and modality) that `shard_tools inspect` and the trainer's
preflight print."""
from __future__ import annotations

from collections import Counter

from .batch import IGNORE
from .sample import TokenizedSample
from .tokens import AudioSettings, SpecialTokens


def token_roles(sample: TokenizedSample, tokens: SpecialTokens, tokenizer=None) -> list[str]:
    """The role of each token: from its turn's <|start_header_id|>role<|end_header_id|> header."""
    ids = sample.input_ids.tolist()
    roles, role, i = [], None, 0
    headers = []  # (start, role)
    while i < len(ids):
        if ids[i] == tokens.start_header and tokens.end_header in ids[i:]:
            end = ids.index(tokens.end_header, i)
            name = ids[i + 1:end]
            headers.append((i, tokenizer.decode(name).strip() if tokenizer else "ids:" + ",".join(map(str, name))))
            i = end
        i += 1
    for i in range(len(ids)):
        while headers and headers[0][0] <= i:
            role = headers.pop(0)[1]
        roles.append(role)
    first = next((r for r in roles if r is not None), "?")
    return [r if r is not None else first for r in roles]  # the <|begin_of_text|> before the first header


def mask_stats(sample: TokenizedSample, tokens: SpecialTokens, audio: AudioSettings, tokenizer=None) -> Counter:
    """{(role, modality, "positions" | "learnable"): n}. Audio positions are expanded frames; learnable audio
    counts labels (codebooks × (T + 1) per trained audio-out segment), as in the manifest."""
    stats: Counter = Counter()
    segments = iter(sample.audio_codes)
    for token, label, role in zip(sample.input_ids.tolist(), sample.label_ids.tolist(),
                                  token_roles(sample, tokens, tokenizer)):
        if token in (tokens.audio_in, tokens.audio_out):
            frames = next(segments).shape[1]
            modality = "audio-out" if token == tokens.audio_out else "audio-in"
            stats[role, modality, "positions"] += audio.frames(frames)
            trained = modality == "audio-out" and label != IGNORE
            stats[role, modality, "learnable"] += audio.num_codebooks * (frames + 1) if trained else 0
        else:
            stats[role, "text", "positions"] += 1
            stats[role, "text", "learnable"] += label != IGNORE
    return stats


def masking_rows(stats: Counter) -> list[tuple[str, str, str, str]]:
    """(role, modality, positions, learnable) rows of a mask_stats Counter, sorted."""
    return [(role, modality, str(stats[role, modality, "positions"]), str(stats[role, modality, "learnable"]))
            for role, modality in sorted({(r, m) for r, m, _ in stats})]


def table(header: tuple[str, ...], rows: list[tuple[str, ...]], right: tuple[int, ...] = ()) -> str:
    """Columns as wide as their widest cell, two spaces apart; the columns in `right` right-aligned."""
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    return "\n".join("  ".join(cell.rjust(w) if i in right else cell.ljust(w)
                               for i, (cell, w) in enumerate(zip(row, widths))).rstrip()
                     for row in (header, *rows))


def split_masking(manifest, max_samples: int = 500, tokenizer=None) -> tuple[Counter, int]:
    """mask_stats summed over the first `max_samples` readable samples of a split (manifest order), and how many."""
    from .shards import ShardError, decode_sample, read_shard

    stats: Counter = Counter()
    read = 0
    for info in manifest.shards:
        try:
            for raw in read_shard(manifest.shard_path(info)):
                try:
                    sample = decode_sample(raw, manifest.tokens, manifest.audio, manifest.vocab_size)
                except ShardError:
                    continue  # counted by the stream when training reads it
                stats += mask_stats(sample, manifest.tokens, manifest.audio, tokenizer)
                read += 1
                if read >= max_samples:
                    return stats, read
        except ShardError:
            continue
    return stats, read


def learnable_share_rows(stats: Counter, num_codebooks: int) -> list[tuple[str, ...]]:
    """masking_rows with the learnable share of each row's labels (audio: a label per frame and codebook)."""
    out = []
    for role, modality, positions, learnable in masking_rows(stats):
        labels = int(positions) * (num_codebooks if modality.startswith("audio") else 1)
        share = int(learnable) / labels if labels else 0.0
        out.append((role, modality, positions, learnable, f"{share:.1%}"))
    return out
