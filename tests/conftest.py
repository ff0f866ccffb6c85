import os
import sys

import pytest
import torch

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(__file__))
# One torch thread for the whole suite: the models here are small, results are then independent of
# the machine's core count, and on a shared CPU OpenMP threads spinning while another process holds
# a core made each UNet call 10-30x slower (measured). Scripts and the CLI keep torch's default.
torch.set_num_threads(1)


@pytest.fixture
def sd_table():
    from schedsearch.noise import SD
    return SD
