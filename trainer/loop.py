"""The training loop: DreamBooth LoRA with prior preservation, under accelerate.

Read `train` from top to bottom: prepare the run, load data and model, attach LoRA,
then one optimizer step per loop iteration, with checkpoints, samples and a graceful
stop. The loss is in `diffusion_loss`.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import importlib
import math
import re
import shutil
import time
import traceback
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F

from .checkpoints import (TrainingState, check_same_base_model, check_same_dataset, checkpoints_after,
                          load_checkpoint, prune_checkpoints, remove_stale_checkpoint_folders, resolve_resume,
                          save_checkpoint)
from .conditioning import encode_prompts, sdxl_time_ids, tokenize
from .config import TrainConfig, partial_lora_name
from .cuda_graphs import GraphedUNet, own_gradients
from .data import DatasetScan, ImageDataset, Sample, count_images, dataset_manifest, dataset_summary, scan_images
from .events import EventWriter
from .export import SAVE_DTYPES, export_lora, kohya_state_dict, lora_metadata
from .fileio import DiskFullError, stale_temp_files
from .loss_readout import LossReadout, StepLoss
from .lora import add_lora, load_lora_state, lora_parameters, lora_state, skip_lora_input_casts
from .models import BaseModel, load_base_model
from .precision import compute_norms_in_input_dtype
from .sample import CLASS_IMAGES_PER_MOVE, ensure_class_images, generate_images, keep_models_in_place, save_png
from .run_folder import SAMPLE_NAME, checkpoint_dir, events_path, sample_path, samples_dir, stop_path
from .stop import ForcedStop, StopRequest, clear_stale_stop_file

# How long processes wait for each other in a collective. Under a multi-process launch the
# others wait while the main process generates the class images, which can take longer than
# torch's default 10 minutes (a hundred SDXL images).
PROCESS_GROUP_TIMEOUT = datetime.timedelta(hours=3)


class TrainingError(RuntimeError):
    """Training cannot go on (a NaN loss, an existing output, a missing optional package)."""

    def __init__(self, message: str, step: int | None = None):
        super().__init__(message)
        self.step = step  # the step it concerns, where that is not the one the loop is at (a loss read late)


class InputError(TrainingError):
    """The run refuses to start: a setting or file that cannot work as given (the CLI's exit code 2)."""


class OutOfDiskSpace(TrainingError):
    """A checkpoint, the LoRA or a sample did not fit on its disk (the CLI's exit code 3)."""


class StepFailed(TrainingError):
    """A training step raised (out of memory, most often); the steps done before it were saved where possible."""

    def __init__(self, message: str, step: int, out_of_memory: bool):
        super().__init__(message, step)
        self.out_of_memory = out_of_memory


class _Stopped(Exception):
    """Raised inside long preparation work when a stop was requested."""


@dataclass
class TrainResult:
    status: str                                  # "done" or "stopped"
    step: int
    lora_files: list[Path] = field(default_factory=list)
    samples: list[Path] = field(default_factory=list)
    checkpoint: Path | None = None
    summary: str = ""                            # what a stop before training kept, in words


def train(config: TrainConfig, events: EventWriter | None = None, stop: StopRequest | None = None) -> TrainResult:
    """Run (or resume) one training run described by `config`; returns what it wrote."""
    accelerator = _make_accelerator(config)
    main = accelerator.is_main_process
    output_dir = Path(config.output_dir)
    lora_path = Path(config.lora_dir or config.output_dir) / f"{config.output_name}.safetensors"
    events = events or EventWriter(events_path(output_dir), enabled=main)
    stop = stop or StopRequest(stop_path(output_dir))
    step = 0
    state: TrainingState | None = None  # the checkpoint resumed from (until the first checkpoint of this run)
    last_checkpoint: Path | None = None  # the newest complete checkpoint of this run (what a failure keeps)
    graphs = None
    losses: LossReadout | None = None
    try:
        # --- everything that can be checked before a model loads --------------------------
        state = _checkpoint_to_resume(config, accelerator, lora_path, events)
        step = state.step if state else 0  # what a stop while loading reports
        last_checkpoint = state.path if state else None
        replaced = _checkpoints_of_another_run(config, state)  # deleted (overwrite) once everything else is ready
        if main:
            clear_stale_stop_file(stop_path(output_dir))
            _remove_leftovers(config, lora_path, events)
        instance_data, manifest = _instance_data(config, state, events)

        # --- model, class images, LoRA -----------------------------------------------------
        events.emit("loading", model=config.pretrained_model)
        base = load_base_model(config.pretrained_model, tokenizer_dir=config.tokenizer or None,
                               prediction_type=config.prediction_type)
        if _stop_everywhere(stop, accelerator):  # asked while loading: before the class images
            raise _Stopped
        if state is not None:  # the same model, wherever it is now
            check_same_base_model(state, base.sha256(), config.pretrained_model)
        _attach_lora(base, config, accelerator)
        device = accelerator.device
        weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
        cache = ConditioningCache(config.use_cached_latents)
        offload = config.offload_frozen_models and cache.enabled and not config.train_text_encoder
        place_models(base, device, weight_dtype, unet_waits=offload)
        class_data, class_manifest = _class_data(config, base, state, events, stop, accelerator, offload)
        if _stop_everywhere(stop, accelerator):  # asked while loading: nothing trained, nothing to save
            raise _Stopped
        _make_trainable(base, config, state)
        _log_settings_without_effect(config, offload, events)
        if offload:  # before `prepare`, which may wrap the UNet for several processes
            _fill_cache_then_offload(instance_data, class_data, base, cache, config, device)
            if _stop_everywhere(stop, accelerator):
                raise _Stopped

        # --- optimizer, scheduler, accelerate --------------------------------------------
        optimizer, lr_scheduler, trained_parameters = _optimization(base, config, state, device)
        trained_encoders = base.text_encoders if config.train_text_encoder else []
        unet, optimizer, *trained_encoders = accelerator.prepare(base.unet, optimizer, *trained_encoders)
        if state is not None and state.scaler and accelerator.scaler is not None:
            accelerator.scaler.load_state_dict(state.scaler)  # fp16: else it starts at 65536 and skips steps again
        encoders = [trained_encoders[i] if config.train_text_encoder else e for i, e in enumerate(base.text_encoders)]
        graphs = graphed_unet(unet, config, accelerator, events)
        unet_call = graphs if graphs is not None else unet  # what the loss calls; samples use the UNet itself
        # With one micro-batch per step the graphs' gradient buffers may serve as .grad (nothing
        # adds to them before the optimizer reads them); with several, see cuda_graphs.py.
        keep_gradients = graphs is not None and config.gradient_accumulation_steps > 1
        if keep_gradients:
            own_gradients(trained_parameters)

        epoch, position = (state.epoch, state.position) if state else (0, 0)
        batches = batch_stream(instance_data, epoch, position, config)
        _emit_start(config, base, instance_data, step, accelerator, events)
        samples: list[Path] = []
        losses = LossReadout(late=read_loss_late(device))
        if replaced and main:  # only now: a run that fails to start must not have cost them
            _delete_checkpoints(replaced, events)

        # --- the loop: one iteration = one optimizer step -----------------------------------
        trained = [unet, *trained_encoders]  # train mode: LoRA dropout and gradient checkpointing act
        for module in trained:
            module.train()
        while step < config.max_train_steps:
            started = time.perf_counter()
            step_loss = torch.zeros((), device=device)
            done_until = (epoch, position)  # where a checkpoint of the steps done so far continues
            try:
                for micro in range(config.gradient_accumulation_steps):
                    epoch, position, batch, first_sample = _next_share(batches, accelerator)
                    # The global index of this micro-batch seeds its noise: N processes x 1 micro-batch
                    # draw what 1 process x N micro-batches would.
                    index = (step * config.gradient_accumulation_steps + micro) * accelerator.num_processes \
                        + accelerator.process_index
                    rng = torch.Generator().manual_seed(derive_seed(config.seed, index))
                    torch.manual_seed(derive_seed(config.seed, index, 1))  # LoRA dropout
                    sync = micro == config.gradient_accumulation_steps - 1
                    with nullcontext() if sync else accelerator.no_sync(unet):
                        latents, embeds, added, weights = _batch_inputs(batch, index, first_sample, instance_data,
                                                                        class_data, base, encoders, cache, config, rng,
                                                                        device, weight_dtype)
                        with accelerator.autocast():
                            loss = diffusion_loss(unet_call, base.noise_scheduler, latents, embeds, added, config, rng,
                                                  num_instance=len(batch), loss_weights=weights)
                        accelerator.backward(loss / config.gradient_accumulation_steps)
                    step_loss += loss.detach().float() / config.gradient_accumulation_steps
                if config.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(trained_parameters, config.max_grad_norm)
            except Exception as failure:  # out of memory, most often: the steps done so far are still in memory
                steps_done = _training_state(step, *done_until, unet, optimizer, lr_scheduler, accelerator, base, config,
                                             manifest, class_manifest)
                raise _after_failed_step(failure, steps_done, base, accelerator.unwrap_model(unet), instance_data,
                                         config, events, last_checkpoint, losses, main) from failure
            optimizer.step()
            lr = lr_scheduler.get_last_lr()[0]  # the rate this step used (step() moves it to the next one's)
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=not keep_gradients)
            step += 1
            position += 1  # the next batch to read after this step
            step_loss = accelerator.reduce(step_loss, reduction="mean")
            # On a GPU this reads the previous step's loss, not this one's (loss_readout.py).
            for done in losses.push(step, step_loss, lr, started):
                _report_step(done, config, events, last_checkpoint, accelerator.mixed_precision)

            finished = step >= config.max_train_steps
            stopping = not finished and _stop_everywhere(stop, accelerator)  # at the last step: finish
            checkpointing = config.checkpoint_every and step % config.checkpoint_every == 0 or stopping or finished
            sampling = config.sample_every and step % config.sample_every == 0 and not finished  # (main only)
            if checkpointing or sampling:  # nothing is saved or sampled from a step whose loss was not read
                for done in losses.flush():
                    _report_step(done, config, events, last_checkpoint, accelerator.mixed_precision)
            if checkpointing:
                state = _training_state(step, epoch, position, unet, optimizer, lr_scheduler, accelerator, base, config,
                                        manifest, class_manifest)
                last_checkpoint = _checkpoint(state, base, accelerator, unet, instance_data, config, events,
                                              last_checkpoint)
            if stopping:
                partial = _export_partial_lora(lora_path, step, base, accelerator, unet, instance_data, config, events,
                                               last_checkpoint, stop)
                return TrainResult("stopped", step, partial, samples, last_checkpoint)
            if main and sampling:
                samples += _sample(base, accelerator.unwrap_model(unet), config, step, events, accelerator,
                                   stop, offloaded=offload, graphs=graphs)
                for module in trained:
                    module.train()

        # --- the finished LoRA ---------------------------------------------------------------
        written = _export_finished_lora(lora_path, step, base, accelerator, unet, instance_data, config, events,
                                        stop, samples, offload, graphs)
        return TrainResult("done", step, written, samples, last_checkpoint)
    except _Stopped:  # only raised before the first step: a resumed run's checkpoint is still the one to resume
        return _stopped_before_training(config, state, step, events, stop)
    except BaseException as e:
        failure = _report_failure(e, step, last_checkpoint, losses, config, events, accelerator.mixed_precision)
        if failure is e:
            raise
        raise failure from e
    finally:
        if graphs is not None:  # their memory, for whatever runs next in this process
            graphs.release()
        stop.close()
        events.close()


# --- the steps of `train`, in its order ------------------------------------------------------------

def _make_accelerator(config: TrainConfig):
    """A fresh `Accelerator` in the run's precision, CPU or GPU."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import AutocastKwargs, InitProcessGroupKwargs

    # accelerate keeps one state per process; a second run in the same process (a test, a
    # library user) may ask for another precision. The distributed setup (PartialState) stays.
    AcceleratorState._reset_state()
    # Autocast's cache of cast weights is off: a CUDA graph captured while it holds the LoRA
    # weights' casts would replay them stale (cuda_graphs.py). A training forward casts each
    # LoRA weight once anyway; sampling casts them again at every denoising step (negligible).
    return Accelerator(mixed_precision=resolve_mixed_precision(config), cpu=use_cpu(),
                       kwargs_handlers=[InitProcessGroupKwargs(timeout=PROCESS_GROUP_TIMEOUT),
                                        AutocastKwargs(cache_enabled=False)])


def _checkpoint_to_resume(config: TrainConfig, accelerator, lora_path: Path,
                          events: EventWriter) -> TrainingState | None:
    """The checkpoint this run continues (None for a fresh run), after the checks that need no model."""
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        # accelerate does not autocast fp16 on the CPU: fp16 weights would meet fp32 inputs in the first layer
        raise InputError("mixed_precision 'fp16' needs a GPU, and this run is on the CPU; choose 'auto', "
                         "'bf16' or 'no'")
    optimizer_package(config.optimizer)  # a missing one found now, not after the class images
    resume_from = resolve_resume(config)
    if lora_path.exists() and not config.overwrite and resume_from is None:
        raise InputError(f"{lora_path} already exists; choose another output_name, "
                         "or set overwrite = true (or resume = true to continue its run)")
    state = load_checkpoint(resume_from, config, accelerator.mixed_precision) if resume_from else None
    if config.resume and state is None:
        events.log(f"resume = true: no checkpoint in {config.output_dir}, starting from step 0", level="info")
    if state is not None and config.lr_scheduler != "constant" \
            and state.config["max_train_steps"] != config.max_train_steps:
        events.log(f"max_train_steps changed from {state.config['max_train_steps']} to {config.max_train_steps} on "
                   f"resume: the {config.lr_scheduler!r} learning-rate schedule now spans {config.max_train_steps} "
                   f"steps, so the learning rate jumps at step {state.step} (the run matches neither length run "
                   "uninterrupted)")
    return state


def _instance_data(config: TrainConfig, state: TrainingState | None,
                   events: EventWriter) -> tuple[ImageDataset, list[list]]:
    """The instance images as a dataset, and their manifest (what a resumed run must find again)."""
    scan = scan_images(Path(config.instance_dir), config.instance_prompt, config)
    manifest = dataset_manifest(scan)
    if state is not None:
        check_same_dataset(state, manifest, scan.folder)
    for warning in scan.warnings:
        events.log(warning)
    return ImageDataset(scan, config), manifest


def _attach_lora(base: BaseModel, config: TrainConfig, accelerator) -> None:
    """The new (zero) LoRA layers on the UNet and the text encoders, and the casts mixed precision can skip."""
    add_lora(base.unet, base.text_encoders, config)
    if accelerator.native_amp and not config.use_dora and config.lora_dropout == 0:
        # every UNet call below is under autocast, which undoes the cast (see the docstring)
        skip_lora_input_casts(base.unet)
    if accelerator.native_amp:  # else CUDA autocast runs the norms in fp32 and casts to and fro (precision.py)
        compute_norms_in_input_dtype(base.unet)


def _class_data(config: TrainConfig, base: BaseModel, state: TrainingState | None, events: EventWriter,
                stop: StopRequest, accelerator, offload: bool) -> tuple[ImageDataset | None, list[list] | None]:
    """The class images (prior preservation) as a dataset and their manifest; (None, None) without."""
    if not config.with_prior_preservation:
        return None, None
    # On the training device and precision; the new LoRA is still zero, so this is the base model.
    class_data = _prepare_class_data(config, base, events, stop, accelerator.is_main_process, accelerator,
                                     offloaded=offload)
    class_manifest = dataset_manifest(class_data.scan)
    if state is not None:
        check_same_dataset(state, class_manifest, class_data.scan.folder, class_images=True)
    return class_data, class_manifest


def _make_trainable(base: BaseModel, config: TrainConfig, state: TrainingState | None) -> None:
    """The resumed LoRA weights, gradient checkpointing and compilation, once the models are placed."""
    if state is not None:  # after placing, so the fp32 LoRA weights never pass through fp16
        load_lora_state(base.unet, base.text_encoders, state.lora)
    if config.gradient_checkpointing:
        base.unet.enable_gradient_checkpointing()
        for encoder in base.text_encoders if config.train_text_encoder else []:
            encoder.gradient_checkpointing_enable()
    if config.compile_unet:
        base.unet.compile()  # in place: module names, and so export and checkpoints, stay as they are


def _log_settings_without_effect(config: TrainConfig, offload: bool, events: EventWriter) -> None:
    """Warn about settings that do less than their name says with the rest of this config."""
    if config.cache_latents == "yes" and config.augments:
        events.log("cache_latents = 'yes' with augmentation (flip_p, random crop, caption shuffle or dropout): "
                   "each image's first draw is cached and reused on every step; 'auto' turns the cache off "
                   "for augmented runs")
    if config.offload_frozen_models and not offload:
        events.log("offload_frozen_models has no effect: it needs cached latents (no augmentation, "
                   "cache_latents not 'no') and no text-encoder training", level="info")


def _optimization(base: BaseModel, config: TrainConfig, state: TrainingState | None, device: torch.device):
    """(optimizer, learning-rate scheduler, trained parameters), in the resumed state if any: the UNet's
    LoRA at learning_rate, each trained text encoder's at text_encoder_lr (or learning_rate)."""
    param_groups = [{"params": lora_parameters(base.unet), "lr": config.learning_rate}]
    for encoder in base.text_encoders if config.train_text_encoder else []:
        param_groups.append({"params": lora_parameters(encoder), "lr": config.text_encoder_lr or config.learning_rate})
    optimizer = build_optimizer(config, param_groups, device)
    lr_scheduler = build_lr_scheduler(config, optimizer)
    if state is not None:
        optimizer.load_state_dict(state.optimizer)
        lr_scheduler.load_state_dict(state.lr_scheduler)
    return optimizer, lr_scheduler, [p for group in param_groups for p in group["params"]]


def _emit_start(config: TrainConfig, base: BaseModel, data: ImageDataset, step: int, accelerator,
                events: EventWriter) -> None:
    """The `start` event (and a note when step 1 will take minutes)."""
    events.emit("start", total_steps=config.max_train_steps, start_step=step, model=base.info.variant,
                num_images=len(data), buckets=sorted({tuple(b) for b in data.buckets}),
                device=str(accelerator.device), mixed_precision=accelerator.mixed_precision, summary=data.summary())
    if config.compile_unet:  # minutes without a step would look like a hang
        events.log("compile_unet: step 1 compiles the UNet, minutes the first time (later runs with the same "
                   "model and resolution reuse inductor's cache)", level="info")


def _delete_checkpoints(replaced: list[Path], events: EventWriter) -> None:
    """Delete the checkpoints of another run that overwrite replaces (see `_checkpoints_of_another_run`)."""
    for path in replaced:  # a failure raises: a checkpoint left there would be mixed with this run's
        shutil.rmtree(path)
    events.log(f"overwrite: deleted the checkpoints this run did not write "
               f"({', '.join(p.name for p in replaced)})", level="info")


def _next_share(batches: Iterator[tuple[int, int, list[int], int]], accelerator) -> tuple[int, int, list[int], int]:
    """This process's batch of the next micro-batch: (epoch, position, batch, samples drawn before it).

    Every process reads the same batch stream and keeps its own share, so the data order, and
    the checkpointed position, do not depend on the process count.
    """
    for rank in range(accelerator.num_processes):
        epoch, position, drawn, ordinal = next(batches)
        if rank == accelerator.process_index:
            batch, first_sample = drawn, ordinal
    return epoch, position, batch, first_sample


def _checkpoint(state: TrainingState, base: BaseModel, accelerator, unet, data: ImageDataset, config: TrainConfig,
                events: EventWriter, last_checkpoint: Path | None) -> Path | None:
    """Write `state` as a checkpoint (the main process; the others wait for it); returns the newest checkpoint."""
    _check_finite_weights(state, last_checkpoint)
    if accelerator.is_main_process:
        last_checkpoint = _write_checkpoint(state, base, accelerator.unwrap_model(unet), data, config, events)
    accelerator.wait_for_everyone()
    return last_checkpoint


def _export_partial_lora(lora_path: Path, step: int, base: BaseModel, accelerator, unet, data: ImageDataset,
                         config: TrainConfig, events: EventWriter, last_checkpoint: Path | None,
                         stop: StopRequest) -> list[Path]:
    """After a graceful stop: the LoRA of the steps done, as `<output_name>_step<N>`, and the `stopped` event."""
    if not accelerator.is_main_process:
        return []
    partial = export_lora(lora_path.with_name(partial_lora_name(config.output_name, step)),
                          accelerator.unwrap_model(unet), base.text_encoders, base.info.arch, config,
                          _metadata(config, base, step, data))
    events.emit("stopped", step=step, checkpoint=str(last_checkpoint), lora=[str(p) for p in partial],
                reason=stop.reason)
    return partial


def _export_finished_lora(lora_path: Path, step: int, base: BaseModel, accelerator, unet, data: ImageDataset,
                          config: TrainConfig, events: EventWriter, stop: StopRequest, samples: list[Path],
                          offload: bool, graphs: GraphedUNet | None) -> list[Path]:
    """The finished LoRA, then the end-of-run samples (added to `samples`) and the `done` event."""
    stopped_at_the_end = stop.requested()  # asked during the last step, which then finished
    written = []
    if accelerator.is_main_process:  # the LoRA first: samples that fail must not cost it
        events.emit("exporting", step=step, lora=str(lora_path))
        written = export_lora(lora_path, accelerator.unwrap_model(unet), base.text_encoders, base.info.arch,
                              config, _metadata(config, base, step, data))
        if config.sample_at_end and stopped_at_the_end:
            events.log("a stop was asked during the last step: the run finished and its LoRA is written; the "
                       "end-of-run samples are skipped", level="info")
        elif config.sample_at_end:
            samples += _sample(base, accelerator.unwrap_model(unet), config, step, events, accelerator,
                               stop, offloaded=offload, graphs=graphs)
        events.emit("done", step=step, lora=[str(p) for p in written], samples=[str(p) for p in samples])
    accelerator.wait_for_everyone()
    return written


def _report_failure(error: BaseException, step: int, last_checkpoint: Path | None, losses: LossReadout | None,
                    config: TrainConfig, events: EventWriter, precision: str) -> BaseException:
    """The `error` event of a run that failed; returns the exception to raise (`error` itself, or a
    clearer one for a full disk)."""
    if losses is not None:  # the steps done before the failure still get their events
        with suppress(Exception):  # (unless the device is what failed, or their loss is not finite)
            for done in losses.flush():
                _report_step(done, config, events, None, precision)
    failure = _out_of_disk_space(error, last_checkpoint) if isinstance(error, DiskFullError) else error
    if isinstance(error, ForcedStop):
        error.last_checkpoint = last_checkpoint
    events.emit("error", message=str(failure), kind=type(failure).__name__,
                step=getattr(failure, "step", None) or step)
    return failure


def _stopped_before_training(config: TrainConfig, state: TrainingState | None, step: int, events: EventWriter,
                             stop: StopRequest) -> TrainResult:
    """A run stopped before its first step: the `stopped` event, with what it leaves in words."""
    checkpoint = state.path if state is not None else None
    kept = []
    if checkpoint is not None:
        kept.append(f"the checkpoint {checkpoint} is still the one to resume")
    if config.with_prior_preservation and count_images(Path(config.class_dir)):
        kept.append(f"the class images in {config.class_dir} are kept for the next run")
    summary = "stopped before training; " + ("; ".join(kept) if kept else "nothing written")
    events.emit("stopped", step=step, checkpoint=str(checkpoint) if checkpoint else None, lora=[],
                reason=stop.reason, summary=summary)
    return TrainResult("stopped", step, checkpoint=checkpoint, summary=summary)


def _remove_leftovers(config: TrainConfig, lora_path: Path, events: EventWriter) -> None:
    """Remove the temporary files and half checkpoints an interrupted run of this name left behind.

    Only names this pack's writes make for this run (fileio.atomic_write's `.<name>.<random>.tmp`):
    in the LoRA folder, which other programs share, those of this output_name's LoRA files alone.
    """
    name = re.escape(config.output_name)
    loras = rf"{name}(?:_step\d{{6}})?(?:\.diffusers)?\.safetensors"  # finished, partial; kohya or diffusers
    output_dir = Path(config.output_dir)
    stale = [*stale_temp_files(lora_path.parent, re.compile(loras)), *stale_temp_files(output_dir, re.compile(loras)),
             *stale_temp_files(samples_dir(output_dir), SAMPLE_NAME)]
    if config.with_prior_preservation and config.class_dir:
        stale += stale_temp_files(Path(config.class_dir), re.compile(r"class_\d+_\d{5}\.png"))
    stale = list(dict.fromkeys(stale))  # (the LoRA folder may be the run folder)
    for path in stale:
        path.unlink(missing_ok=True)
    stale += remove_stale_checkpoint_folders(output_dir)
    if stale:
        events.log(f"removed {len(stale)} temporary file(s) an interrupted run left: "
                   f"{', '.join(str(p) for p in stale)}", level="info")


def _checkpoints_of_another_run(config: TrainConfig, state: TrainingState | None) -> list[Path]:
    """Checkpoints in output_dir this run did not write, which it must not mix with: an earlier run's,
    for a fresh run, or those after the checkpoint a run resumes from. Left there, `resume` and the
    pruning (which go by step) would take them for this run's: a resumed run could pick the other
    run's last state and finish with its LoRA. Without `overwrite` they are refused; with it they are
    returned, for `train` to delete once the run has got as far as its first step.
    """
    later = checkpoints_after(Path(config.output_dir), state.step if state else 0)
    if not later or config.overwrite:
        return later
    root, names = later[0].parent, ", ".join(p.name for p in later)
    if state is not None:
        raise InputError(f"{root} holds checkpoints after {state.path.name}, which this run resumes from ({names}); "
                         "this run would mix with them. Set overwrite = true to delete them, resume = true, "
                         "or choose another output_dir.")
    raise InputError(f"{root} holds checkpoints of an earlier run ({names}); this run would mix with them. "
                     "Set resume = true to continue that run, overwrite = true to delete them and start "
                     "over, or choose another output_dir.")


def _training_state(step: int, epoch: int, position: int, unet, optimizer, lr_scheduler, accelerator, base: BaseModel,
                    config: TrainConfig, manifest: list[list], class_manifest: list[list] | None) -> TrainingState:
    """What a checkpoint of `step` holds; (`epoch`, `position`): the next batch to read; the manifests
    of the instance and class images and the base model's hash: what a resume must find again."""
    return TrainingState(step=step, epoch=epoch, position=position,
                         lora=lora_state(accelerator.unwrap_model(unet), base.text_encoders),
                         optimizer=optimizer.state_dict(), lr_scheduler=lr_scheduler.state_dict(),
                         config=config.to_dict(), path=Path(config.output_dir),
                         mixed_precision=accelerator.mixed_precision, dataset=manifest,
                         scaler=accelerator.scaler.state_dict() if accelerator.scaler else None,
                         class_dataset=class_manifest, base_model_sha256=base.sha256())


def _after_failed_step(failure: Exception, steps_done: TrainingState, base: BaseModel, unet, data: ImageDataset,
                       config: TrainConfig, events: EventWriter, last_checkpoint: Path | None,
                       losses: LossReadout, main: bool) -> StepFailed:
    """Save the steps done before a step that raised (an emergency checkpoint), and say what was kept.

    Nothing is saved when the last checkpoint already holds them, on processes other than the main
    one, or when their loss or weights are not finite; a save that fails too keeps the previous checkpoint.
    """
    out_of_memory = isinstance(failure, torch.cuda.OutOfMemoryError) or "out of memory" in str(failure).lower()
    traceback.clear_frames(failure.__traceback__)  # their tensors (the failed step's activations) are freed
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    step = steps_done.step
    summary = (str(failure).strip().splitlines() or [""])[0]
    what = f"step {step + 1} failed ({type(failure).__name__}: {summary})"
    if step == 0:
        kept = "No step was done; nothing was written"
    elif checkpoint_dir(config.output_dir, step).is_dir():
        kept = f"The {step} steps done are in the checkpoint {last_checkpoint}; resume = true continues from it"
    elif not main:
        kept = "The main process saves the steps done"
    else:
        try:
            for done in losses.flush():  # a loss read late (on a GPU) that is not finite: nothing is saved
                _report_step(done, config, events, last_checkpoint, steps_done.mixed_precision)
            _check_finite_weights(steps_done, last_checkpoint)
            path = _write_checkpoint(steps_done, base, unet, data, config, events)
            kept = f"The {step} steps done are saved in {path}; resume = true continues from there"
        except Exception as e:  # noqa: BLE001 - whatever it is, the previous checkpoint stays
            kept = (f"Saving the {step} steps done failed too ({e}); the last good checkpoint, "
                    f"{last_checkpoint or 'none'}, is kept")
    advice = ""
    if out_of_memory:
        advice = (" The GPU ran out of memory: choose a smaller memory_preset (DreamBooth Memory & Speed), or turn "
                  "on gradient_checkpointing, lower batch_size (or resolution), or cache the latents (cache_latents "
                  "'auto' without augmentation) with offload_frozen_models on; then resume.")
    return StepFailed(f"{what}. {kept}.{advice}", step=step + 1, out_of_memory=out_of_memory)


def _out_of_disk_space(error: DiskFullError, last_checkpoint: Path | None) -> OutOfDiskSpace:
    """A full disk's error, with what the run keeps and how it continues."""
    if last_checkpoint is None:
        return OutOfDiskSpace(f"{error}; no checkpoint was written yet, so the run starts over.")
    return OutOfDiskSpace(f"{error}, then resume = true continues from the last good checkpoint, "
                          f"{last_checkpoint}.")


def _check_finite_weights(state: TrainingState, last_checkpoint: Path | None) -> None:
    """Refuse to save LoRA weights that are not finite (an update can break them with a finite loss)."""
    broken = [name for name, weight in state.lora.items() if not torch.isfinite(weight).all()]
    if broken:
        raise TrainingError(f"the LoRA weights stopped being finite by step {state.step} ({len(broken)} tensors, e.g. "
                            f"{broken[0]}); nothing from this step was saved (last good checkpoint: "
                            f"{last_checkpoint or 'none'}). {_divergence_advice(state.mixed_precision)}",
                            step=state.step)


def _divergence_advice(precision: str, updated: bool = True) -> str:
    """What to change after a NaN or inf, given the precision the run computed in and whether any
    optimizer update had happened: before the first one the learning rate cannot be the cause."""
    fp16 = precision == "fp16"
    if not updated:
        return ("No update had happened yet, so the learning rate is not the cause: the base model or the training "
                "data gives values that are not finite" + (" (or fp16 overflowed: use mixed_precision 'bf16' or "
                "'no')" if fp16 else "") + ". Try another base model, or re-download / re-export this one, and "
                "check the pictures.")
    return "Lower learning_rate" + (", or use mixed_precision 'bf16' or 'no'." if fp16 else ".")


def read_loss_late(device: torch.device) -> bool:
    """Whether each step's loss is read one step late: on a GPU, which then never waits for the host
    between steps. On a CPU the loss is ready when the step returns; reading it late would only
    delay the progress shown."""
    return device.type == "cuda"


def _report_step(done: StepLoss, config: TrainConfig, events: EventWriter, last_checkpoint: Path | None,
                 precision: str) -> None:
    """The step event of a step whose loss is now read; a loss that is not finite ends the run."""
    if not math.isfinite(done.loss):
        # Step N's loss is computed before its update: at step 1 the weights are the base model's.
        raise TrainingError(f"the loss became {done.loss} at step {done.step}; nothing from this step was saved "
                            f"(last good checkpoint: {last_checkpoint or 'none'}). "
                            f"{_divergence_advice(precision, updated=done.step > 1)}", step=done.step)
    events.emit("step", step=done.step, total_steps=config.max_train_steps, loss=round(done.loss, 6), lr=done.lr,
                seconds_per_step=round(done.seconds, 4))


def graphed_unet(unet, config: TrainConfig, accelerator, events: EventWriter) -> GraphedUNet | None:
    """The UNet's training call replayed as CUDA graphs (cuda_graphs.py), where they can work and are asked for."""
    from accelerate.utils import DistributedType

    if config.cuda_graphs == "no":
        return None
    if accelerator.device.type != "cuda":
        reason = f"they need a CUDA GPU (this run is on {accelerator.device.type})"
    elif accelerator.distributed_type != DistributedType.NO:
        reason = "they are for one process (several processes synchronise gradients outside the graphs)"
    elif config.compile_unet:
        reason = "compile_unet is on"
    elif config.cuda_graphs == "auto" and accelerator.mixed_precision == "no":
        # Every GPU check of graphs trained in bf16 or fp16; one capture of an fp32 UNet there failed (benchmarks/README.md).
        reason = "'auto' leaves them off in fp32 (mixed_precision 'no'), not yet checked on a GPU ('yes' turns them on)"
    elif config.cuda_graphs == "auto" and config.network != "lora":
        reason = f"'auto' leaves them off for network '{config.network}', not yet checked on a GPU ('yes' turns them on)"
    else:
        return GraphedUNet(unet, log=events.log)
    if config.cuda_graphs == "yes":
        events.log(f"cuda_graphs = 'yes', but they are not used: {reason}")
    elif accelerator.device.type == "cuda":  # 'auto' on a CPU asked nothing of them
        events.log(f"cuda_graphs: not used, {reason}", level="info")
    return None


# --- the loss ------------------------------------------------------------------------------------

def diffusion_loss(unet, noise_scheduler, latents: torch.Tensor, embeds: torch.Tensor, added: dict | None,
                   config: TrainConfig, rng: torch.Generator, num_instance: int,
                   loss_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Denoising loss of one batch; the first `num_instance` samples are instance images, the rest class images.

    Noise and timesteps come from `rng` (seeded per step), so a resumed run draws the same ones.
    `loss_weights` (B, 1, h, w) weight each latent pixel's squared error (masked training, `mask_loss_weights`).
    """
    device = latents.device
    noise = host_to_device(torch.randn(latents.shape, generator=rng), device)
    if config.noise_offset:
        noise += config.noise_offset * host_to_device(torch.randn((*latents.shape[:2], 1, 1), generator=rng), device)
    num_timesteps = noise_scheduler.config.num_train_timesteps
    timesteps = host_to_device(torch.randint(0, num_timesteps, (latents.shape[0],), generator=rng), device)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    if noise_scheduler.config.prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    prediction = unet(noisy, timesteps, embeds, added_cond_kwargs=added).sample
    squared_error = F.mse_loss(prediction.float(), target.float(), reduction="none")
    if loss_weights is not None:
        squared_error = squared_error * loss_weights
    loss = squared_error.mean(dim=(1, 2, 3))
    if config.snr_gamma:
        loss = loss * min_snr_weights(noise_scheduler, timesteps, config.snr_gamma)
    instance_loss = loss[:num_instance].mean()
    if loss.shape[0] == num_instance:
        return instance_loss
    return instance_loss + config.prior_loss_weight * loss[num_instance:].mean()


def mask_loss_weights(samples: list[Sample], latent_size: tuple[int, int], floor: float) -> torch.Tensor | None:
    """Loss weights (B, 1, h, w) at latent resolution from the samples' masks: each mask averaged over the
    pixels of a latent pixel (area), then mapped from [0, 1] to [floor, 1]; 1 for a sample without a mask.
    None when no sample has a mask or `floor` is 1 (the plain loss).

    The weighted error is averaged over all pixels (not over the mask's area), as kohya does: a pixel's
    gradient is scaled by its weight whatever the size of the subject, so learning_rate keeps its meaning.
    """
    if floor >= 1 or all(s.mask is None for s in samples):
        return None
    masks = [torch.ones(1, *latent_size) if s.mask is None else latent_mask(s.mask, latent_size) for s in samples]
    return floor + (1.0 - floor) * torch.stack(masks)


def latent_mask(mask: torch.Tensor, latent_size: tuple[int, int]) -> torch.Tensor:
    """A (1, H, W) mask averaged down to (1, h, w) = `latent_size` (unchanged when already that size)."""
    return F.interpolate(mask[None], size=latent_size, mode="area")[0]


def host_to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`tensor.to(device)` without making the host wait for the GPU.

    torch copies from pageable memory to a GPU only once the work queued before has finished (a
    stream synchronisation per copy); from pinned memory it copies asynchronously, and its pinned
    cache keeps the source until the copy has run. So a step's noise and timesteps reach the GPU
    while it still runs the previous step, which the host can then run ahead of (loss_readout.py).
    """
    if device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def min_snr_weights(noise_scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023), for epsilon and v targets."""
    alphas_cumprod = noise_scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    # At least tiny: a zero-terminal-SNR schedule's last timestep has an SNR of 0, whose weight
    # 0/0 was NaN; min(snr, gamma) / snr tends to 1 there (and v's to 0).
    snr = (alphas_cumprod / (1 - alphas_cumprod)).clamp(min=torch.finfo(torch.float32).tiny)
    clipped = torch.clamp(snr, max=gamma)
    if noise_scheduler.config.prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped / snr


# --- inputs of a step ------------------------------------------------------------------------------

class ConditioningCache:
    """Latent distributions and prompt embeddings computed once per sample (keyed by the sample).

    Only used when nothing that changes them (augmentation, caption shuffle/dropout,
    text-encoder training) is on; otherwise every lookup computes afresh.
    """

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.latents: dict[str, tuple[Sample, torch.Tensor, torch.Tensor]] = {}  # pixels dropped
        self.prompts: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}


def _batch_inputs(batch, index, first_sample, instance_data, class_data, base: BaseModel, encoders, cache,
                  config: TrainConfig, rng, device, weight_dtype):
    """Latents, prompt embeddings, SDXL added conditioning and the masks' loss weights (or None) for
    micro-batch `index` (+ class images, which have no masks).

    `index` (the run's micro-batch number) and each image's place in the batch are its augmentation
    draw: every time an image comes round (in a later epoch, as a repeat in the same one, or twice in
    one batch) it is augmented afresh. `first_sample`: how many samples the run drew before this batch."""
    bucket = instance_data.buckets[batch[0]]
    parts = [(instance_data, i) for i in batch]
    if class_data is not None:
        # one class image per instance sample, in turn (by the run's sample count, so a bucket's
        # last, smaller batch skips none), the same ones whatever the process count
        parts += [(class_data, (first_sample + j) % len(class_data)) for j in range(len(batch))]
    samples, means, stds = [], [], []
    for slot, (dataset, item) in enumerate(parts):
        sample, mean, std = encode_image(dataset, item, bucket, (index, slot), base, cache, config, device)
        samples.append(sample)
        means.append(mean)
        stds.append(std)
    mean, std = torch.cat(means), torch.cat(stds)
    latents = mean + std * host_to_device(torch.randn(mean.shape, generator=rng), device)
    latents = (latents * base.vae.config.scaling_factor).to(weight_dtype)

    captions = [s.caption for s in samples]
    embeds, pooled = _encode_captions(captions, base, encoders, cache, device, config.train_text_encoder)
    added = None
    if base.info.arch == "sdxl":
        time_ids = torch.stack([sdxl_time_ids(s.original_size, s.crop_top_left, s.target_size) for s in samples])
        added = {"text_embeds": pooled.to(weight_dtype), "time_ids": host_to_device(time_ids, device).to(weight_dtype)}
    weights = mask_loss_weights(samples, tuple(latents.shape[-2:]), config.mask_floor)
    if weights is not None:
        weights = host_to_device(weights, device)
    return latents, embeds.to(weight_dtype), added, weights


def encode_image(dataset: ImageDataset, index: int, bucket, draw: int | tuple[int, int], base: BaseModel, cache,
                  config: TrainConfig, device) -> tuple[Sample, torch.Tensor, torch.Tensor]:
    """A sample (without its pixels once cached) and its latent distribution's mean and std."""
    key = dataset.cache_key(index, bucket)
    if cache.enabled and key in cache.latents:
        # Nothing augments a cached sample, so its image need not be read and resized again.
        return cache.latents[key]
    # A cached sample keeps one augmentation: draw 0, the same whichever step first meets it (a
    # resumed run's cache starts empty; fill_cache draws 0 too), or a resume would train another LoRA.
    sample = dataset.prepare(index, bucket, draw=0 if cache.enabled else draw, seed=config.seed)
    with torch.no_grad():
        dist = base.vae.encode(host_to_device(sample.pixels[None], device).to(base.vae.dtype)).latent_dist
    mean, std = dist.mean.float(), dist.std.float()
    if cache.enabled:  # the mask is kept at latent resolution, all the loss needs
        mask = None if sample.mask is None else latent_mask(sample.mask, tuple(mean.shape[-2:]))
        cache.latents[key] = (dataclasses.replace(sample, pixels=None, mask=mask), mean, std)
    return sample, mean, std


def fill_cache(instance_data: ImageDataset, class_data: ImageDataset | None, base: BaseModel, encoders, cache,
                config: TrainConfig, device) -> None:
    """Encode what any step can ask for: each instance image at its bucket, each class image at every
    instance bucket (class images take the bucket of the batch they join), and every caption."""
    for index, bucket in enumerate(instance_data.buckets):
        encode_image(instance_data, index, bucket, 0, base, cache, config, device)
    if class_data is not None:
        for bucket in sorted({tuple(b) for b in instance_data.buckets}):
            for index in range(len(class_data)):
                encode_image(class_data, index, bucket, 0, base, cache, config, device)
    for caption in sorted({sample.caption for sample, _, _ in cache.latents.values()}):
        _encode_captions([caption], base, encoders, cache, device, trained=False)


def _fill_cache_then_offload(instance_data: ImageDataset, class_data: ImageDataset | None, base: BaseModel, cache,
                             config: TrainConfig, device) -> None:
    """Encode every latent and caption, then keep the VAE and text encoders in CPU memory and
    bring the UNet to the device.

    Until then the UNet waits in CPU memory (`place_models(unet_waits=True)`; class-image
    generation returns it there): SDXL's fp32 VAE encoding a 1024 px image beside the UNet was
    a run's memory peak (9.8 GB, against 6.4 GB while stepping; benchmarks/README.md).
    """
    fill_cache(instance_data, class_data, base, base.text_encoders, cache, config, device)
    _move_frozen_models(base, torch.device("cpu"))
    torch.nn.Module.to(base.unet, device)


def _move_frozen_models(base: BaseModel, device: torch.device) -> None:
    """The VAE and text encoders (frozen, not trained) to `device`."""
    for module in (base.vae, *base.text_encoders):
        module.to(device)
    if device.type == "cpu" and torch.cuda.is_available():
        torch.cuda.empty_cache()  # give their blocks back, not only to this process's cache


def _encode_captions(captions, base: BaseModel, encoders, cache, device, trained: bool):
    """Prompt embeddings (and SDXL's pooled one) of `captions`; from the cache unless the text
    encoders train (`trained`), whose LoRA would get no gradient through a cached embedding."""
    if cache.enabled and not trained and all(c in cache.prompts for c in captions):
        found = [cache.prompts[c] for c in captions]
        embeds = torch.cat([e for e, _ in found])
        pooled = torch.cat([p for _, p in found]) if found[0][1] is not None else None
        return embeds, pooled
    ids = [host_to_device(tokenize(tok, captions), device) for tok in base.tokenizers]
    with torch.set_grad_enabled(trained):
        embeds, pooled = encode_prompts(base.info.arch, encoders, ids)
    if cache.enabled and not trained:
        for i, caption in enumerate(captions):
            cache.prompts[caption] = (embeds[i:i + 1].detach(), None if pooled is None else pooled[i:i + 1].detach())
    return embeds, pooled


def batch_stream(dataset: ImageDataset, epoch: int, position: int,
                 config: TrainConfig) -> Iterator[tuple[int, int, list[int], int]]:
    """(epoch, position, batch, samples the run drew before it) from a given point on, forever;
    the order depends only on the seed."""
    while True:
        batches = dataset.epoch_batches(epoch, config.batch_size, config.seed)
        drawn = epoch * sum(map(len, batches)) + sum(map(len, batches[:position]))  # every epoch has as many
        while position < len(batches):
            yield epoch, position, batches[position], drawn
            drawn += len(batches[position])
            position += 1
        epoch, position = epoch + 1, 0


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers, so each (run seed, step, micro-batch) gets its own stream."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


# --- building blocks -------------------------------------------------------------------------------

def use_cpu() -> bool:
    """Train on the CPU when there is no GPU or ACCELERATE_USE_CPU asks for it.

    Saying so explicitly also makes several processes on a CPU-only machine
    (`accelerate launch --multi_gpu`) talk over gloo instead of each training alone.
    """
    from accelerate.utils import parse_flag_from_env

    return parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available()


def resolve_mixed_precision(config: TrainConfig) -> str:
    """'auto' -> bf16 where the hardware computes in bf16, else fp16 on a GPU and fp32 ('no') on a CPU.

    LoRA weights stay fp32 either way; only the frozen weights and the compute are bf16.
    """
    if config.mixed_precision != "auto":
        return config.mixed_precision
    if use_cpu():
        return "bf16" if cpu_has_native_bf16() else "no"
    # Ampere (compute capability 8) and later; torch.cuda.is_bf16_supported() also says yes
    # to older cards (V100, T4) that only emulate bf16, slowly.
    return "bf16" if torch.cuda.get_device_capability()[0] >= 8 else "fp16"


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX).

    There a bf16 step takes about half the fp32 time (benchmarks/README.md); without it
    torch emulates bf16 and it is slower than fp32.
    """
    checks = (getattr(torch.cpu, "_is_avx512_bf16_supported", None), getattr(torch.cpu, "_is_amx_tile_supported", None))
    return any(check is not None and check() for check in checks)


def build_optimizer(config: TrainConfig, param_groups: list[dict], device: torch.device) -> torch.optim.Optimizer:
    """AdamW (fused on GPU), 8-bit AdamW or Prodigy; a clear error when an optional package is missing."""
    betas = (config.adam_beta1, config.adam_beta2)
    if config.optimizer == "adamw":
        fused = device.type == "cuda"
        return torch.optim.AdamW(param_groups, betas=betas, eps=config.adam_epsilon, weight_decay=config.weight_decay,
                                 fused=fused or None, foreach=None if fused else True)
    package = optimizer_package(config.optimizer)
    if config.optimizer == "adamw8bit":  # bitsandbytes
        return package.optim.AdamW8bit(param_groups, betas=betas, eps=config.adam_epsilon,
                                       weight_decay=config.weight_decay)
    return package.Prodigy(param_groups, betas=betas, weight_decay=config.weight_decay)


OPTIMIZER_PACKAGES = {"adamw8bit": "bitsandbytes", "prodigy": "prodigyopt"}  # the optional ones


def optimizer_package(optimizer: str):
    """The optional package `optimizer` needs, imported (None for AdamW); InputError if it is not installed."""
    package = OPTIMIZER_PACKAGES.get(optimizer)
    if package is None:
        return None
    try:
        return importlib.import_module(package)
    except ImportError as e:
        raise InputError(f"optimizer '{optimizer}' needs the {package} package: pip install {package} "
                         "(or choose optimizer 'adamw')") from e


def build_lr_scheduler(config: TrainConfig, optimizer: torch.optim.Optimizer):
    """Warm-up, then constant, cosine or linear decay over max_train_steps."""
    from diffusers.optimization import get_scheduler

    name = "constant_with_warmup" if config.lr_scheduler == "constant" else config.lr_scheduler
    return get_scheduler(name, optimizer, num_warmup_steps=config.lr_warmup_steps,
                         num_training_steps=config.max_train_steps)


def place_models(base: BaseModel, device, weight_dtype, unet_waits: bool = False) -> None:
    """Frozen weights in the compute dtype, LoRA weights in fp32, everything on the device.

    With `unet_waits` (offload_frozen_models) the UNet stays in CPU memory: it joins the GPU
    once the latents are made (`_fill_cache_then_offload`).
    """
    # torch's own Module.to: diffusers' override warns on every dtype cast, even with nothing to keep in fp32.
    torch.nn.Module.to(base.unet, torch.device("cpu") if unet_waits else device, dtype=weight_dtype,
                       memory_format=unet_memory_format(device))
    vae_dtype = torch.float32 if base.info.arch == "sdxl" else weight_dtype  # SDXL's VAE overflows in fp16
    torch.nn.Module.to(base.vae, device, dtype=vae_dtype)
    for encoder in base.text_encoders:
        encoder.to(device, dtype=weight_dtype)
    for module in (base.unet, *base.text_encoders):
        for p in lora_parameters(module):
            p.data = p.data.float()


def unet_memory_format(device: torch.device) -> torch.memory_format:
    """channels-last on a GPU: cuDNN's convolutions run in NHWC and otherwise convert every
    activation to it and back (19% of an SD1.5 step's GPU time; with CUDA graphs the step
    took 0.033 s instead of 0.036 on an H200). On the CPU it gained 2-6% in bf16 but cost
    2 GB more memory in fp32, so the CPU keeps the default layout."""
    return torch.channels_last if device.type == "cuda" else torch.preserve_format


def _prepare_class_data(config: TrainConfig, base: BaseModel, events: EventWriter, stop: StopRequest, main: bool,
                        accelerator, offloaded: bool = False) -> ImageDataset:
    """Class images for prior preservation: generate the missing ones once, then load them as a dataset.

    `offloaded`: the UNet waits in CPU memory (offload_frozen_models); the models then take
    turns on the GPU while generating.
    """
    class_dir = Path(config.class_dir)
    existing = count_images(class_dir)
    if existing < config.num_class_images and main:
        events.log(f"generating {config.num_class_images - existing} class images for '{config.class_prompt}' "
                   f"in {class_dir} (once; later runs reuse them)", level="info")

        def progress(done: int, total: int) -> None:
            events.emit("class_images", done=done, total=total)
            if stop.requested():
                raise _Stopped

        try:
            with model_placement(base, base.unet, accelerator.device, offloaded) as place:
                ensure_class_images(base, class_dir, config.class_prompt, config.num_class_images,
                                    size=config.resolution, steps=config.class_sample_steps,
                                    guidance=config.sample_guidance, seed=config.seed, existing=existing,
                                    on_progress=progress, autocast=accelerator.autocast, place=place,
                                    per_call=CLASS_IMAGES_PER_MOVE if offloaded else 1)
        except _Stopped:
            pass  # the others wait below; then every process stops together
    accelerator.wait_for_everyone()
    if _stop_everywhere(stop, accelerator):
        raise _Stopped
    class_config = dataclasses.replace(config, caption_mode="prompt", repeats=1)
    scan = scan_images(class_dir, config.class_prompt, class_config, masks=False)
    scan = DatasetScan(scan.folder, scan.items[:config.num_class_images], scan.skipped, scan.warnings)
    return ImageDataset(scan, class_config)


def _metadata(config: TrainConfig, base: BaseModel, step: int, data: ImageDataset) -> dict[str, str]:
    return lora_metadata(config, arch=base.info.arch, base_model_name=base.name, base_model_hash=base.sha256(),
                         steps=step, dataset_summary=dataset_summary(data))


def _write_checkpoint(state: TrainingState, base: BaseModel, unet, data: ImageDataset, config: TrainConfig,
                      events: EventWriter) -> Path:
    partial = kohya_state_dict(unet, base.text_encoders, base.info.arch, config, SAVE_DTYPES[config.save_dtype])
    path = save_checkpoint(Path(config.output_dir), state, partial, _metadata(config, base, state.step, data))
    prune_checkpoints(Path(config.output_dir), config.keep_checkpoints)
    events.emit("checkpoint", step=state.step, path=str(path), lora=str(path / "lora.safetensors"))
    return path


def _sample(base: BaseModel, unet, config: TrainConfig, step: int, events: EventWriter, accelerator,
            stop: StopRequest, offloaded: bool = False, graphs: GraphedUNet | None = None) -> list[Path]:
    """Validation images with fixed seeds, written as samples/step_<N>_<i>.png.

    Running out of GPU memory skips them with a warning: the run, and its LoRA, go on.
    `offloaded`: the VAE and text encoders wait in CPU memory; the models take turns on the GPU
    (the UNet too where accelerate has not wrapped it: DDP, DeepSpeed and FSDP keep theirs put).
    `graphs` are released first: sampling may move the UNet, and needs their memory. A `stop`
    asked meanwhile skips the images not yet made (at the end of a run, so that it ends soon).
    """
    from accelerate.utils import DistributedType

    if graphs is not None:
        graphs.release()
    with model_placement(base, unet, accelerator.device, offloaded,
                    move_unet=accelerator.distributed_type == DistributedType.NO) as place:
        try:
            return sample_on_device(base, unet, config, step, events, accelerator, place, stop)
        except torch.cuda.OutOfMemoryError as e:
            # Caught here, inside: the frames holding the failed stage's tensors are gone by the
            # time the models move back to where they were.
            failure = str(e).splitlines()[0]
    torch.cuda.empty_cache()
    fix = "" if offloaded else "turn on offload_frozen_models (the 8 and 12 GB memory presets do), "
    events.log(f"validation samples at step {step} skipped: the GPU ran out of memory ({failure}). Training "
               f"goes on. Lower sample_resolution, {fix}or turn sampling off.")
    return []


@contextmanager
def model_placement(base: BaseModel, unet, device: torch.device, take_turns: bool, move_unet: bool = True):
    """The `place(stage)` that `generate_images` calls before encoding, denoising and decoding.

    Without `take_turns` every model stays where it is. With it (offload_frozen_models) each
    stage brings its own models to `device` after sending the others to CPU memory, so that
    the text encoders, the UNet and the VAE's decoding never share the GPU (SDXL on an 8 GB
    card: its UNet and text encoders alone are 6.7 GB in bf16). A UNet that trains on the
    GPU so moves four times per round of samples (~1 s for SDXL's 5 GB). Afterwards every
    model goes back to where it was. With `move_unet` False the UNet never moves (a wrapped one).
    """
    if not take_turns:
        yield keep_models_in_place
        return
    turns = {"encode": list(base.text_encoders), "denoise": [unet] if move_unet else [], "decode": [base.vae]}
    homes = [(model, _device_of(model)) for models in turns.values() for model in models]

    def place(stage: str) -> None:
        for other, models in turns.items():  # out first, then in
            for model in models if other != stage else []:
                torch.nn.Module.to(model, torch.device("cpu"))
        if device.type == "cuda":
            torch.cuda.empty_cache()
        for model in turns[stage]:
            torch.nn.Module.to(model, device)

    try:
        yield place
    finally:
        for model, home in sorted(homes, key=lambda mh: mh[1].type != "cpu"):  # those leaving the GPU first
            torch.nn.Module.to(model, home)


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def sample_on_device(base: BaseModel, unet, config: TrainConfig, step: int, events: EventWriter,
                      accelerator, place, stop: StopRequest) -> list[Path]:
    """The validation images of `step`, made with the models where `place` puts them, and saved."""
    prompts = config.validation_prompts or [config.instance_prompt]
    seeds = [config.sample_seed + i for i in range(len(prompts))]
    events.emit("sampling", step=step, count=len(prompts))
    for module in (unet, *base.text_encoders):
        module.eval()
    # A compiled UNet would compile again for sampling's shapes and eval mode (minutes on real models).
    set_stance = getattr(torch.compiler, "set_stance", None)  # torch >= 2.6
    eager = set_stance("force_eager") if config.compile_unet and set_stance else nullcontext()
    with eager:
        images = generate_images(base, unet, prompts, seeds, size=config.sample_resolution or config.resolution,
                                 steps=config.sample_steps, guidance=config.sample_guidance,
                                 autocast=accelerator.autocast, place=place,
                                 interrupted=stop.requested)
    if len(images) < len(prompts):
        events.log(f"a stop was asked while the samples of step {step} were made: {len(prompts) - len(images)} of "
                   f"{len(prompts)} skipped", level="info")
    paths = [save_png(img, sample_path(config.output_dir, step, i))
             for i, img in enumerate(images)]
    if paths:
        events.emit("sample", step=step, paths=[str(p) for p in paths], prompts=prompts[:len(paths)])
    return paths


def _stop_everywhere(stop: StopRequest, accelerator) -> bool:
    """A stop asked of any process stops all of them at the same step."""
    requested = stop.requested()
    if accelerator.num_processes == 1:
        return requested
    flag = torch.tensor([1.0 if requested else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(flag, reduction="sum").item() > 0)
