"""`python -m comfyui_dreambooth_lora.trainer ...` (also under `accelerate launch -m`)."""

import sys

from .cli import main

sys.exit(main())
