"""The training engine: a library that needs no ComfyUI.

`python -m comfyui_dreambooth_lora.trainer train --config run.toml` runs it; the ComfyUI
nodes start the same command in a worker process.
"""
