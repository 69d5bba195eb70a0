"""Host-side export: HF/PEFT import, quantization, ONNX and GGUF writers, the bundle writer."""
