"""ComfyUI entry point of the DreamBooth LoRA pack.

Nothing heavy (torch, diffusers, peft) is imported here, so the pack costs ComfyUI's
start-up nothing and the trainer (`comfyui_dreambooth_lora.trainer`) imports without ComfyUI.
ComfyUI calls `comfy_entrypoint` (its V3 node API); only then are the nodes imported.
"""


async def comfy_entrypoint():
    """The pack's ComfyUI extension: the nodes of `nodes/comfy_nodes.py`."""
    from .nodes.comfy_nodes import DreamBoothExtension

    return DreamBoothExtension()
