"""Generation: continue the assistant turn of each prompt with text and audio, as upstream boson-multimodal does.

One step feeds one position per prompt: a text token, or an audio frame (8 codes, summed embeddings). The mode
follows the last fed input, as in upstream's `HiggsAudioModel._sample`:
  * text: the text head picks the next token; `<|eot_id|>` or `<|end_of_text|>` ends the turn (stop "eos").
  * `<|audio_out_bos|>` fed: the next column is all stream-bos (not sampled) and `<|AUDIO_OUT|>` is written.
  * audio frame fed: the audio head picks 8 codes, then the delay pattern is imposed: while the ramp is rising,
    codebooks after the step count are stream-bos; once a codebook first emits stream-eos (the first such codebook
    c), codebooks 0..c become eos and every later column extends eos by one codebook; the column where the ramp
    completes is the segment's last (it is not fed back: `<|audio_eos|>` is fed next, as upstream does).
    transformers' port ramps from codebook 0 instead; the two agree whenever codebook 0 ends first (docs/generate.md).
Budgets: `max_frames` audio frames per turn (de-delayed: a segment's K + 1 ramp columns are not frames; stop
"max_frames"), `max_text_tokens` text tokens outside audio.

Rows are batched with left padding (per-row positions, a 4-D mask) and a KV cache (transformers' DynamicCache on
the port's attention modules). Sampling draws from one generator per prompt, seeded by (seed, prompt id), so a
prompt's output does not depend on its batch, its rank or the other prompts.

With `lockstep=True` (ZeRO-3: every forward is a collective), all ranks run the same number of forwards: a rank
with nothing left runs a one-token dummy forward through every module until no rank has work."""
from __future__ import annotations

import contextlib
import time
import zlib
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from transformers import DynamicCache
from transformers.generation.logits_process import (LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper,
                                                    TopPLogitsWarper)

from ..data.tokens import AudioSettings, SpecialTokens
from .delay import frames_in, revert_delay
from .prompts import Prompt

STOPS = ("eos", "max_frames", "max_text_tokens")


@dataclass
class SamplingConfig:
    do_sample: bool = False  # False: greedy (argmax)
    temperature: float = 1.0
    top_k: int = 0  # 0: off (transformers' GenerationConfig defaults to 50: pass it to compare with upstream)
    top_p: float = 1.0
    seed: int = 0
    max_frames: int = 1500  # audio frames per turn (60 s at 25 frames/s)
    max_text_tokens: int = 256  # text tokens per turn, outside audio

    def __post_init__(self):
        for name in ("top_k", "seed", "max_frames", "max_text_tokens"):
            if type(getattr(self, name)) is not int:
                raise ValueError(f"sampling: {name} must be an int, got {getattr(self, name)!r}")
        if not self.temperature > 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError(f"sampling: need temperature > 0, 0 < top_p <= 1, top_k >= 0; got temperature "
                             f"{self.temperature}, top_p {self.top_p}, top_k {self.top_k}")
        if self.max_frames < 1 or self.max_text_tokens < 1:
            raise ValueError(f"sampling: max_frames and max_text_tokens must be >= 1, got {self.max_frames} and "
                             f"{self.max_text_tokens}")

    def warpers(self) -> LogitsProcessorList:
        """transformers' own warpers, in its order (temperature, top-k, top-p); rows are prompts or codebooks."""
        out = LogitsProcessorList()
        if self.temperature != 1.0:
            out.append(TemperatureLogitsWarper(self.temperature))
        if self.top_k:
            out.append(TopKLogitsWarper(self.top_k))
        if self.top_p < 1.0:
            out.append(TopPLogitsWarper(self.top_p))
        return out


@dataclass
class Generation:
    id: str
    text_ids: list[int]  # the turn's text stream: one <|AUDIO_OUT|> per audio segment, as upstream writes it
    segments: list[torch.Tensor]  # delayed codes [K, n] per audio segment (column 0 all stream-bos), on the CPU
    codes: np.ndarray  # int64 [K, T]: every segment's frames, de-delayed and concatenated
    stop: str  # one of STOPS
    steps: int  # forwards this prompt took part in (prefill included)
    seconds: float  # from its batch's start to its end

    @property
    def frames(self) -> int:
        return int(self.codes.shape[1])

    @property
    def columns(self) -> int:
        """Audio columns generated (delayed: frames + K + 1 per closed segment)."""
        return sum(int(s.shape[1]) for s in self.segments)


def prompt_seed(seed: int, prompt_id: str) -> int:
    """A prompt's own sampling seed: the same whatever batch or rank the prompt lands in."""
    return (seed * 1_000_003 + zlib.crc32(prompt_id.encode())) % 2**63


@dataclass
class _Row:
    prompt: Prompt
    generator: torch.Generator | None
    started: float
    text_ids: list[int] = field(default_factory=list)
    segments: list[list[torch.Tensor]] = field(default_factory=list)
    history: list[tuple[int, torch.Tensor | None]] = field(default_factory=list)  # fed inputs (no-cache path)
    pending: tuple[int, torch.Tensor | None] | None = None  # next input: (text id, None) or (placeholder, codes [K])
    last_text: int | None = None  # the last fed text id (None: the last fed input was an audio frame)
    position: int = 0
    text_count: int = 0
    closed_frames: int = 0  # frames of the segments already closed
    num_delay: int = 0
    remaining: int | None = None
    steps: int = 0
    stop: str | None = None
    seconds: float = 0.0


class _Decoder:
    def __init__(self, model, tokens: SpecialTokens, sampling: SamplingConfig, use_cache: bool):
        self.model, self.tokens, self.sampling, self.use_cache = model, tokens, sampling, use_cache
        self.audio: AudioSettings = model.model_config.audio
        self.device = model.text_lm_head.weight.device
        self.warpers = sampling.warpers()
        self.end_of_turn = (tokens.eot, tokens.end_of_text)

    # ------------------------------------------------------------------------------------------ forwards

    def forward(self, inputs, cache=None) -> torch.Tensor:
        """inputs (ids, audio_mask, codes, positions, mask) → final hidden at each row's last position [B, H]."""
        ids, audio_mask, codes, positions, mask = (t.to(self.device) for t in inputs)
        return self.model.model.decode(ids, audio_mask, codes, positions, mask, cache)[:, -1]

    def heads(self, last: torch.Tensor, text_rows: list[int], audio_rows: list[int]):
        """Both heads run on every step (zero rows where no prompt needs one): ZeRO-3 lockstep."""
        k, v = self.audio.num_codebooks, self.model.config.codebook_size
        index = torch.tensor(text_rows + audio_rows, dtype=torch.long, device=last.device)
        picked = last.index_select(0, index)
        text = self.model.text_lm_head(picked[: len(text_rows)]).float()
        audio = self.model.audio_lm_head(picked[len(text_rows):]).float().view(-1, k, v)
        return text, audio

    def dummy_step(self) -> None:
        """One forward through every module, for a rank with nothing to generate while others still do."""
        k = self.audio.num_codebooks
        inputs = (torch.full((1, 1), self.tokens.pad), torch.zeros(1, 1, dtype=torch.bool),
                  torch.zeros(k, 0, dtype=torch.long), torch.zeros(1, 1, dtype=torch.long),
                  torch.ones(1, 1, 1, 1, dtype=torch.bool))
        self.heads(self.forward(inputs), [], [])

    # ------------------------------------------------------------------------------------------ inputs

    def left_padded(self, sequences: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]):
        """[(ids [L], audio_mask [L], codes [K, n])] → left-padded (ids, audio_mask, codes, positions, mask) with a
        causal mask over real positions (a padding query sees itself only: no fully masked row)."""
        width = max(s[0].shape[0] for s in sequences)
        ids = torch.full((len(sequences), width), self.tokens.pad, dtype=torch.long)
        audio_mask = torch.zeros(len(sequences), width, dtype=torch.bool)
        valid = torch.zeros(len(sequences), width, dtype=torch.bool)
        for b, (row_ids, row_audio, _) in enumerate(sequences):
            ids[b, width - row_ids.shape[0]:] = row_ids
            audio_mask[b, width - row_ids.shape[0]:] = row_audio
            valid[b, width - row_ids.shape[0]:] = True
        positions = (valid.cumsum(1) - 1).clamp(min=0)
        causal = torch.ones(width, width, dtype=torch.bool).tril()
        mask = (causal & valid[:, None, :]) | torch.eye(width, dtype=torch.bool)
        codes = torch.cat([s[2] for s in sequences], dim=1)
        return (ids, audio_mask, codes, positions, mask[:, None]), valid

    def sequence_of(self, row: _Row) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The row's prompt plus every input fed since (the no-cache path recomputes it all)."""
        p = row.prompt
        fed = row.history
        ids = torch.cat([p.input_ids, torch.tensor([t for t, _ in fed], dtype=torch.long)])
        audio = torch.cat([p.audio_mask, torch.tensor([c is not None for _, c in fed], dtype=torch.bool)])
        codes = [p.audio_codes] + [c[:, None] for _, c in fed if c is not None]
        return ids, audio, torch.cat(codes, dim=1)

    # ------------------------------------------------------------------------------------------ choosing

    def choose(self, logits: torch.Tensor, rows: list[_Row]) -> torch.Tensor:
        """logits [n, ..., V] of n rows → ids [n, ...] on the CPU: the argmax (one transfer for the whole step), or
        one draw per distribution from each row's own generator (upstream's order: the row's [.., V] at once)."""
        if not self.sampling.do_sample:
            return logits.argmax(dim=-1).cpu()
        drawn = []
        for row_logits, row in zip(logits, rows):
            flat = row_logits.reshape(-1, row_logits.shape[-1])
            probs = torch.softmax(self.warpers(None, flat), dim=-1)
            drawn.append(torch.multinomial(probs, 1, generator=row.generator).view(row_logits.shape[:-1]))
        return torch.stack(drawn).cpu() if drawn else torch.zeros(logits.shape[:-1], dtype=torch.long)

    def impose_delay(self, row: _Row, codes: torch.Tensor) -> bool:
        """Upstream's delay bookkeeping on a sampled column (in place); True when this column ends the segment."""
        k, bos, eos = self.audio.num_codebooks, self.audio.stream_bos_id, self.audio.stream_eos_id
        if not self.audio.use_delay_pattern:  # no ramp: the first eos ends the segment in every codebook
            if bool((codes == eos).any()):
                codes[:] = eos
                return True
            return False
        if row.num_delay + 1 < k:
            codes[row.num_delay + 1:] = bos
            row.num_delay += 1
        if row.remaining is not None:
            codes[: k - row.remaining] = eos
            row.remaining -= 1
        else:
            ends = (codes == eos).nonzero()
            if ends.numel():
                first = int(ends[0, 0])
                codes[:first] = eos
                row.remaining = k - first - 1
        return row.remaining is not None and row.remaining <= 0

    def frames_in(self, columns: list, ended: bool) -> int:
        return frames_in(len(columns), self.audio.num_codebooks, ended, self.audio.use_delay_pattern)

    def advance(self, row: _Row, token: int | None, column: torch.Tensor | None) -> None:
        """One step of one row, given what its head chose (a text token, or an audio column [K]): its next
        output, its next input, its stop."""
        s, t = self.sampling, self.tokens
        if row.last_text == t.audio_out_bos:  # the segment opens with an all-bos column, not sampled
            column = torch.full((self.audio.num_codebooks,), self.audio.stream_bos_id, dtype=torch.long)
            row.text_ids.append(t.audio_out)
            row.segments.append([column])
            row.num_delay, row.remaining = 0, None
            row.pending = (t.audio_out, column)
        elif row.last_text is None:  # an audio frame was fed: the audio head speaks
            ended = self.impose_delay(row, column)
            row.segments[-1].append(column)
            if ended:
                row.closed_frames += self.frames_in(row.segments[-1], ended=True)
                row.text_ids.append(t.audio_eos)
                row.pending = (t.audio_eos, None)
            else:
                row.pending = (t.audio_out, column)
        else:
            row.text_ids.append(token)
            row.text_count += 1
            row.pending = (token, None)
            if token in self.end_of_turn:
                row.stop = "eos"
            elif row.text_count >= s.max_text_tokens:
                row.stop = "max_text_tokens"
        if row.stop is None and row.pending[1] is not None:  # in an open segment: count its complete frames
            if row.closed_frames + self.frames_in(row.segments[-1], ended=False) >= s.max_frames:
                row.stop = "max_frames"

    # ------------------------------------------------------------------------------------------ a batch

    def start(self, prompts: list[Prompt]) -> "_Batch":
        now = time.perf_counter()
        rows = []
        for p in prompts:
            generator = None
            if self.sampling.do_sample:
                generator = torch.Generator(self.device).manual_seed(prompt_seed(self.sampling.seed, p.id))
            last = int(p.input_ids[-1]) if not bool(p.audio_mask[-1]) else None
            rows.append(_Row(p, generator, now, last_text=last, position=len(p)))
        return _Batch(self, rows)

    def finish(self, row: _Row) -> Generation:
        segments = [torch.stack(columns, dim=1) for columns in row.segments]
        closed = [True] * len(segments)
        if segments and row.stop == "max_frames":
            closed[-1] = False
        use_delay = self.audio.use_delay_pattern
        codes = [revert_delay(seg, ended, use_delay) for seg, ended in zip(segments, closed)]
        k = self.audio.num_codebooks
        codes = torch.cat(codes, dim=1) if codes else torch.zeros(k, 0, dtype=torch.long)
        return Generation(row.prompt.id, row.text_ids, segments, codes.numpy().astype(np.int64), row.stop,
                          row.steps, row.seconds)


class _Batch:
    """Prompts decoded together; `step()` runs one forward for all of them."""

    def __init__(self, decoder: _Decoder, rows: list[_Row]):
        self.decoder, self.rows = decoder, rows
        self.cache = DynamicCache(config=decoder.model.config) if decoder.use_cache else None
        self.key_valid: torch.Tensor | None = None

    @property
    def done(self) -> bool:
        return all(r.stop is not None for r in self.rows)

    def inputs(self):
        d, rows = self.decoder, self.rows
        if self.key_valid is None or not d.use_cache:  # prefill, or the no-cache loop: whole sequences
            inputs, valid = d.left_padded([d.sequence_of(r) for r in rows])
            if d.use_cache:
                self.key_valid = valid
            return inputs
        ids = torch.tensor([[r.pending[0]] for r in rows], dtype=torch.long)
        audio_mask = torch.tensor([[r.pending[1] is not None] for r in rows], dtype=torch.bool)
        codes = [r.pending[1][:, None] for r in rows if r.pending[1] is not None]
        codes = torch.cat(codes, dim=1) if codes else torch.zeros(d.audio.num_codebooks, 0, dtype=torch.long)
        positions = torch.tensor([[r.position - 1] for r in rows], dtype=torch.long)
        self.key_valid = torch.cat([self.key_valid, torch.ones(len(rows), 1, dtype=torch.bool)], dim=1)
        return ids, audio_mask, codes, positions, self.key_valid[:, None, None, :]

    def step(self) -> list[_Row]:
        """One forward; returns the rows that finished in it."""
        d = self.decoder
        for r in self.rows:  # feed what the last step chose (finished rows feed padding)
            if r.pending is not None:
                fed = r.pending if r.stop is None else (d.tokens.pad, None)
                if not d.use_cache:  # only the no-cache loop reads the whole history
                    r.history.append(fed)
                r.position += 1
                r.pending = fed
        last = d.forward(self.inputs(), self.cache)
        live = [b for b, r in enumerate(self.rows) if r.stop is None]
        opening = [b for b in live if self.rows[b].last_text == d.tokens.audio_out_bos]  # nothing to choose
        text_rows = [b for b in live if self.rows[b].last_text not in (None, d.tokens.audio_out_bos)]
        audio_rows = [b for b in live if self.rows[b].last_text is None]
        text, audio = d.heads(last, text_rows, audio_rows)
        text = d.choose(text, [self.rows[b] for b in text_rows])
        audio = d.choose(audio, [self.rows[b] for b in audio_rows])
        for b in opening:
            d.advance(self.rows[b], None, None)
        for i, b in enumerate(text_rows):
            d.advance(self.rows[b], int(text[i]), None)
        for i, b in enumerate(audio_rows):
            d.advance(self.rows[b], None, audio[i].clone())
        finished = []
        now = time.perf_counter()
        for b in live:
            r = self.rows[b]
            r.steps += 1
            r.last_text = r.pending[0] if r.pending[1] is None else None
            if r.stop is not None:
                r.seconds = now - r.started
                finished.append(r)
        return finished


@contextlib.contextmanager
def _generation_mode(model):
    """eval() and SDPA for the duration (the 4-D cache mask has no varlen-flash form); restored after."""
    was_training, implementation = model.training, model.config._attn_implementation
    model.eval()
    model.config._attn_implementation = "sdpa"
    try:
        with torch.no_grad():  # not inference_mode: ZeRO-3 gathers into parameters that training uses again
            yield
    finally:
        model.config._attn_implementation = implementation
        model.train(was_training)


def _anyone(mine: bool, device) -> bool:
    flag = torch.tensor([1.0 if mine else 0.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def generate(model, prompts: list[Prompt], tokens: SpecialTokens, sampling: SamplingConfig = SamplingConfig(),
             batch_size: int = 8, use_cache: bool = True, lockstep: bool = False,
             progress: Callable[[Generation], None] | None = None) -> list[Generation]:
    """Continue each prompt's assistant turn; results in prompt order. `model`: HiggsAudioForTraining (or a ZeRO-3
    engine's module with `lockstep=True`, called on every rank, each with its own prompts, possibly none; inside a
    DeepSpeed engine call it through `zero.generate_on_ranks`, which first closes DeepSpeed's prefetch trace).
    `progress` is called with each Generation as it finishes."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if lockstep and not (dist.is_available() and dist.is_initialized()):
        raise ValueError("lockstep=True needs an initialized torch.distributed process group")
    if len({p.id for p in prompts}) != len(prompts):
        raise ValueError("prompt ids must be unique")
    decoder = _Decoder(model, tokens, sampling, use_cache)
    # Longest first: rows of a batch have similar lengths (less padding); results go back to prompt order.
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    queue = [[prompts[i] for i in order[s: s + batch_size]] for s in range(0, len(order), batch_size)]
    results: dict[str, Generation] = {}
    batch = None
    with _generation_mode(model):
        while True:
            if batch is None and queue:
                batch = decoder.start(queue.pop(0))
            if lockstep and not _anyone(batch is not None, decoder.device):
                break
            if batch is None:
                if not lockstep:
                    break
                decoder.dummy_step()
                continue
            for row in batch.step():
                results[row.prompt.id] = decoder.finish(row)
                if progress is not None:
                    progress(results[row.prompt.id])
            if batch.done:
                batch = None
    return [results[p.id] for p in prompts]
