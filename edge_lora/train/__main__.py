"""``python -m edge_lora.train ...`` (also under ``torchrun --nproc_per_node=N -m edge_lora.train ...``)."""

import sys

from edge_lora.train.cli import main

if __name__ == "__main__":
    sys.exit(main())
