import os
import sys

import pytest
import torch

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(__file__))
torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))


@pytest.fixture
def sd_table():
    from schedsearch.noise import SD
    return SD
