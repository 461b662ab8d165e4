"""The sbatch script submitit renders for a Job, checked line by line (no cluster needed)."""

from __future__ import annotations

import pytest
import yaml
from conftest import REPO
from pydantic import ValidationError

from hpcdl import Job, load_site


def _lines(script: str) -> set[str]:
    return set(script.splitlines())


def test_gpu_job_gets_one_task_per_gpu_and_site_presets():
    job = Job(site="devcluster", partition="gpu", nodes=2, gpus_per_node=2, time="30m",
              command=["true"], env={"LR": "0.1"})  # fmt: skip
    lines = _lines(job.render())
    assert {"#SBATCH --gpus-per-node=2", "#SBATCH --ntasks-per-node=2", "#SBATCH --nodes=2",
            "#SBATCH --partition=gpu", "#SBATCH --time=30", "#SBATCH --signal=USR2@60",
            "#SBATCH --export=ALL", "export GLOO_SOCKET_IFNAME=lo"} <= lines  # fmt: skip
    assert "LR" not in job.render(), "job env travels in the pickle, not the script"


def test_name_with_newline_is_refused_and_quotes_stay_one_header_line():
    """A job name is written into the script: one line (issue 19), refused otherwise rather than
    changed behind the user's back; shell characters stay inside one quoted directive."""
    with pytest.raises(ValidationError, match=r"name\n.*must be one line"):
        Job(site="devcluster", name="a\nb $(x) 'q'", command=["true"])
    script = Job(site="devcluster", name="a b $(x) 'q'", command=["true"]).render()
    header = [ln for ln in script.splitlines() if ln.startswith("#SBATCH --job-name")]
    assert header == ["#SBATCH --job-name='a b $(x) '\"'\"'q'\"'\"''"]


def test_array_dependency_account_qos_and_signal(tmp_path):
    data = yaml.safe_load((REPO / "hpcdl/sites/example-gpu-site.yaml").read_text())
    data["preemption"] = {"signal": "USR1", "delay_s": 90}
    site = tmp_path / "example-gpu-site.yaml"
    site.write_text(yaml.safe_dump(data))
    job = Job(site=str(site), command=["true"], array=100, throttle=5, dependencies=["42", "afterany:7"],
              qos="high")  # fmt: skip
    lines = _lines(job.render())
    assert {"#SBATCH --array=0-99%5", "#SBATCH --dependency=afterok:42,afterany:7",
            "#SBATCH --account=proj-ml", "#SBATCH --qos=high", "#SBATCH --signal=USR1@90",
            "export SUBMITIT_PREEMPT_SIGNAL=USR1", "#SBATCH --gpus-per-node=a100:4"} - lines == {
        "#SBATCH --gpus-per-node=a100:4"}  # fmt: skip
    assert "module load Stages/2026 GCC OpenMPI CUDA/12.6 NCCL" in lines


def test_apptainer_wraps_commands():
    site = load_site("example-gpu-site")
    task = Job(site="example-gpu-site", command=["python", "train.py"]).task(site)
    assert task.argv == ["apptainer", "exec", "--bind", "/p/scratch", "--bind", "/p/project",
                         "/p/software/containers/pytorch-2.13.sif", "python", "train.py"]  # fmt: skip
