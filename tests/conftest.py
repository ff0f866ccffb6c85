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


# A study folder written by schedsearch 0.1.0 (before the orchestration split), kept to show that
# such a study still resumes and exports with the current code.
LEGACY = os.path.join(os.path.dirname(__file__), "fixtures", "legacy-study")


@pytest.fixture
def legacy(tmp_path):
    """A copy of the 0.1.0 study's storage in a fresh run folder (the fixture stays untouched)."""
    import shutil

    out = tmp_path / "run"
    out.mkdir()
    shutil.copy(os.path.join(LEGACY, "study.db"), out / "study.db")
    return out


@pytest.fixture
def sd_table():
    from schedsearch.noise import SD
    return SD


@pytest.fixture
def offline_sd(tmp_path):
    """The real-model path offline: a tiny SD pipeline saved to disk, a prompt file, and reference
    statistics of an image folder through the Inception extractor (a stand-in network in clean-fid's
    TorchScript format: the real weights cannot be downloaded here)."""
    from types import SimpleNamespace

    from test_metrics import _Base, _write_folder
    from tiny import save_pipeline, tiny_sd_pipeline

    from schedsearch.cli import main

    weights = tmp_path / "inception-2015-12-05.pt"
    torch.jit.script(_Base()).save(str(weights))
    real = _write_folder(tmp_path / "real", 12, 0, 0.0, sizes=((64, 64),))
    ref = tmp_path / "ref.safetensors"
    assert main(["refstats", "--images", real, "--out", str(ref), "--device", "cpu",
                 "--inception", str(weights)]) == 0
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red car\na cat on a mat\na bowl of fruit\na lighthouse\n" * 4)
    return SimpleNamespace(model=save_pipeline(tiny_sd_pipeline(), tmp_path / "sd"), prompts=prompts,
                           ref=ref, inception=weights)
