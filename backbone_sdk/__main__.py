"""``python -m backbone_sdk ...`` = the ``backbone-sdk`` command (what ``torchrun -m`` launches)."""

from .cli import main

main()
