"""The baseline: the per-step work of diffusers' DreamBooth LoRA examples, written out plainly.

This follows `examples/dreambooth/train_dreambooth_lora.py` (SD1.x) and
`train_dreambooth_lora_sdxl.py` (SDXL) as published, with their default options:

- the images are opened, resized, centre-cropped and normalised by the dataset on every
  `__getitem__` (torchvision transforms, a shuffled DataLoader, no workers);
- the VAE encodes the pixels on every step (no latent cache; `--cache_latents` is off by
  default in the SDXL script and absent from the SD1.x one);
- SD1.x: the text encoder encodes the prompts on every step (`--pre_compute_text_embeddings`
  is off by default). SDXL: the script precomputes the instance and class prompt
  embeddings once when the text encoder is not trained, so this does too;
- LoRA (peft `add_adapter`, rank r, alpha r, gaussian init) on to_q/to_k/to_v/to_out.0;
- plain `torch.optim.AdamW` (torch picks its default implementation), diffusers' default
  attention processor (SDPA), `accelerator.prepare`, `accelerator.accumulate`,
  `accelerator.backward`, `clip_grad_norm_`, `loss.detach().item()` for the log every step;
- fp32 on the CPU; fp16 mixed precision on a GPU (frozen weights in fp16, LoRA in fp32,
  SDXL's VAE in fp32 as the script keeps it).

Nothing is tuned down or up. The step is timed from fetching its batch to the end of
`optimizer.zero_grad()` plus the log line, and reported as the same `start` / `step`
events our trainer writes, so the benchmark reads both the same way.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F


@dataclass
class BaselineArgs:
    pretrained_model: str
    instance_dir: str
    class_dir: str
    instance_prompt: str
    class_prompt: str
    resolution: int
    max_train_steps: int
    rank: int = 4
    learning_rate: float = 1e-4
    prior_loss_weight: float = 1.0
    num_class_images: int = 100
    train_batch_size: int = 1
    mixed_precision: str = "auto"   # "auto": fp16 on a GPU, "no" on the CPU (the example's usual launch)
    max_grad_norm: float = 1.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    seed: int = 0


class DreamBoothDataset(torch.utils.data.Dataset):
    """The examples' dataset: instance and class images, transformed on every access."""

    def __init__(self, instance_dir, class_dir, class_num, size, instance_prompt=None, class_prompt=None,
                 tokenizer=None):
        from torchvision import transforms

        self.instance_images_path = sorted(p for p in Path(instance_dir).iterdir() if p.suffix in (".png", ".jpg"))
        self.num_instance_images = len(self.instance_images_path)
        self._length = self.num_instance_images
        self.class_images_path = sorted(p for p in Path(class_dir).iterdir() if p.suffix == ".png")[:class_num]
        self.num_class_images = len(self.class_images_path)
        self._length = max(self.num_class_images, self.num_instance_images)
        self.instance_prompt, self.class_prompt, self.tokenizer = instance_prompt, class_prompt, tokenizer
        self.image_transforms = transforms.Compose([
            transforms.Resize(size, interpolation=transforms.InterpolationMode.BILINEAR),
            transforms.CenterCrop(size),
            transforms.ToTensor(),
            transforms.Normalize([0.5], [0.5]),
        ])

    def __len__(self):
        return self._length

    def _load(self, path):
        from PIL import Image
        from PIL.ImageOps import exif_transpose

        image = exif_transpose(Image.open(path))
        if not image.mode == "RGB":
            image = image.convert("RGB")
        return self.image_transforms(image)

    def _tokens(self, prompt):
        return self.tokenizer(prompt, truncation=True, padding="max_length",
                              max_length=self.tokenizer.model_max_length, return_tensors="pt")

    def __getitem__(self, index):
        example = {"instance_images": self._load(self.instance_images_path[index % self.num_instance_images])}
        example["class_images"] = self._load(self.class_images_path[index % self.num_class_images])
        if self.tokenizer is not None:
            tokens = self._tokens(self.instance_prompt)
            example["instance_prompt_ids"], example["instance_attention_mask"] = tokens.input_ids, tokens.attention_mask
            tokens = self._tokens(self.class_prompt)
            example["class_prompt_ids"], example["class_attention_mask"] = tokens.input_ids, tokens.attention_mask
        return example


def collate_fn(examples, with_text: bool):
    """Instance and class examples in one batch (instance first), as the examples' collate_fn."""
    pixel_values = [e["instance_images"] for e in examples] + [e["class_images"] for e in examples]
    pixel_values = torch.stack(pixel_values).to(memory_format=torch.contiguous_format).float()
    batch = {"pixel_values": pixel_values}
    if with_text:
        batch["input_ids"] = torch.cat([e["instance_prompt_ids"] for e in examples]
                                       + [e["class_prompt_ids"] for e in examples], dim=0)
    return batch


def encode_prompt_sd1(text_encoder, input_ids):
    """`encode_prompt` of train_dreambooth_lora.py (text_encoder_use_attention_mask off)."""
    return text_encoder(input_ids.to(text_encoder.device), attention_mask=None, return_dict=False)[0]


def encode_prompt_sdxl(text_encoders, tokenizers, prompt):
    """`encode_prompt` of train_dreambooth_lora_sdxl.py: penultimate states of both, pooled of the second."""
    prompt_embeds_list = []
    pooled_prompt_embeds = None
    for tokenizer, text_encoder in zip(tokenizers, text_encoders):
        ids = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        out = text_encoder(ids.to(text_encoder.device), output_hidden_states=True, return_dict=False)
        pooled_prompt_embeds = out[0]
        prompt_embeds = out[-1][-2]
        prompt_embeds_list.append(prompt_embeds.view(prompt_embeds.shape[0], prompt_embeds.shape[1], -1))
    return torch.cat(prompt_embeds_list, dim=-1), pooled_prompt_embeds.view(1, -1)


def train(args: BaselineArgs, events) -> None:
    """Set up like the example, then run `max_train_steps` steps, emitting `start` and `step` events."""
    from accelerate import Accelerator
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.optimization import get_scheduler
    from peft import LoraConfig
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    mixed_precision = args.mixed_precision
    if mixed_precision == "auto":
        mixed_precision = "fp16" if torch.cuda.is_available() else "no"
    accelerator = Accelerator(mixed_precision=mixed_precision)
    torch.manual_seed(args.seed)
    model = args.pretrained_model
    sdxl = (Path(model) / "text_encoder_2").is_dir()

    # --- models (every part loaded, as the example does) -------------------------------------
    tokenizer = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer", use_fast=False)
    noise_scheduler = DDPMScheduler.from_pretrained(model, subfolder="scheduler")
    text_encoder = CLIPTextModel.from_pretrained(model, subfolder="text_encoder")
    text_encoder_2 = tokenizer_2 = None
    if sdxl:
        tokenizer_2 = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer_2", use_fast=False)
        text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(model, subfolder="text_encoder_2")
    vae = AutoencoderKL.from_pretrained(model, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet")

    vae.requires_grad_(False)
    text_encoder.requires_grad_(False)
    if text_encoder_2 is not None:
        text_encoder_2.requires_grad_(False)
    unet.requires_grad_(False)

    weight_dtype = torch.float32
    if accelerator.mixed_precision == "fp16":
        weight_dtype = torch.float16
    elif accelerator.mixed_precision == "bf16":
        weight_dtype = torch.bfloat16
    unet.to(accelerator.device, dtype=weight_dtype)
    vae.to(accelerator.device, dtype=torch.float32 if sdxl else weight_dtype)  # the SDXL script keeps its VAE fp32
    text_encoder.to(accelerator.device, dtype=weight_dtype)
    if text_encoder_2 is not None:
        text_encoder_2.to(accelerator.device, dtype=weight_dtype)

    unet_lora_config = LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian",
                                  target_modules=["to_k", "to_q", "to_v", "to_out.0", "add_k_proj", "add_v_proj"])
    unet.add_adapter(unet_lora_config)
    if accelerator.mixed_precision == "fp16":
        from diffusers.training_utils import cast_training_params
        cast_training_params([unet], dtype=torch.float32)  # only the trainable (LoRA) parameters

    unet_lora_parameters = list(filter(lambda p: p.requires_grad, unet.parameters()))
    optimizer = torch.optim.AdamW(unet_lora_parameters, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                  weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)

    # --- SDXL: prompt embeddings and time ids computed once (text encoders are not trained) ---
    if sdxl:
        def compute_time_ids():
            original_size = target_size = (args.resolution, args.resolution)
            add_time_ids = torch.tensor([list(original_size + (0, 0) + target_size)])
            return add_time_ids.to(accelerator.device, dtype=weight_dtype)

        with torch.no_grad():
            encoders, tokenizers = [text_encoder, text_encoder_2], [tokenizer, tokenizer_2]
            instance_embeds, instance_pooled = encode_prompt_sdxl(encoders, tokenizers, args.instance_prompt)
            class_embeds, class_pooled = encode_prompt_sdxl(encoders, tokenizers, args.class_prompt)
        add_time_ids = torch.cat([compute_time_ids(), compute_time_ids()], dim=0)
        prompt_embeds = torch.cat([instance_embeds, class_embeds], dim=0)
        unet_add_text_embeds = torch.cat([instance_pooled, class_pooled], dim=0)

    dataset = DreamBoothDataset(args.instance_dir, args.class_dir, args.num_class_images, args.resolution,
                                args.instance_prompt, args.class_prompt, None if sdxl else tokenizer)
    train_dataloader = torch.utils.data.DataLoader(dataset, batch_size=args.train_batch_size, shuffle=True,
                                                   collate_fn=lambda examples: collate_fn(examples, not sdxl),
                                                   num_workers=0)
    lr_scheduler = get_scheduler("constant", optimizer=optimizer, num_warmup_steps=0,
                                 num_training_steps=args.max_train_steps)
    unet, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(unet, optimizer, train_dataloader,
                                                                          lr_scheduler)

    events.emit("start", total_steps=args.max_train_steps, start_step=0, model="sdxl" if sdxl else "sd1",
                device=str(accelerator.device))
    global_step = 0
    unet.train()
    batches = iter(())
    while global_step < args.max_train_steps:
        started = time.perf_counter()
        batch = next(batches, None)
        if batch is None:  # a new epoch
            batches = iter(train_dataloader)
            batch = next(batches)
        with accelerator.accumulate(unet):
            pixel_values = batch["pixel_values"].to(dtype=vae.dtype)
            model_input = vae.encode(pixel_values).latent_dist.sample()
            model_input = model_input * vae.config.scaling_factor
            model_input = model_input.to(weight_dtype)

            noise = torch.randn_like(model_input)
            bsz = model_input.shape[0]
            timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (bsz,), device=model_input.device)
            timesteps = timesteps.long()
            noisy_model_input = noise_scheduler.add_noise(model_input, noise, timesteps)

            if sdxl:
                elems_to_repeat = bsz // 2
                unet_added_conditions = {"time_ids": add_time_ids.repeat(elems_to_repeat, 1),
                                         "text_embeds": unet_add_text_embeds.repeat(elems_to_repeat, 1)}
                model_pred = unet(noisy_model_input, timesteps, prompt_embeds.repeat(elems_to_repeat, 1, 1),
                                  added_cond_kwargs=unet_added_conditions).sample
            else:
                encoder_hidden_states = encode_prompt_sd1(text_encoder, batch["input_ids"])
                model_pred = unet(noisy_model_input, timesteps, encoder_hidden_states, return_dict=False)[0]

            if noise_scheduler.config.prediction_type == "epsilon":
                target = noise
            else:
                target = noise_scheduler.get_velocity(model_input, noise, timesteps)

            model_pred, model_pred_prior = torch.chunk(model_pred, 2, dim=0)
            target, target_prior = torch.chunk(target, 2, dim=0)
            loss = F.mse_loss(model_pred.float(), target.float(), reduction="mean")
            prior_loss = F.mse_loss(model_pred_prior.float(), target_prior.float(), reduction="mean")
            loss = loss + args.prior_loss_weight * prior_loss

            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(itertools.chain(unet_lora_parameters), args.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad()

        if accelerator.sync_gradients:
            global_step += 1
        logs = {"loss": loss.detach().item(), "lr": lr_scheduler.get_last_lr()[0]}
        events.emit("step", step=global_step, total_steps=args.max_train_steps, loss=round(logs["loss"], 6),
                    lr=logs["lr"], seconds_per_step=round(time.perf_counter() - started, 4))
    accelerator.end_training()
