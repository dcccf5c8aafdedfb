"""The ComfyUI side of the pack: thin nodes over the trainer.

- `comfy_nodes`: the V3 node classes (imported only inside ComfyUI, by `comfy_entrypoint`);
- `config_build`: node widgets -> the trainer's TrainConfig (no ComfyUI import);
- `worker`: the training worker process and its event stream (no ComfyUI import);
- `pictures`: preview grid, loss curve, IMAGE tensors (no ComfyUI import).
"""
