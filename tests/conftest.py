# Copyright 2026 The peft-vision-ext authors. Licensed under the Apache License, Version 2.0.
import os
import sys

import torch


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# One torch thread per worker under `make test` (OMP_NUM_THREADS=1, two xdist workers on two cores); 2 otherwise.
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
