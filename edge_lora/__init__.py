"""edge-lora: LoRA from a training notebook to a phone or a board.

The core package holds what every side shares and never imports torch:
model config, tensor names, the adapter file, fingerprints, errors and the CLI.
"""

__version__ = "0.1.0"

from edge_lora.errors import EdgeLoraError  # noqa: F401
