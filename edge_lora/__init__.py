"""edge-lora: LoRA from a training notebook to a phone or a board.

The top-level modules are the core that every side shares: model config, model directory,
safetensors files, the adapter file, fingerprints, the bundle manifest, signing and errors. They
import numpy, safetensors and tokenizers only. Above them: ``onnx_format`` and ``gguf_format`` (what
the converters and the runtime agree on), ``train`` (the host trainer), and ``app`` (the CLI verbs,
inspect, the quickstart). See the README's layout table.
"""

__version__ = "0.1.0"

from edge_lora.errors import EdgeLoraError  # noqa: F401
