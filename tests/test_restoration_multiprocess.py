"""The shared Trainer under ``accelerate launch`` with two CPU processes (gloo): a paired-restoration run completes,
both processes end with the same weights, and one model and one set of checkpoints are saved."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("two_process_restoration_run.py")


@pytest.mark.slow
def test_two_process_run_completes_with_synchronised_weights(tmp_path):
    accelerate = Path(sys.executable).with_name("accelerate")
    # Without a GPU, accelerate runs multi-process on CPU (gloo) when told to use the CPU.
    env = os.environ | {"ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    subprocess.run([str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                    "--mixed_precision", "no", "--dynamo_backend", "no", str(SCRIPT), str(tmp_path)],
                   check=True, env=env, capture_output=True, timeout=300)
    reports = [json.loads((tmp_path / f"process-{rank}.json").read_text()) for rank in (0, 1)]
    assert all(report["processes"] == 2 and report["step"] == 4 for report in reports)
    assert reports[0]["checksum"] == reports[1]["checksum"]
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert (tmp_path / "model" / "diffusion_pytorch_model.safetensors").is_file()
