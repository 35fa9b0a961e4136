"""The training run: preflight (no process group yet), model under ZeRO, the step loop, evaluation, checkpoints.

One optimizer step: take the step's `grad_accum` micro-batches first, sum their learnable counts and all-reduce
them, then run each forward with that global `LossNorm` (grad_scale = world × accumulation undoes DeepSpeed's mean
over ranks and micro-batches), so the step's gradient is the single-process gradient of the whole step's data.
Losses, token counts and the stream's counters are all-reduced (time/* and memory/* are rank 0's own). Rank 0
hands each step's values to the hooks (`StepHook`), and a hook's stop request reaches every rank through a broadcast
flag."""
from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Protocol

import torch

from ..data.batch import Batch
from ..data.collator import Collator
from ..data.packing import ceil_div
from ..data.shards import FetchError, Manifest, check_fingerprint, data_fingerprint
from ..data.stream import COUNTERS, ShardLoader
from ..data.tokens import SpecialTokens
from ..model import HiggsAudioForTraining, LossConfig, LossNorm, learnable_counts, read_model_config
from ..model.losses import means_of_sums
from . import checkpointing
from .components import apply_freeze, make_optimizer, param_groups, trainable_names, warmup_cosine
from .config import RunConfig, RunConfigError, deepspeed_config, fingerprint
from .lora import apply_lora, select as lora_select
from .weights import load_pretrained, weight_plan

log = logging.getLogger("higgs_ds.train")


class TrainingStopped(RuntimeError):
    """A guard stopped the run (every rank raises it at the same step); the message says why."""


@dataclass
class StepReport:
    """What rank 0's hooks receive after each optimizer step. Values are all-reduced over ranks."""

    step: int
    total_steps: int
    metrics: dict[str, float]  # loss/..., lr, grad_norm, throughput/..., counts
    rank_learnable: list[list[int]]  # per rank: [text, audio] learnable tokens this step
    predictions: dict[str, Any] | None = None  # rank 0's last micro-batch: model predictions, labels, sample keys
    stream: dict[str, int] = field(default_factory=dict)  # the stream's counters summed over ranks; epoch, position


class StepHook(Protocol):
    def on_step(self, report: StepReport) -> None: ...
    def on_eval(self, step: int, metrics: dict[str, float]) -> None: ...
    def stop_requested(self) -> bool: ...


@dataclass
class Setup:
    """Everything read and checked before any process group forms."""

    config: RunConfig
    ds: dict
    model_config: Any
    tokenizer: Any
    tokens: SpecialTokens
    world_size: int
    zero3: bool
    masking: str = ""  # the preflight's masking summary of the train split (printed, logged)


def preflight(config: RunConfig, world_size: int) -> Setup:
    """Read the tokenizer, the model config and the manifests and check that they agree; every failure is one
    RunConfigError message, raised on every rank alike before DeepSpeed starts."""
    from transformers import AutoTokenizer

    ds = deepspeed_config(config, world_size)
    try:
        tokenizer = AutoTokenizer.from_pretrained(config.model.tokenizer)
    except (OSError, ValueError) as exc:
        raise RunConfigError(f"model.tokenizer {config.model.tokenizer}: not a tokenizer ({exc})") from None
    source = config.model.pretrained or config.model.config
    try:
        model_config = read_model_config(source, tokenizer)
        tokens = SpecialTokens.from_tokenizer(tokenizer, model_config.pad_token_id)
    except ValueError as exc:
        raise RunConfigError(f"model: {exc}") from None
    expected = data_fingerprint(tokenizer, tokens, model_config.audio)
    for key, split in (("data.train", config.data.train), ("data.val", config.data.val)):
        if split is None:
            continue
        try:
            check_fingerprint(Manifest.load(split), expected)
        except (ValueError, FetchError) as exc:
            raise RunConfigError(f"{key}: {exc}") from None
    if config.model.pretrained is not None:
        try:
            weight_plan(config.model.pretrained)
        except (OSError, ValueError) as exc:
            raise RunConfigError(f"model.pretrained: {exc}") from None
    with torch.device("meta"):
        names = [n for n, _ in HiggsAudioForTraining(model_config).named_parameters()]
    if config.lora.rank:
        with torch.device("meta"):
            try:
                lora_select(HiggsAudioForTraining(model_config), config.lora)
            except ValueError as exc:
                raise RunConfigError(str(exc)) from None
    elif not trainable_names(names, config.train.freeze, config.train.trainable):
        which = (f"train.trainable={config.train.trainable}" if config.train.trainable is not None
                 else f"train.freeze={config.train.freeze}")
        raise RunConfigError(f"{which}: no parameter of this model would train (names look like {names[0]}, "
                             f"{names[-1]})")
    zero3 = ds.get("zero_optimization", {}).get("stage") == 3
    return Setup(config, ds, model_config, tokenizer, tokens, world_size, zero3,
                 masking=masking_preflight(config, tokenizer, names))


def masking_preflight(config: RunConfig, tokenizer, names: list[str], max_samples: int = 500) -> str:
    """Who learns what in the first samples of the train split; a split with nothing the run trains is refused."""
    from ..data.masking import learnable_share_rows, split_masking, table

    manifest = Manifest.load(config.data.train)
    stats, read = split_masking(manifest, max_samples, tokenizer)
    learnable = {modality: sum(n for (_, m, kind), n in stats.items() if m == modality and kind == "learnable")
                 for modality in ("text", "audio-out")}
    trained = set(trainable_names(names, config.train.freeze, config.train.trainable))
    adapted = bool(config.lora.rank)  # the decoder's adapters learn from either loss
    heads = {"text": (adapted or "text_lm_head.weight" in trained) and config.model.text_weight > 0,
             "audio-out": (adapted or "audio_lm_head.weight" in trained) and config.model.audio_weight > 0}
    if not any(learnable[m] for m, on in heads.items() if on):
        wanted = " or ".join(m for m, on in heads.items() if on) or "anything"
        raise RunConfigError(f"data.train: the first {read} samples hold no learnable {wanted} token, which this "
                             f"run trains (train.freeze={config.train.freeze}): every such label is -100 — check "
                             "start_index and the roles of the data")
    rows = learnable_share_rows(stats, manifest.audio.num_codebooks)
    return (f"masking over the first {read} samples of {config.data.train}:\n"
            + table(("role", "modality", "positions", "learnable", "share"), rows, right=(2, 3, 4)))


def make_collator(setup: Setup) -> Collator:
    d = setup.config.data
    return Collator(setup.tokens, setup.model_config.audio, layout=d.layout, round_to=d.round_to,
                    pack_length=d.pack_length)


def make_loader(setup: Setup, split: str, rank: int, train: bool, agree_min=None) -> ShardLoader:
    d, t = setup.config.data, setup.config.train
    return ShardLoader(split, make_collator(setup), rank=rank, world_size=setup.world_size,
                       num_workers=d.num_workers if train else 0, seed=d.seed, max_tokens=d.max_tokens,
                       batch_size=d.batch_size, shuffle=train and d.shuffle, shuffle_buffer=d.shuffle_buffer,
                       num_epochs=t.epochs if train else 1,
                       agree_min=agree_min)


def dry_run(setup: Setup) -> dict[str, Any]:
    """The resolved config, the data plan and the model-state memory per GPU (higgs_ds.train.memory: frozen and
    LoRA parameters counted as such, unlike DeepSpeed's estimator), without a process group."""
    loader = make_loader(setup, setup.config.data.train, rank=0, train=True)
    manifest = loader.manifest
    per_epoch = [len(loader) if e == 0 else loader.plan(e).batches_per_slot * loader.workers
                 for e in range(setup.config.train.epochs)]
    counts, estimate = model_memory(setup.model_config, setup.config, setup.ds, setup.world_size)
    return {"config": setup.config.to_dict(), "deepspeed": setup.ds,
            "data": {"samples": manifest.totals["samples"], "expanded_tokens": manifest.totals["expanded_tokens"],
                     "micro_batches_per_epoch_per_rank": per_epoch,
                     "steps": total_steps(setup.config, sum(per_epoch))},
            "model": {"parameters": counts.total, "trainable_parameters": counts.trainable,
                      "largest_layer_parameters": counts.largest_layer},
            "memory_estimate": estimate}


def model_memory(model_config, config: RunConfig, ds: dict, world_size: int):
    """Parameter counts (trainable as the run trains them: LoRA, a freeze recipe) and the model-state estimate per
    GPU for `world_size` GPUs, on a meta-device model."""
    from .memory import count_params, format_estimate, model_states_estimate

    t = config.train
    with torch.device("meta"):
        model = HiggsAudioForTraining(model_config)
        if config.lora.rank:
            apply_lora(model, config.lora)
        else:
            apply_freeze(model, t.freeze, t.trainable)
    counts = count_params(model)
    zero = ds.get("zero_optimization", {})
    offload = {key: zero.get(key, {}).get("device", "none") != "none" for key in ("offload_optimizer", "offload_param")}
    estimate = model_states_estimate(counts.total, counts.trainable, counts.largest_layer, world_size,
                                     stage=zero.get("stage", 3), precision=t.precision, **offload)
    estimate["summary"] = format_estimate(estimate)
    return counts, estimate


def total_steps(config: RunConfig, micro_batches: int) -> int:
    """Optimizer steps over `micro_batches` (the last one may be partial: no micro-batch is left out)."""
    steps = ceil_div(micro_batches, config.train.grad_accum)
    return min(steps, config.train.max_steps) if config.train.max_steps is not None else steps


class Trainer:
    def __init__(self, setup: Setup, hooks: list[StepHook] = ()):
        import deepspeed
        import torch.distributed as dist

        self.setup, self.config, self.hooks = setup, setup.config, list(hooks)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.device = torch.device(deepspeed.get_accelerator().device_name(), int(os.environ.get("LOCAL_RANK", 0)))
        m, o, t = self.config.model, self.config.optim, self.config.train
        torch.manual_seed(m.init_seed)  # the same random initialisation on every rank
        loss_config = LossConfig(m.text_weight, m.audio_weight, m.audio_reduction)
        kwargs = dict(loss_config=loss_config, attn_implementation=m.attn_implementation, head_impl=m.head_impl,
                      leak_labels_for_tests=m.leak_labels_for_tests)
        if setup.zero3:
            with deepspeed.zero.Init(config_dict_or_path=setup.ds):
                model = HiggsAudioForTraining(setup.model_config, **kwargs)
        else:
            model = HiggsAudioForTraining(setup.model_config, **kwargs)
        if m.pretrained is not None:
            load_pretrained(model, m.pretrained, setup.model_config, self.rank, setup.zero3)
        # LoRA: adapters injected after the pretrained weights are in, outside zero.Init (lora.apply_lora)
        self.trainable = (apply_lora(model, self.config.lora) if self.config.lora.rank
                          else apply_freeze(model, t.freeze, t.trainable))
        if m.activation_checkpointing:
            model.gradient_checkpointing_enable()

        self.loader = make_loader(setup, self.config.data.train, self.rank, train=True)
        self.val_loader = (make_loader(setup, self.config.data.val, self.rank, train=False)
                           if self.config.data.val else None)
        epochs = range(self.loader.epoch, t.epochs)
        self.total_steps = total_steps(self.config, sum(self.loader.plan(e).batches_per_slot for e in epochs)
                                       * self.loader.workers)

        groups = param_groups(model, o.weight_decay)
        ds = dict(setup.ds)
        self.checkpoints = Path(t.out_dir) / "checkpoints"
        self.resume_from = self._resume_target()
        self.saved_world = (checkpointing.load_client(self.resume_from)["world_size"]
                            if self.resume_from is not None else self.world)
        if self.saved_world != self.world:  # DeepSpeed's universal checkpoint re-partitions model and optimizer
            ds["checkpoint"] = {**ds.get("checkpoint", {}), "load_universal": True}
        optimizer, extra = make_optimizer(groups, o, ds, self.device.type)
        ds.update(extra)
        self.lr_factor = lambda step: warmup_cosine(step, o.warmup_steps, self.total_steps, o.min_lr_ratio)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, self.lr_factor)
        self.engine, self.optimizer, _, self.schedule = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=schedule, config=ds)
        # Runtime randomness (dropout): a seed per rank, so ranks draw different masks; the weights' init above used
        # model.init_seed on every rank alike. torch.manual_seed seeds the accelerators' generators too.
        torch.manual_seed(t.seed + self.rank)
        self.step = 0
        self._step_seconds: list[float] = []  # this process's step times (ETA)
        self.skipped_in_a_row = self.skipped_total = 0
        self.stop_reason: str | None = None
        self.hooks_seconds = 0.0  # rank 0's time inside the hooks' on_step, the step before
        self.fingerprint = fingerprint(self.config)

    # ------------------------------------------------------------------------------------------ checkpoints

    def save(self) -> Path:
        state = {"stream": self.loader.state_dict(), **rng_state(self.device)}
        client = {"step": self.step, "fingerprint": self.fingerprint, "world_size": self.world}
        crash = os.environ.get("HIGGS_DS_TEST_CRASH_IN_SAVE") == str(self.step)
        path = checkpointing.save(self.engine, self.checkpoints, self.step, state, client, self.rank,
                                  self.config.train.keep_last, adapters_only=bool(self.config.lora.rank),
                                  before_complete=(lambda: os.kill(os.getpid(), signal.SIGKILL)) if crash else None)
        if os.environ.get("HIGGS_DS_TEST_HANG_AFTER_SAVE") == str(self.step):
            (Path(self.config.train.out_dir) / f"saved.rank{self.rank}").touch()  # a test kills us now (kill -9)
            time.sleep(3600)
        return path

    def _resume_target(self) -> Path | None:
        choice = self.config.train.resume
        if choice == "none":
            return None
        path = checkpointing.latest(self.checkpoints) if choice == "auto" else Path(choice)
        if path is not None and not (path / checkpointing.COMPLETE).exists():
            raise RunConfigError(f"train.resume {path}: not a complete checkpoint (no {checkpointing.COMPLETE})")
        return path

    def resume(self) -> bool:
        """Continue from `resume_from`: exactly at the same world size; at another one through DeepSpeed's universal
        checkpoint (converted here, once) with the stream re-planned over the samples not yet consumed."""
        import torch.distributed as dist

        path = self.resume_from
        if path is None:
            return False
        client = checkpointing.load_client(path)
        if client["fingerprint"] != self.fingerprint:
            raise RunConfigError(f"train.resume {path}: saved by a run with another config (fingerprint "
                                 f"{client['fingerprint']} vs {self.fingerprint})")
        states = [checkpointing.load_rank_state(path, r) for r in range(self.saved_world)]
        if self.saved_world == self.world:
            # LoRA: the checkpoint holds the trained parameters only; the base came from model.pretrained
            self.engine.load_checkpoint(str(path.parent), tag=path.name, load_optimizer_states=True,
                                        load_lr_scheduler_states=True, load_module_strict=not self.config.lora.rank)
        else:
            universal = Path(self.config.train.out_dir) / "universal"
            if self.rank == 0 and not (universal / path.name / checkpointing.COMPLETE).exists():
                checkpointing.to_universal(path, universal / path.name)
            dist.barrier()
            self.engine.load_checkpoint(str(universal), tag=path.name, load_optimizer_states=True,
                                        load_lr_scheduler_states=True, load_module_strict=not self.config.lora.rank)
            # DeepSpeed 0.19.8's ZeRO-3 universal load gives every sub-group the *same* `step` tensor; torch's
            # AdamW increments it in place once per sub-group, so later sub-groups would step their bias
            # correction ahead. One tensor each (tests/test_train.py checks the first resumed step exactly).
            inner = getattr(self.optimizer, "optimizer", self.optimizer)
            for state in inner.state.values():
                if isinstance(state.get("step"), torch.Tensor):
                    state["step"] = state["step"].clone()
        self.step = int(client["step"])
        own = states[min(self.rank, self.saved_world - 1)]
        self.loader.load_state_dict(own["stream"], [s["stream"] for s in states])
        if self.saved_world != self.world:  # the rest of the data makes another number of steps now
            left = len(self.loader) - self.loader.position + sum(
                self.loader.plan(e).batches_per_slot * self.loader.workers
                for e in range(self.loader.epoch + 1, self.config.train.epochs))
            self.total_steps = self.step + ceil_div(left, self.config.train.grad_accum)
            if self.config.train.max_steps is not None:
                self.total_steps = min(self.total_steps, self.config.train.max_steps)
        # The schedule is a function of the step alone: set it from the step (a universal load may not carry it).
        lrs = [base * self.lr_factor(self.step) for base in self.schedule.base_lrs]
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr
        self.schedule.last_epoch, self.schedule._last_lr = self.step, lrs
        if self.rank < self.saved_world:
            set_rng_state(states[self.rank], self.device)
        if self.rank == 0:
            log.info("resumed from %s at step %d%s", path, self.step, "" if self.saved_world == self.world else
                     f" (saved on {self.saved_world} ranks, running on {self.world}: universal checkpoint, the "
                     "epoch's remaining samples re-planned)")
        return True

    def dump_parameters(self, path: Path) -> None:
        """Every parameter, gathered one at a time, into one safetensors file on rank 0 (tests: a LoRA
        checkpoint holds no frozen weight to compare with)."""
        import deepspeed
        from safetensors.torch import save_file

        tensors = {}
        for name, param in self.engine.module.named_parameters():
            with deepspeed.zero.GatheredParameters([param], enabled=self.setup.zero3):
                if self.rank == 0:
                    tensors[name] = param.detach().clone().cpu()
        if self.rank == 0:
            save_file(tensors, str(path))

    # ------------------------------------------------------------------------------------------ the loop

    def micro_batches(self) -> Iterator[Batch]:
        while self.loader.epoch < self.config.train.epochs:
            yield from self.loader

    def _all_reduce(self, values: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        values = values.to(self.device)
        dist.all_reduce(values)
        return values.cpu()

    def train(self) -> dict[str, float]:
        """The loop: take the step's micro-batches, normalise by the global counts, step, report, evaluate, save."""
        import torch.distributed as dist

        t, k = self.config.train, self.setup.model_config.audio.num_codebooks
        trace = self._open_trace()
        stream = self.micro_batches()
        metrics: dict[str, float] = {}
        failed = False
        self.engine.train()
        while self.step < self.total_steps:
            started = time.perf_counter()
            micro = [batch for batch in (next(stream, None) for _ in range(t.grad_accum)) if batch is not None]
            if not micro:  # the data ran out before the planned steps (every rank alike: equal batch counts)
                log.warning("rank %d: the data ended after step %d of %d", self.rank, self.step, self.total_steps)
                self.total_steps = self.step
                if self.step:
                    self.save()
                break
            data_time = time.perf_counter() - started
            everyone, norm = self._global_norm(micro)
            skipped_before = self.engine.skipped_steps
            sums, predictions = self._micro_steps(micro, norm, trace)
            self.step += 1
            # ZeRO (0.19.8) drops a step whose global gradient norm is not finite, on every rank alike (the norm is
            # global), and does not advance the schedule; we count it and stop after too many in a row.
            skipped = self.engine.skipped_steps > skipped_before
            self.skipped_in_a_row = self.skipped_in_a_row + 1 if skipped else 0
            self.skipped_total += int(skipped)
            # One all-reduce for the step's loss sums and every rank's stream counters (data/* is the whole run's).
            counters = self.loader.stats()
            reduced = self._all_reduce(torch.cat([sums, sums.new_tensor([counters[c] for c in COUNTERS])]))
            data_counts = {**counters, **{c: int(v) for c, v in zip(COUNTERS, reduced[-len(COUNTERS):].tolist())}}
            metrics = self._metrics(reduced[:-len(COUNTERS)], k, time.perf_counter() - started, data_time)
            metrics.update({"train/step_skipped": float(skipped), "train/skipped_steps": float(self.skipped_total)})
            stop = (self._report(metrics, everyone, predictions, skipped, data_counts) if self.rank == 0
                    else torch.zeros(1))
            if self.skipped_in_a_row >= t.max_skipped_steps:  # the same on every rank: the norm is global
                raise TrainingStopped(f"stopping at step {self.step}: {self.skipped_in_a_row} steps in a row had a "
                                      "non-finite loss or gradient and were skipped (train.max_skipped_steps="
                                      f"{t.max_skipped_steps}); the newest checkpoint holds the last good weights")
            stop = stop.to(self.device)
            dist.broadcast(stop, src=0)  # a hook's stop request reaches every rank
            last = self.step == self.total_steps or bool(stop.item())
            failed = stop.item() == 2.0
            if self.val_loader is not None and ((t.eval_every and self.step % t.eval_every == 0) or last):
                self.evaluate()
            if (t.save_every and self.step % t.save_every == 0) or last:
                self.save()
            if last:
                break
        if trace is not None:
            trace.close()
        if failed:  # every rank alike: the flag was broadcast
            raise TrainingStopped(self.stop_reason or "stopped by a guard on rank 0 (its message says why)")
        return metrics

    def _open_trace(self):
        if not self.config.train.trace_samples:
            return None
        (Path(self.config.train.out_dir) / "trace").mkdir(parents=True, exist_ok=True)
        return open(Path(self.config.train.out_dir) / "trace" / f"rank{self.rank}.jsonl", "a")

    def _global_norm(self, micro: list[Batch]) -> tuple[torch.Tensor, LossNorm]:
        """Every rank's learnable counts of this step ([world, 1 + K], all-reduced) and the step's LossNorm."""
        k = self.setup.model_config.audio.num_codebooks
        counts = [learnable_counts(b) for b in micro]
        everyone = torch.zeros(self.world, k + 1, dtype=torch.long)
        everyone[self.rank] = torch.stack([torch.cat([c.text.reshape(1), c.audio]) for c in counts]).sum(0)
        everyone = self._all_reduce(everyone)
        total = everyone.sum(0)
        norm = LossNorm(text_tokens=float(total[0]), audio_tokens=total[1:].double(),
                        grad_scale=float(self.world * self.config.train.grad_accum))
        return everyone, norm

    def _micro_steps(self, micro: list[Batch], norm: LossNorm, trace) -> tuple[torch.Tensor, dict | None]:
        """Forward, backward and engine.step of each micro-batch; this rank's loss sums/counts, and rank 0's
        predictions of the last micro-batch when the hooks want them."""
        t, k = self.config.train, self.setup.model_config.audio.num_codebooks
        sums = torch.zeros(2 + 2 * k, dtype=torch.float64, device=self.device)  # losses.loss_sums, on the device
        tokens = samples = 0
        predictions = None
        poison = str(self.step + 1) in os.environ.get("HIGGS_DS_TEST_NAN_STEPS", "").split(",")
        for n, batch in enumerate(micro):
            if len(micro) < t.grad_accum and n == len(micro) - 1:
                # The run's last, partial step (the data's last micro-batches): step the optimizer here. The
                # global LossNorm already normalises by this step's counts; grad_scale stays world × accum
                # because DeepSpeed still divides by its configured accumulation.
                self.engine.set_gradient_accumulation_boundary(True)
            want = self.rank == 0 and n == len(micro) - 1 and bool(self.hooks) and self._wants_predictions()
            result = self.engine(**batch.to(self.device).model_inputs(), loss_norm=norm, return_predictions=want)
            if poison and self.rank == 0:  # test-only: a non-finite loss on one rank
                result = result._replace(loss=result.loss * float("nan"))
            self.engine.backward(result.loss)
            self.engine.step()
            sums += result.sums()  # no host sync per micro-batch: the step moves its sums once
            tokens, samples = tokens + batch.num_tokens, samples + len(batch.sample_keys)
            if trace is not None:
                trace.write(json.dumps({"step": self.step + 1, "micro": n, "keys": batch.sample_keys}) + "\n")
                trace.flush()
            if want:
                predictions = {key: getattr(result, key).cpu() for key in
                               ("text_predictions", "text_labels", "text_positions", "audio_predictions",
                                "audio_labels", "audio_frames", "audio_inputs")}
                # Which sample each logged row belongs to, and the batch's inputs to decode them.
                predictions.update(sample_keys=list(batch.sample_keys), input_ids=batch.input_ids,
                                   label_ids=batch.label_ids, segment_ids=batch.segment_ids,
                                   audio_out_mask=batch.audio_out_mask)
        return torch.cat([sums, sums.new_tensor([tokens, samples])]), predictions

    def _report(self, metrics: dict, everyone: torch.Tensor, predictions: dict | None, skipped: bool,
                stream: dict[str, int]) -> torch.Tensor:
        """Rank 0: the step line, metrics.jsonl, the hooks; the stop flag (0 go on, 1 stop, 2 a guard failed)."""
        t = self.config.train
        if skipped:
            log.warning("step %d skipped: non-finite loss or gradient (loss %s); %d in a row", self.step,
                        metrics["loss/total"], self.skipped_in_a_row)
        if self.step % t.log_every == 0 or self.step == self.total_steps:
            print(self._line(metrics), flush=True)
        with open(Path(t.out_dir) / "metrics.jsonl", "a") as handle:
            handle.write(json.dumps({"step": self.step, **metrics}) + "\n")
        report = StepReport(self.step, self.total_steps, metrics, everyone.tolist(), predictions, stream)
        hooks_started = time.perf_counter()
        for hook in list(self.hooks):
            try:
                hook.on_step(report)
            except Exception as exc:  # noqa: BLE001 - a broken hook must not take the run (and every rank) down
                print(f"error: hook {type(hook).__name__} failed at step {self.step} and is switched off: "
                      f"{type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
                self.hooks.remove(hook)
        self.hooks_seconds = time.perf_counter() - hooks_started  # reported with the next step
        requests = [hook.stop_requested() for hook in self.hooks]
        reasons = [r for r in requests if isinstance(r, str)]
        self.stop_reason = reasons[0] if reasons else None
        return torch.tensor([2.0 if reasons else float(any(requests))])

    def _wants_predictions(self) -> bool:
        """Predictions (top-1 at logged rows) on the first step and at the slice and guard cadences only: on a GPU
        asking for them runs the chunked head instead of Liger's."""
        step = self.step + 1
        every = [e for e in (self.config.train.slice_every, self.config.guards.check_every) if e]
        return step == 1 or any(step % e == 0 for e in every)

    def _metrics(self, sums: torch.Tensor, k: int, seconds: float, data_seconds: float) -> dict[str, float]:
        text_tokens, audio_tokens = sums[1], sums[2 + k:2 + 2 * k]
        tokens, samples = sums[2 + 2 * k], sums[3 + 2 * k]
        metrics = means_of_sums(sums, k, self.engine.module.loss_config)
        grad_norm = self.engine.get_global_grad_norm()
        learnable_positions = float(text_tokens + audio_tokens.sum() / k)  # audio: K labels per frame
        metrics.update({"tokens/total": float(tokens),
                        "tokens/learnable_share": learnable_positions / max(1.0, float(tokens)),
                        "memory/peak_rss_gib": peak_rss_gib(),
                        "lr": float(self.schedule.get_last_lr()[0]),
                        "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                        "tokens/text_learnable": float(text_tokens),
                        "tokens/audio_learnable": float(audio_tokens.sum()),
                        "throughput/tps": float(tokens) / seconds, "throughput/samples_per_s": float(samples) / seconds,
                        "time/step_s": seconds, "time/data_wait_share": data_seconds / seconds})
        metrics["time/hooks_s"] = self.hooks_seconds  # of the previous step (its hooks ran after its metrics)
        if self.device.type == "cuda":
            metrics["memory/peak_gpu_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        # ETA from the mean step time of this process's steps so far (the first includes warm-up).
        self._step_seconds.append(seconds)
        mean = sum(self._step_seconds) / len(self._step_seconds)
        metrics["time/eta_s"] = mean * max(0, self.total_steps - self.step)
        return metrics

    def _line(self, m: dict[str, float]) -> str:
        eta = int(m["time/eta_s"])
        return (f"step {self.step}/{self.total_steps} loss {m['loss/total']:.4f} text {m['loss/text']:.4f} "
                f"audio {m['loss/audio']:.4f} lr {m['lr']:.3g} grad_norm {m['grad_norm']:.3f} "
                f"tok/s {m['throughput/tps']:.0f} data {m['time/data_wait_share']:.0%} "
                f"eta {eta // 3600}:{eta // 60 % 60:02d}:{eta % 60:02d}")

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        k = self.setup.model_config.audio.num_codebooks
        self.engine.eval()
        self.val_loader.set_epoch(0)
        sums = torch.zeros(2 + 2 * k, dtype=torch.float64, device=self.device)
        for batch in self.val_loader:
            sums += self.engine(**batch.to(self.device).model_inputs()).sums()
        means = means_of_sums(self._all_reduce(sums), k, self.engine.module.loss_config)
        self.engine.train()
        metrics = {f"eval/{name.split('/', 1)[1]}": value for name, value in means.items()}
        if self.rank == 0:
            print(f"eval step {self.step}: " + " ".join(f"{n} {v:.4f}" for n, v in metrics.items()
                                                          if "_cb" not in n), flush=True)
            for hook in self.hooks:
                hook.on_eval(self.step, metrics)
        return metrics


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """This process's RNG states for a checkpoint: the CPU generator, and the accelerator's (where dropout draws on
    a GPU) when the model runs on one."""
    state = {"torch_rng": torch.get_rng_state()}
    if device.type != "cpu":
        import deepspeed

        state["device_rng"] = deepspeed.get_accelerator().get_rng_state(device.index).cpu()
    return state


def set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["torch_rng"])
    if device.type != "cpu":
        import deepspeed

        if "device_rng" in state:
            deepspeed.get_accelerator().set_rng_state(state["device_rng"], device.index)
        else:  # saved on the CPU: the run goes on, its dropout masks differ from an uninterrupted run's
            log.warning("the checkpoint holds no %s RNG state (saved on the CPU): dropout is not resumed exactly",
                        device.type)


def release_shared_memory() -> None:
    """DeepSpeed 0.19.8's CPU shared-memory all-reduce leaves /dev/shm/deepspeed_allreduce_buffer_* behind (≈ 66 MiB
    of RAM per rank and launch, never freed): after a last barrier each rank unlinks its own."""
    import glob
    import torch.distributed as dist

    dist.barrier()
    # shm.cpp names them deepspeed_allreduce_buffer_{uid}_{master addr}_{master port}_{local rank}
    pattern = (f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '*')}_"
               f"{os.environ.get('MASTER_PORT', '*')}_{os.environ.get('LOCAL_RANK', '0')}")
    for path in glob.glob(pattern):
        Path(path).unlink(missing_ok=True)


def peak_rss_gib() -> float:
    """This process's peak resident memory (on a GPU, `torch.cuda.max_memory_allocated` tells the device's)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def load_hook(spec: str):
    """The StepHook class named "package.module:Class" (train.hooks)."""
    import importlib

    module, _, name = spec.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as exc:
        raise RunConfigError(f"train.hooks: {spec!r} is not an importable module:Class ({exc})") from None


def run(config: RunConfig, dry: bool = False, hooks: list[StepHook] = (), world_size: int | None = None) -> int:
    world_size = world_size or int(os.environ.get("WORLD_SIZE", 1))
    setup = preflight(config, world_size)  # before any process group: bad configs stop every rank here
    for spec in config.train.hooks:
        load_hook(spec)
    if dry:  # stdout holds the JSON alone (`--dry-run > plan.json`); the summaries go to stderr
        report = dry_run(setup)
        print(f"{setup.masking}\nmemory: {report['memory_estimate']['summary']}", file=sys.stderr, flush=True)
        print(json.dumps(report, indent=1, default=str), flush=True)
        return 0
    if int(os.environ.get("RANK", 0)) == 0:
        print(setup.masking, flush=True)
    import deepspeed
    import torch.distributed as dist

    deepspeed.init_distributed()
    if dist.get_rank() == 0:
        hooks = [*hooks, *(load_hook(spec)(config) for spec in config.train.hooks)]
        from ..hooks import CollapseGuard, TensorBoardHook

        if config.train.tensorboard:
            hooks.append(TensorBoardHook(config))
        if config.guards.enabled:
            audio = setup.model_config.audio
            hooks.append(CollapseGuard(config, audio.codes_per_codebook + 2, audio.num_codebooks))
    trainer = Trainer(setup, hooks)
    out = Path(config.train.out_dir)
    if trainer.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    trainer.resume()
    if trainer.rank == 0:
        (out / "config.json").write_text(json.dumps(config.to_dict(), indent=1) + "\n")
        (out / "preflight.txt").write_text(setup.masking + "\n")
    for hook in trainer.hooks:
        getattr(hook, "on_start", lambda step: None)(trainer.step)
    try:
        final = trainer.train()
    except TrainingStopped:  # raised on every rank at the same step: they can still meet
        release_shared_memory()
        raise
    finally:
        for hook in trainer.hooks:
            getattr(hook, "close", lambda: None)()
    if dump := os.environ.get("HIGGS_DS_TEST_DUMP_WEIGHTS"):  # test-only: every parameter, frozen ones too
        trainer.dump_parameters(Path(dump))
    release_shared_memory()
    if trainer.rank == 0:
        print(f"done: step {trainer.step}, checkpoints in {trainer.checkpoints}", flush=True)
        (out / "final_metrics.json").write_text(json.dumps(final, indent=1) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`deepspeed launch/train.py --config run.yaml [section.key=value ...] [--dry-run]`"""
    import argparse

    from .config import load_config

    parser = argparse.ArgumentParser(prog="launch/train.py", description="Train Higgs Audio v2 under DeepSpeed "
                                     "ZeRO from higgs-ds shards (run with deepspeed, torchrun or python).")
    parser.add_argument("--config", help="run YAML (higgs_ds.train.config.RunConfig)")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config, data plan and memory "
                                                               "estimate, then exit (no process group)")
    parser.add_argument("--world-size", type=int, help="with --dry-run: plan the data and estimate memory for this "
                                                          "many GPUs (default: this launch's world size)")
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # the launcher's
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.max_steps=100")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        config = load_config(args.config, args.overrides)
        if args.world_size is not None and (not args.dry_run or args.world_size < 1):
            raise RunConfigError("--world-size N (N >= 1) goes with --dry-run")
        return run(config, dry=args.dry_run, world_size=args.world_size)
    except RunConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except TrainingStopped as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
