"""`edge-lora quickstart`: the whole mission in one command on the model the package ships.

Train two adapters on two small tasks, export the base once for both backends plus both adapters,
then swap, stack and merge them in the runtime and print accuracy and timings.
"""
