"""ComfyUI entry point of the DreamBooth LoRA pack.

Nothing heavy (torch, diffusers, peft) is imported here, so the pack costs ComfyUI's
start-up nothing and the trainer (`comfyui_dreambooth_lora.trainer`) imports without ComfyUI.
The nodes are registered here once `nodes/` has them (issue: the ComfyUI node pack).
"""
