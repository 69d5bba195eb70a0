"""`edge-lora quickstart`: the whole mission in one command on the model the package ships.

Train four adapters (three small tasks, one of them adding new tokens, and a style), export the base
once for both backends plus every adapter, then swap, stack and merge them in the runtime and print
accuracy and timings.
"""
