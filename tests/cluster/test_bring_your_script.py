"""Users' own distributed scripts, unchanged, as command jobs: the torch.distributed variables every
task gets (and that hpcdl.launch and Lightning agree with them), ``--launcher torchrun``, the site's
per-launcher presets and MPI setting, bad input; then the scripts themselves, on the local back
end and on the dev cluster (2 nodes x 2 tasks)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO, one_line_error, run_cli

from hpcdl import Job
from hpcdl.cli import main
from hpcdl.launch import discover
from hpcdl.runner import TORCH_VARS, launcher_env, torchrun_argv
from hpcdl.scheduler import LocalScheduler, SlurmScheduler, find_handle
from hpcdl.scheduler.hostlist import expand_hostlist
from hpcdl.site import load_site

HELPERS = REPO / "tests" / "helpers"
DDP = str(HELPERS / "ddp_env.py")
DEEPSPEED = str(HELPERS / "ds_zero2.py")
MPI = str(HELPERS / "mpi_allreduce.py")
LIGHTNING = str(HELPERS / "lightning_ddp.py")


def _slurm_task(procid: int, nodes: int = 2, per_node: int = 2, **extra: str) -> dict[str, str]:
    """The variables srun gives task ``procid`` of a ``nodes`` x ``per_node`` step."""
    env = {
        "SLURM_JOB_ID": "4242",
        "SLURM_STEP_ID": "0",
        "SLURM_PROCID": str(procid),
        "SLURM_LOCALID": str(procid % per_node),
        "SLURM_NODEID": str(procid // per_node),
        "SLURM_NTASKS": str(nodes * per_node),
        "SLURM_STEP_NUM_TASKS": str(nodes * per_node),
        "SLURM_TASKS_PER_NODE": f"{per_node}(x{nodes})",
        "SLURM_STEP_TASKS_PER_NODE": f"{per_node}(x{nodes})",
        "SLURM_JOB_NODELIST": "localhost,node-b",
        "SLURM_STEP_NODELIST": "localhost,node-b",
    }
    return {**env, **extra}


def _clean_environ(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    for key in list(os.environ):
        if key.startswith(("SLURM_", "SUBMITIT_", "PMI", "OMPI_")) or key in TORCH_VARS:
            monkeypatch.delenv(key)
    monkeypatch.delenv("HPCDL_MASTER_PORT", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)


# -- the variables ------------------------------------------------------------------------------
def test_every_srun_task_gets_torchruns_variables():
    seen = [launcher_env("srun", _slurm_task(p), expand_hostlist) for p in range(4)]
    assert [s["RANK"] for s in seen] == ["0", "1", "2", "3"]
    assert [s["LOCAL_RANK"] for s in seen] == ["0", "1", "0", "1"]
    assert [s["NODE_RANK"] for s in seen] == [s["GROUP_RANK"] for s in seen] == ["0", "0", "1", "1"]
    for s in seen:
        assert set(s) == set(TORCH_VARS)
        assert (s["WORLD_SIZE"], s["LOCAL_WORLD_SIZE"], s["GROUP_WORLD_SIZE"]) == ("4", "2", "2")
        assert s["MASTER_ADDR"] == "127.0.0.1"  # the first host, resolved
    assert len({(s["MASTER_ADDR"], s["MASTER_PORT"]) for s in seen}) == 1
    assert 20000 <= int(seen[0]["MASTER_PORT"]) < 32768


@pytest.mark.parametrize("procid", range(4))
def test_launch_discover_and_lightning_agree_with_the_exported_variables(monkeypatch, procid):
    """hpcdl's init_distributed (discover) and Lightning's SLURMEnvironment (which reads
    SLURM_PROCID/SLURM_LOCALID/SLURM_NODEID/SLURM_NTASKS and takes MASTER_ADDR/MASTER_PORT
    from the environment when set) see the same rank layout as the exported variables."""
    task = _slurm_task(procid)
    exported = launcher_env("srun", task, expand_hostlist)
    _clean_environ(monkeypatch, task)
    info = discover()
    assert (info.source, str(info.rank), str(info.world_size)) == (
        "slurm",
        exported["RANK"],
        exported["WORLD_SIZE"],
    )
    assert (str(info.local_rank), str(info.node_rank), str(info.local_world_size)) == (
        exported["LOCAL_RANK"],
        exported["NODE_RANK"],
        exported["LOCAL_WORLD_SIZE"],
    )
    assert (info.master_addr, str(info.master_port)) == (
        exported["MASTER_ADDR"],
        exported["MASTER_PORT"],
    )
    lightning = {  # lightning.fabric.plugins.environments.SLURMEnvironment's sources
        "RANK": task["SLURM_PROCID"],
        "LOCAL_RANK": task["SLURM_LOCALID"],
        "NODE_RANK": task["SLURM_NODEID"],
        "WORLD_SIZE": task["SLURM_NTASKS"],
    }
    assert {k: exported[k] for k in lightning} == lightning


def test_single_task_jobs_are_untouched():
    assert launcher_env("srun", _slurm_task(0, nodes=1, per_node=1), expand_hostlist) == {}
    local = {"SUBMITIT_LOCAL_GLOBALID": "0", "SUBMITIT_LOCAL_LOCALID": "0",
             "SUBMITIT_LOCAL_NTASKS": "1", "SUBMITIT_LOCAL_JOB_ID": "77"}  # fmt: skip
    assert launcher_env("srun", local, expand_hostlist) == {}
    assert launcher_env("srun", {}, expand_hostlist) == {}  # not inside a scheduler's task


def test_torchrun_gets_its_rendezvous_and_node_zero_hosts_the_store():
    seen = [
        launcher_env("torchrun", _slurm_task(n, per_node=1, SLURM_ARRAY_JOB_ID="4240",
                                             SLURM_ARRAY_TASK_ID="2"), expand_hostlist)
        for n in range(2)
    ]  # fmt: skip
    assert {s["PET_RDZV_ID"] for s in seen} == {"4240_2"}
    assert len({s["PET_RDZV_ENDPOINT"] for s in seen}) == 1
    assert seen[0]["PET_RDZV_ENDPOINT"].startswith("127.0.0.1:")
    assert [s["PET_RDZV_CONF"] for s in seen] == ["is_host=true", "is_host=false"]
    assert not set(TORCH_VARS) & set(seen[0])  # torchrun sets those for its workers


def test_variables_set_in_env_win(tmp_path):
    """The task payload itself, in a process with a simulated Slurm task's environment."""
    out = tmp_path / "env.json"
    code = (
        "import json, os, sys\n"
        "from hpcdl.runner import Task\n"
        "from hpcdl.scheduler.hostlist import expand_hostlist\n"
        "dump = 'import json, os, sys; json.dump(dict(os.environ), open(sys.argv[1], \"w\"))'\n"
        "Task(argv=[sys.executable, '-c', dump, sys.argv[1]], env={'MASTER_PORT': '12345'},\n"
        "     launcher='srun', hostnames=expand_hostlist)()\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(_slurm_task(3), PYTHONPATH=str(REPO))
    subprocess.run([sys.executable, "-c", code, str(out)], env=env, check=True, timeout=60)
    seen = json.loads(out.read_text())
    assert (seen["RANK"], seen["LOCAL_RANK"], seen["NODE_RANK"]) == ("3", "1", "1")
    assert seen["MASTER_PORT"] == "12345"


# -- jobs: launchers, presets, bad input ----------------------------------------------------------
@pytest.mark.parametrize(
    "command,expected",
    [
        (["python3", "ddp.py", "--lr", "1"], ["ddp.py", "--lr", "1"]),
        (["/x/bin/python", "-m", "pkg.train", "a"], ["-m", "pkg.train", "a"]),
        (["python3.11", "t.py"], ["t.py"]),
        (["bash", "run.sh"], None),
        (["python3", "-c", "print(1)"], None),
        (["python3", "-m"], None),
        (["python3"], None),
        (["./train.py"], None),
    ],
)
def test_torchrun_argv(command, expected):
    argv = torchrun_argv(command, 2, 4)
    if expected is None:
        assert argv is None
        return
    assert argv == [command[0], "-m", "torch.distributed.run", "--nnodes=2",
                    "--nproc-per-node=4", "--rdzv-backend=c10d", *expected]  # fmt: skip


def test_torchrun_job_runs_one_task_per_node_with_all_its_cpus():
    site = load_site("devcluster")
    job = Job(command=["python3", DDP, "x"], nodes=2, tasks_per_node=2, cpus_per_task=1,
              launcher="torchrun", site="devcluster")  # fmt: skip
    params = SlurmScheduler(site).sbatch_parameters(job)
    assert (params["nodes"], params["ntasks_per_node"], params["cpus_per_task"]) == (2, 1, 2)
    assert "srun_args" not in params  # the site's MPI setting is for srun
    task = job.task(site)
    assert task.argv[:6] == ["python3", "-m", "torch.distributed.run", "--nnodes=2",
                             "--nproc-per-node=2", "--rdzv-backend=c10d"]  # fmt: skip
    assert task.env["LOGLEVEL"] == "WARNING"  # the site's torchrun preset
    assert LocalScheduler(site).executor_parameters(job)["tasks_per_node"] == 1


def test_srun_jobs_use_the_sites_mpi_setting_and_presets(tmp_path):
    site = load_site("devcluster")
    job = Job(command=["python3", MPI, "x"], nodes=2, tasks_per_node=2, site="devcluster")
    assert SlurmScheduler(site).sbatch_parameters(job)["srun_args"] == ["--mpi=pmi2"]
    srun = next(ln for ln in job.render(site).splitlines() if ln.startswith("srun "))
    assert " --mpi=pmi2 " in srun
    func = Job(function=print, nodes=2, tasks_per_node=2, site="devcluster")
    assert "srun_args" not in SlurmScheduler(site).sbatch_parameters(
        func
    )  # hpcdl's own code discovers ranks
    assert func.task(site).launcher is None
    gpu = load_site("example-gpu-site")
    job = Job(command=["python3", "t.py"], env={"LOGLEVEL": "INFO"}, launcher="torchrun")
    assert job.task(gpu).env["LOGLEVEL"] == "INFO"  # the job's env wins over the preset
    assert job.task(gpu).env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"


@pytest.mark.parametrize(
    "args,expected",
    [
        (["--launcher", "mpirun", "--", "python3", DDP], "launcher: unknown launcher (choose srun or torchrun) (got 'mpirun')"),
        (["--launcher", "torchrun", "--", "bash", "-c", "true"], "command: launcher torchrun runs 'python SCRIPT ...' or 'python -m MODULE ...', got: bash -c true"),
        (["--launcher", "torchrun", "--", "python3", "-c", "print(1)"], "got: python3 -c 'print(1)'"),
        (["--launcher", "torchrun", "--", "python3", "-m"], "got: python3 -m"),
    ],
)  # fmt: skip
def test_bad_launcher_input_is_one_line(capsys, job_root, args, expected):
    for verb in ("submit", "render"):
        line = one_line_error(capsys, main([verb, "--site", "devcluster", *args]))
        assert expected in line
    assert not job_root.exists() or not any(job_root.iterdir())


@pytest.mark.parametrize(
    "launchers,expected",
    [
        ({"mpirun": {}}, "launchers.mpirun"),
        ({"torchrun": {"mpi": "pmi2"}}, "only srun takes an MPI type"),
        ({"srun": {"mpi": "pmi 2"}}, "launchers.srun.mpi"),
        ({"srun": {"env": {"BAD-NAME": "1"}}}, "invalid environment variable name"),
        ({"srun": {"env": {"WANDB_API_KEY": "x"}}}, "secret 'WANDB_API_KEY'"),
    ],
)
def test_bad_launcher_presets_are_one_line(tmp_path, capsys, launchers, expected):
    data = load_site("devcluster").model_dump(mode="json")
    data.update(name="t", launchers=launchers)
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(data))
    assert expected in one_line_error(capsys, main(["site", "show", str(path)]))


def test_launcher_torchrun_needs_a_command():
    with pytest.raises(ValueError, match="launcher torchrun runs a command"):
        Job(function=print, launcher="torchrun")


# -- the scripts, on the local back end ----------------------------------------------------------
def _submit(*args: str) -> str:
    proc = run_cli("submit", "--parsable", *args, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def _finish(job_id: str, timeout: float) -> None:
    """Wait for the job; fail with every task's log when it does not complete."""
    handle = find_handle(job_id)
    state = handle.wait(timeout=timeout, poll=1.0)
    if state != "COMPLETED":
        logs = []
        for task in range(handle.tasks):
            for path in handle.log_paths(task):
                text = path.read_text(errors="replace")[-3000:] if path.is_file() else "(none)"
                logs.append(f"--- {path}\n{text}")
        pytest.fail(f"job {job_id} ended {state}\n" + "\n".join(logs), pytrace=False)


def _reports(prefix: Path, n: int) -> list[dict]:
    files = sorted(prefix.parent.glob(f"{prefix.name}.*.json"))
    assert len(files) == n, files
    return [json.loads(f.read_text()) for f in files]


def _check_ddp(reports: list[dict], world: int) -> None:
    assert sorted(r["rank"] for r in reports) == list(range(world))
    assert {r["world"] for r in reports} == {world}
    assert {r["sum"] for r in reports} == {float(sum(range(world)))}  # distinct ranks 0..world-1
    assert all(r["replicas_equal"] for r in reports)


def test_ddp_script_on_the_local_back_end(tmp_path):
    prefix = tmp_path / "ddp"
    _finish(_submit("--site", "local", "-n", "2", "-t", "5m", "--", sys.executable, DDP,
                    str(prefix)), timeout=120)  # fmt: skip
    reports = _reports(prefix, 2)
    _check_ddp(reports, 2)
    assert {r["env"]["MASTER_ADDR"] for r in reports} == {"127.0.0.1"}


def test_ddp_script_under_torchrun_on_the_local_back_end(tmp_path):
    prefix = tmp_path / "tr"
    job_id = _submit("--site", "local", "-n", "2", "-t", "5m", "--launcher", "torchrun", "--",
                     sys.executable, DDP, str(prefix))  # fmt: skip
    _finish(job_id, timeout=180)
    reports = _reports(prefix, 2)
    _check_ddp(reports, 2)
    assert {r["env"]["TORCHELASTIC_RUN_ID"] for r in reports} == {job_id}


def test_lightning_script_on_the_local_back_end(tmp_path):
    pytest.importorskip("lightning")
    prefix = tmp_path / "lt"
    _finish(_submit("--site", "local", "-n", "2", "-t", "5m", "--", sys.executable, LIGHTNING,
                    str(prefix), "1", "2"), timeout=180)  # fmt: skip
    reports = _reports(prefix, 2)
    assert sorted(r["rank"] for r in reports) == [0, 1]
    assert {(r["world"], r["steps"], r["sum"]) for r in reports} == {(2, 2, 1.0)}


# -- the scripts, on the dev cluster: 2 nodes x 2 tasks ---------------------------------------------
def _nodes(reports: list[dict], key: str = "SLURMD_NODENAME") -> list[str]:
    return sorted(r["env"][key] if "env" in r else r["node"] for r in reports)


#: name: (extra submit options, script, script arguments, seconds to wait)
SCRIPTS = {
    "ddp": ([], DDP, [], 300),
    "torchrun": (["--launcher", "torchrun"], DDP, [], 300),
    "deepspeed": ([], DEEPSPEED, [], 480),
    "mpi": ([], MPI, [], 300),
    "lightning": ([], LIGHTNING, ["2", "2"], 480),
}


@pytest.fixture(scope="module")
def on_two_nodes(devcluster: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Every script submitted at once (they run side by side): ``{name: (job id, prefix)}``,
    registered under ``{"": job root}``."""
    root = tmp_path_factory.mktemp("scripts")
    jobs: dict = {"": str(root / "jobs")}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HPCDL_JOB_ROOT", jobs[""])
        for name, (options, script, args, _) in SCRIPTS.items():
            prefix = root / name
            job_id = _submit("--site", devcluster, "-N", "2", "-n", "4", "-t", "10m", *options,
                             "--", sys.executable, script, str(prefix), *args)  # fmt: skip
            jobs[name] = (job_id, prefix)
    yield jobs
    subprocess.run(["scancel", *(jobs[name][0] for name in SCRIPTS)], timeout=30)


def _reports_of(jobs: dict, name: str, n: int = 4) -> tuple[str, list[dict]]:
    job_id, prefix = jobs[name]
    with pytest.MonkeyPatch.context() as mp:  # the module's job root, not this test's
        mp.setenv("HPCDL_JOB_ROOT", jobs[""])
        _finish(job_id, timeout=SCRIPTS[name][3])
    return job_id, _reports(prefix, n)


@pytest.mark.slurm
def test_ddp_script_on_two_nodes(on_two_nodes):
    _, reports = _reports_of(on_two_nodes, "ddp")
    _check_ddp(reports, 4)
    nodes = _nodes(reports)
    assert len(set(nodes)) == 2 and nodes[0] == nodes[1] and nodes[2] == nodes[3]
    for r in reports:  # what Lightning's SLURMEnvironment reads agrees with what was exported
        env = r["env"]
        assert (env["RANK"], env["LOCAL_RANK"], env["NODE_RANK"], env["WORLD_SIZE"]) == (
            env["SLURM_PROCID"], env["SLURM_LOCALID"], env["SLURM_NODEID"], env["SLURM_NTASKS"],
        )  # fmt: skip
        assert env["TORCHELASTIC_RUN_ID"] is None


@pytest.mark.slurm
def test_ddp_script_under_torchrun_on_two_nodes(on_two_nodes):
    job_id, reports = _reports_of(on_two_nodes, "torchrun")
    _check_ddp(reports, 4)
    assert {r["env"]["TORCHELASTIC_RUN_ID"] for r in reports} == {job_id}
    assert {r["env"]["SLURM_NTASKS"] for r in reports} == {"2"}  # one torchrun per node
    assert sorted(r["env"]["GROUP_RANK"] for r in reports) == ["0", "0", "1", "1"]
    assert len(set(_nodes(reports))) == 2


@pytest.mark.slurm
def test_deepspeed_script_trains_zero2_on_two_nodes(on_two_nodes):
    _, reports = _reports_of(on_two_nodes, "deepspeed")
    assert sorted(r["rank"] for r in reports) == [0, 1, 2, 3]
    assert {(r["world"], r["engine_world"]) for r in reports} == {(4, 4)}  # not 4 worlds of 1
    assert {(r["zero_stage"], r["steps"], r["sum"]) for r in reports} == {(2, 2, 6.0)}


@pytest.mark.slurm
def test_mpi4py_script_under_the_sites_mpi_setting(on_two_nodes):
    _, reports = _reports_of(on_two_nodes, "mpi")
    assert sorted(r["rank"] for r in reports) == [0, 1, 2, 3]
    assert {(r["size"], r["sum"]) for r in reports} == {(4, 6)}
    assert len(set(_nodes(reports))) == 2


@pytest.mark.slurm
def test_lightning_script_finds_slurm_on_two_nodes(on_two_nodes):
    pytest.importorskip("lightning")
    _, reports = _reports_of(on_two_nodes, "lightning")
    assert {r["cluster"] for r in reports} == {"SLURMEnvironment"}
    assert sorted((r["node_rank"], r["local_rank"]) for r in reports) == [
        (0, 0),
        (0, 1),
        (1, 0),
        (1, 1),
    ]
    assert {(r["world"], r["steps"], r["sum"]) for r in reports} == {(4, 2, 6.0)}
    assert all(r["env"]["RANK"] == r["env"]["SLURM_PROCID"] == str(r["rank"]) for r in reports)
