"""The host side: a readable PyTorch model of the Llama family, LoRA layers and the trainer."""
