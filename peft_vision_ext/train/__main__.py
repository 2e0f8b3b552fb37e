# Copyright 2026 The peft-vision-ext authors. Licensed under the Apache License, Version 2.0.
"""``python -m peft_vision_ext.train``: the ``peft-vision train`` command, also for ``accelerate launch -m`` and
``torchrun -m``."""

import sys

from .runner import main


if __name__ == "__main__":
    sys.exit(main())
