"""Extra sbatch options (named fields, the generic ``sbatch`` map, CLI flags) and the site policy
on them: bad input is one line, render shows the ``#SBATCH`` lines, partitions add defaults and
refuse what they deny or miss; on the dev cluster, constraints pick nodes by feature."""

from __future__ import annotations

import pytest
from conftest import devcluster_profile_with, one_line_error

from hpcdl.cli import main
from hpcdl.config import validate
from hpcdl.errors import ConfigError
from hpcdl.hpo.spec import SweepSpec
from hpcdl.job import Job
from hpcdl.scheduler.live import import_site, parse_partitions
from hpcdl.train.config import TrainConfig


def _lines(script: str) -> set[str]:
    return set(script.splitlines())


# -- bad input: one line each, nothing written ---------------------------------------------------
BAD_FLAGS = [
    (["--constraint", "a b"], "constraint: must be node features joined by & | ,"),
    (["-C", "amd;ls"], "constraint: must be node features"),
    (["--reservation", "maint window"], "reservation: must be reservation names"),
    (["--gpus-per-task", "0"], "gpus_per_task: must be a GPU count >= 1 or TYPE:COUNT"),
    (["--gpus-per-task", "a100:x"], "gpus_per_task: must be a GPU count"),
    (["--gpus-per-task", "1"], "gpus_per_task: 1 tasks x 1 GPUs = 1 exceeds partition 'cpu' limit of 0"),
    (["-p", "gpu", "-n", "2", "--gpus-per-task", "2"], "2 tasks x 2 GPUs = 4 exceeds partition 'gpu' limit of 2"),
    (["-p", "gpu", "-G", "1", "--gpu-bind", "far"], "gpu_bind: must be closest, none, single:N"),
    (["--gpu-bind", "closest"], "gpu_bind needs GPUs (gpus_per_node or gpus_per_task)"),
    (["-p", "gpu", "-G", "1", "--mem-per-gpu", "lots"], "mem_per_gpu: invalid memory 'lots'"),
    (["--mem-per-gpu", "4G"], "mem_per_gpu needs GPUs"),
    (["-p", "gpu", "-G", "1", "--mem-per-gpu", "1G", "--mem", "2G"], "mem and mem-per-gpu exclude each other"),
    (["--exclude", "node 1"], "exclude: must be a Slurm host list such as node[1-3],gpu7"),
    (["-w", "node1;id"], "nodelist: must be a Slurm host list"),
    (["--mail-type", "SOMETIMES"], "mail_type: must be mail types from NONE, BEGIN, END"),
    (["--mail-user", "a b@c"], "mail_user: must be a user name or an e-mail address"),
    (["--begin", "yesterday"], "begin: use YYYY-MM-DD[THH:MM[:SS]], HH:MM[:SS], now+N"),
    (["--begin", "2026-13-01"], "begin: use YYYY-MM-DD"),
    (["--comment", "two\nlines"], "comment: must be one line"),
    (["--sbatch", "array=3"], "sbatch: 'array' is set by hpcdl: use array (--array) and throttle"),
    (["--sbatch", "output=x.log"], "'output' is set by hpcdl: use nothing: hpcdl writes the logs"),
    (["--sbatch", "error=x.log"], "'error' is set by hpcdl"),
    (["--sbatch", "ntasks=3"], "'ntasks' is set by hpcdl: use tasks_per_node (--tasks-per-node/-n)"),
    (["--sbatch", "signal=USR1@60"], "use the site profile's preemption.signal"),
    (["--sbatch", "job-name=x"], "use name (--name/-J)"),
    (["--sbatch", "nodes=2"], "use nodes (--nodes/-N)"),
    (["--sbatch", "time=5"], "use time (--time/-t)"),
    (["--sbatch", "partition=gpu"], "use partition (--partition/-p)"),
    (["--sbatch", "--gres=gpu:1"], "'gres' is set by hpcdl: use gpus_per_node"),
    (["--sbatch", "constraint=amd"], "'constraint' has its own field: use constraint (--constraint/-C)"),
    (["--sbatch", "mail_type=END"], "'mail-type' has its own field: use mail_type (--mail-type)"),
    (["--sbatch", "C=amd"], "sbatch: 'C' is not an sbatch long option name"),
    (["--sbatch", "=x"], "--sbatch: expected KEY=VALUE, got '=x'"),
    (["--sbatch", "hint=a\nb"], "sbatch: value 'a\\nb' must be one non-empty line"),
    (["--sbatch", "mem-per-cpu=1G", "--mem", "1G"], "mem and mem-per-cpu exclude each other"),
]  # fmt: skip


@pytest.mark.parametrize("args,expected", BAD_FLAGS, ids=[" ".join(a[0]) for a in BAD_FLAGS])
def test_bad_flags_are_one_line(capsys, job_root, args, expected):
    for verb in ("render", "submit"):
        line = one_line_error(capsys, main([verb, "--site", "devcluster", *args, "--", "true"]))
        assert expected in line, line
    assert not job_root.exists(), "nothing may be written for a rejected job"


def test_unknown_option_is_clicks_error_not_the_program(capsys, job_root):
    for args in (["--bogus", "x", "--", "true"], ["--constrant", "amd", "--", "true"]):
        line = one_line_error(capsys, main(["submit", "--site", "devcluster", *args]))
        assert f"No such option '{args[0]}'" in line and "PATH" not in line, line
        assert "options go before '--'" in line
    line = one_line_error(capsys, main(["render", "--site", "devcluster", "python3", "-V", "--x"]))
    assert "No such option '-V'" in line
    assert not job_root.exists()


BAD_FIELDS = [
    ({"exclusive": "nope"}, "exclusive: must be true, false, user, mcs or topo"),
    ({"gpus_per_task": True}, "gpus_per_task: must be a GPU count"),
    ({"mail_type": ["END", "LATER"]}, "mail_type: must be mail types from"),
    ({"sbatch": "hold"}, "sbatch: Input should be a valid dictionary"),
    ({"sbatch": {"hint": [1, 2]}}, "sbatch: 'hint': value must be a string, an integer or true/false"),
    ({"sbatch": {"hint": None}}, "sbatch: 'hint': value must be a string, an integer or true/false"),
    ({"sbatch": {"wrap": "true"}}, "sbatch: 'wrap' is set by hpcdl: use the command after --"),
    ({"constraint": "&"}, "constraint: must be node features"),
]  # fmt: skip


@pytest.mark.parametrize("fields,expected", BAD_FIELDS, ids=[str(b[0]) for b in BAD_FIELDS])
def test_bad_fields_in_jobs_training_configs_and_sweep_specs(fields, expected):
    with pytest.raises(ConfigError) as err:
        Job.from_dict({"command": ["true"], **fields}, "job.yaml")
    assert expected in str(err.value) and "\n" not in str(err.value)
    train = {"data": {"train": "t", "val": "v"}, "job": fields}
    with pytest.raises(ConfigError) as err:
        validate(TrainConfig, train, "train.yaml")
    assert f"train.yaml: job.{expected}" in str(err.value)
    spec = {"name": "s", "train": "t.yaml", "trials": 1, "resources": fields,
            "space": {"optimizer.lr": {"type": "uniform", "low": 0.1, "high": 0.2}}}  # fmt: skip
    with pytest.raises(ConfigError) as err:
        validate(SweepSpec, spec, "sweep.yaml")
    assert f"sweep.yaml: resources.{expected}" in str(err.value)


BAD_POLICIES = [
    ({"policy": {"defaults": {"constraint": "a b"}}}, "policy.defaults: constraint: must be node features"),
    ({"policy": {"defaults": {"mail_type": "LATER"}}}, "policy.defaults: mail-type: must be mail types"),
    ({"policy": {"required": ["time"]}}, "policy.required: 'time' is set by hpcdl, not by a site policy"),
    ({"policy": {"denied": ["X"]}}, "policy.denied: 'X' is not an sbatch long option name"),
    ({"policy": {"required": ["constraint"], "denied": ["constraint"]}}, "'constraint' is denied and also required"),
    ({"policy": {"allowed": {}}}, "policy.allowed: unknown field"),
    ({"features": "amd"}, "partitions.0.features: Input should be a valid list"),
]  # fmt: skip


@pytest.mark.parametrize("part,expected", BAD_POLICIES, ids=[str(b[0]) for b in BAD_POLICIES])
def test_bad_site_policies_are_one_line(tmp_path, capsys, part, expected):
    path = devcluster_profile_with(tmp_path, cpu=part)
    assert expected in one_line_error(capsys, main(["site", "show", str(path)]))


# -- what reaches the script -------------------------------------------------------------------
def test_render_shows_every_option(capsys):
    args = ["-p", "gpu", "-n", "2", "--gpus-per-task", "1", "-C", "amd&ib", "--exclusive",
            "--reservation", "maint", "--gpu-bind", "closest", "--mem-per-gpu", "1G", "-x", "node1",
            "-w", "node[3-4]", "--mail-type", "end,fail", "--mail-user", "me@example.org",
            "--begin", "now+1hour", "--comment", "two words", "--sbatch", "hold",
            "--sbatch", "cpus-per-gpu=2", "--sbatch", "--mem-bind=local"]  # fmt: skip
    assert main(["render", "--site", "devcluster", *args, "--", "true"]) == 0
    lines = _lines(capsys.readouterr().out)
    expected = {"#SBATCH --constraint='amd&ib'", "#SBATCH --exclusive", "#SBATCH --reservation=maint",
                "#SBATCH --gpus-per-task=1", "#SBATCH --gpu-bind=closest", "#SBATCH --mem-per-gpu=1G",
                "#SBATCH --exclude=node1", "#SBATCH --nodelist='node[3-4]'",
                "#SBATCH --mail-type=END,FAIL", "#SBATCH --mail-user=me@example.org",
                "#SBATCH --begin=now+1hour", "#SBATCH --comment='two words'", "#SBATCH --hold",
                "#SBATCH --cpus-per-gpu=2", "#SBATCH --mem-bind=local"}  # fmt: skip
    assert expected <= lines, expected - lines


def test_options_reach_the_script_from_training_configs_and_sweep_specs():
    train = validate(TrainConfig, {"data": {"train": "t", "val": "v"},
                                   "job": {"site": "devcluster", "constraint": "intel",
                                           "sbatch": {"hold": True, "nice": 10}}}, "t")  # fmt: skip
    fields = train.job.model_dump(exclude={"max_requeues"})  # as hpcdl.Run builds its job
    script = _lines(Job.from_dict({**fields, "command": ["true"]}, "t").render())
    assert {"#SBATCH --constraint=intel", "#SBATCH --hold", "#SBATCH --nice=10"} <= script
    spec = SweepSpec.model_validate({"name": "s", "train": "t.yaml", "trials": 1,
        "resources": {"site": "devcluster", "exclusive": "user", "sbatch": {"exclusive_x": False}},
        "space": {"optimizer.lr": {"type": "uniform", "low": 0.1, "high": 0.2}}})  # fmt: skip
    fields = {k: v for k, v in spec.resources.model_dump().items() if v is not None}
    script = Job(**fields, command=["true"]).render()  # as the sweep's lifecycle builds its jobs
    assert "#SBATCH --exclusive=user" in script and "exclusive-x" not in script


def test_partition_policy_defaults_required_denied_and_features(tmp_path):
    path = str(devcluster_profile_with(tmp_path, cpu={"features": ["amd", "ib", "intel"], "policy": {
        "defaults": {"constraint": "intel", "mail-type": "FAIL"}, "required": ["constraint"],
        "denied": ["exclusive", "nice"]}}))  # fmt: skip
    script = _lines(Job(site=path, command=["true"]).render())
    assert {"#SBATCH --constraint=intel", "#SBATCH --mail-type=FAIL"} <= script  # defaults added
    script = _lines(Job(site=path, command=["true"], constraint="amd").render())
    assert "#SBATCH --constraint=amd" in script and "#SBATCH --constraint=intel" not in script
    with pytest.raises(ConfigError, match=r"^job: exclusive: partition 'cpu' does not allow "
                       r"--exclusive \(site policy\)$"):  # fmt: skip
        Job(site=path, command=["true"], exclusive=True).render()
    with pytest.raises(ConfigError, match=r"sbatch\.nice: partition 'cpu' does not allow --nice"):
        Job(site=path, command=["true"], sbatch={"nice": 5}).render()
    with pytest.raises(ConfigError, match="no node of partition 'cpu' offers feature 'nvlink' "
                       r"\(features: amd, ib, intel\)"):  # fmt: skip
        Job(site=path, command=["true"], constraint="intel&nvlink").render()
    policy = {"defaults": {"exclusive": True}, "required": ["constraint", "comment"]}
    path = str(devcluster_profile_with(tmp_path, gpu={"policy": policy}))
    with pytest.raises(ConfigError, match="constraint: partition 'gpu' requires --constraint "
                       r"\(site policy\): set constraint \(--constraint/-C\)"):  # fmt: skip
        Job(site=path, command=["true"], partition="gpu").render()
    with pytest.raises(ConfigError, match="comment: partition 'gpu' requires --comment"):
        Job(site=path, command=["true"], partition="gpu", constraint="amd").render()
    job = Job(site=path, command=["true"], partition="gpu", constraint="amd", comment="x")
    assert "#SBATCH --exclusive" in _lines(job.render())  # the partition's default
    job = job.model_copy(update={"exclusive": False})  # the job's own choice wins
    assert "#SBATCH --exclusive" not in _lines(job.render())
    Job(site=path, command=["true"], partition="cpu").render()  # the other partition: no rule


def test_sinfo_features_are_parsed_and_imported():
    sinfo = "node1|4|4000|(null)|intel,ib\nnode3|4|4000|gpu:2|amd,ib\nnode9|4|4000|(null)|(null)"
    scontrol = ("PartitionName=cpu Nodes=node[1,3,9] Default=YES MaxTime=UNLIMITED State=UP\n"
                "PartitionName=gpu Nodes=node3 MaxTime=UNLIMITED State=UP")  # fmt: skip
    live = parse_partitions(sinfo, scontrol)
    assert live["cpu"].features == ["amd", "ib", "intel"] and live["gpu"].features == ["amd", "ib"]
    assert parse_partitions("node1|4|4000|(null)", scontrol)["cpu"].features == []  # old format
    draft = import_site("drafted", live)
    assert [p["features"] for p in draft["partitions"]] == [["amd", "ib", "intel"], ["amd", "ib"]]
