"""Table tests for the pure parsers and formulas (no cluster, no subprocess but one).

Expected values follow Slurm's documented formats: ``sbatch --time`` forms and memory units,
``sacct``/``squeue`` state names (sacct truncates to its column width: ``OUT_OF_ME+``),
job-array ids as squeue/sacct print them (``123_[1-3,7%2]``), hostlists as
``scontrol show hostnames`` expands them, and ``SLURM_TASKS_PER_NODE`` (``2(x3),1``).
"""

from __future__ import annotations

import math

import pytest
from pydantic import ValidationError

from hpcdl.config import format_minutes, parse_mem, parse_time
from hpcdl.errors import HpcdlError
from hpcdl.launch import master_port, tasks_per_node
from hpcdl.scheduler.hostlist import expand_hostlist
from hpcdl.scheduler.states import STATES, expand_array_id, normalize_state

# -- time limits ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "minutes"),
    [
        ("30", 30),  # MM
        ("1", 1),
        (" 15 ", 15),
        ("0:30", 1),  # MM:SS, rounded up to whole minutes
        ("1:30", 2),
        ("10:00", 10),
        ("00:59", 1),
        ("1:00:00", 60),  # HH:MM:SS
        ("01:00:00", 60),
        ("00:00:01", 1),
        ("00:01:00", 1),
        ("00:01:01", 2),
        ("23:59:59", 1440),
        ("48:00:00", 2880),  # hours may exceed a day
        ("2-0", 2880),  # D-HH
        ("1-12", 2160),
        ("1-12:30", 2190),  # D-HH:MM
        ("1-00:00:01", 1441),  # D-HH:MM:SS
        ("0-00:00:30", 1),
        ("7-00:00:00", 10080),
        ("30m", 30),  # hpcdl's unit forms
        ("45min", 45),
        ("2h", 120),
        ("2H", 120),
        ("1.5h", 90),
        ("1d", 1440),
        ("90s", 2),
        ("0.5m", 1),
        ("30 m", 30),
        (30, 30),  # ints are minutes
        (1, 1),
        ("infinite", None),
        ("UNLIMITED", None),
        (" unlimited ", None),
    ],
)
def test_parse_time(text, minutes):
    assert parse_time(text) == minutes


@pytest.mark.parametrize(
    "bad",
    [
        "",
        " ",
        "abc",
        "0",
        "00:00:00",
        "0-0",
        "0m",
        "0s",
        "-5",
        "-1:00",
        "1:2:3:4",
        "1-",
        "-1",
        "1--2",
        "1-1-1",
        "1-2:3:4:5",
        "1.5",
        "30x",
        "h",
        "1d2h",
        "inf",
        "1 - 2",
        "1:",
        ":30",
        0,
        -1,
        True,
        False,
        3.5,
        None,
    ],
)
def test_parse_time_rejects(bad):
    with pytest.raises(ValueError):
        parse_time(bad)


@pytest.mark.parametrize(
    ("minutes", "text"),
    [
        (None, "infinite"),
        (1, "00:01:00"),
        (59, "00:59:00"),
        (60, "01:00:00"),
        (61, "01:01:00"),
        (1439, "23:59:00"),
        (1440, "1-00:00:00"),
        (1441, "1-00:01:00"),
        (2190, "1-12:30:00"),
        (10080, "7-00:00:00"),
        (525600, "365-00:00:00"),
    ],
)
def test_format_minutes(minutes, text):
    assert format_minutes(minutes) == text


@pytest.mark.parametrize("minutes", [None, 1, 2, 59, 60, 61, 719, 1439, 1440, 1441, 4321, 99999])
def test_format_minutes_round_trips(minutes):
    assert parse_time(format_minutes(minutes)) == minutes


# -- memory -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "mib"),
    [
        ("500M", 500),
        ("500", 500),  # Slurm's default unit is megabytes
        ("1M", 1),
        ("1MB", 1),
        ("16G", 16384),
        ("16g", 16384),
        ("16GB", 16384),
        (" 4G ", 4096),
        ("1T", 1048576),
        ("2048K", 2),
        ("1024K", 1),
        ("512K", 1),  # less than a MiB still asks for something
        (100, 100),  # ints are MiB
    ],
)
def test_parse_mem(text, mib):
    assert parse_mem(text) == mib


@pytest.mark.parametrize(
    "bad",
    ["", "G", "abc", "0", "0G", "-1G", "1.5G", "16 G", "16GiB", "1P", "G16", 0, -5, True, False],
)
def test_parse_mem_rejects(bad):
    with pytest.raises(ValueError):
        parse_mem(bad)


# -- job states -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "state"),
    [
        ("PENDING", "PENDING"),
        ("RUNNING", "RUNNING"),
        ("COMPLETED", "COMPLETED"),
        ("FAILED", "FAILED"),
        ("CANCELLED", "CANCELLED"),
        ("CANCELLED by 0", "CANCELLED"),  # sacct names who cancelled
        ("CANCELLED by 1000", "CANCELLED"),
        ("CANCELLED+", "CANCELLED"),  # "CANCELLED by ..." cut at sacct's column width
        ("TIMEOUT", "TIMEOUT"),
        ("OUT_OF_MEMORY", "OUT_OF_MEMORY"),
        ("OUT_OF_ME+", "OUT_OF_MEMORY"),  # sacct's default width
        ("OUT_OF_MEM", "OUT_OF_MEMORY"),
        ("NODE_FAIL", "NODE_FAIL"),
        ("BOOT_FAIL", "NODE_FAIL"),
        ("PREEMPTED", "PREEMPTED"),
        ("REQUEUED", "REQUEUED"),
        ("SUSPENDED", "SUSPENDED"),
        ("STOPPED", "SUSPENDED"),
        ("CONFIGURING", "PENDING"),
        ("REQUEUE_HOLD", "PENDING"),
        ("REQUEUE_FED", "PENDING"),
        ("RESV_DEL_HOLD", "PENDING"),
        ("COMPLETING", "RUNNING"),
        ("STAGE_OUT", "RUNNING"),
        ("SIGNALING", "RUNNING"),
        ("RESIZING", "RUNNING"),
        ("DEADLINE", "TIMEOUT"),
        ("REVOKED", "CANCELLED"),
        ("SPECIAL_EXIT", "FAILED"),
        ("running", "RUNNING"),  # any case
        ("Completed", "COMPLETED"),
        ("  RUNNING\n", "RUNNING"),  # whitespace from the command's output
        ("FAILED   ", "FAILED"),
        ("UNKNOWN", "UNKNOWN"),
        ("", "UNKNOWN"),  # malformed: never an exception
        ("   ", "UNKNOWN"),
        ("+", "UNKNOWN"),
        ("garbage", "UNKNOWN"),
        ("RUN", "UNKNOWN"),
        ("R", "UNKNOWN"),  # squeue's compact codes are not asked for
        ("PENDING_FOREVER", "UNKNOWN"),
        ("0", "UNKNOWN"),
    ],
)
def test_normalize_state(raw, state):
    assert normalize_state(raw) == state
    assert state in STATES


# -- array ids --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("jid", "ids"),
    [
        ("123", ["123"]),  # a plain job
        ("123_4", ["123_4"]),  # one array task
        ("123_[5]", ["123_5"]),
        ("123_[1-3]", ["123_1", "123_2", "123_3"]),
        ("123_[1-3,7]", ["123_1", "123_2", "123_3", "123_7"]),
        ("123_[1-3,7%2]", ["123_1", "123_2", "123_3", "123_7"]),  # %N: the throttle
        ("123_[0-3%1]", ["123_0", "123_1", "123_2", "123_3"]),
        ("123_[1,3,5]", ["123_1", "123_3", "123_5"]),
        ("123_[0-6:2]", ["123_0", "123_2", "123_4", "123_6"]),  # :step
        ("123_[1-7:3]", ["123_1", "123_4", "123_7"]),
        ("123_[2-2]", ["123_2"]),
        (" 123_[1-2] ", ["123_1", "123_2"]),
        ("123_[1-2,1-2]", ["123_1", "123_2", "123_1", "123_2"]),  # as written
        ("123_*", ["123_*"]),  # squeue's "all tasks": left alone
        ("123.batch", ["123.batch"]),  # a step: left alone
        ("", [""]),
        ("123_[3-1]", ["123_[3-1]"]),  # malformed: returned unchanged, never an exception
        ("123_[a-b]", ["123_[a-b]"]),
        ("123_[]", ["123_[]"]),
        ("123_[1-3", ["123_[1-3"]),  # cut by sacct's column width
        ("123_[1-3,", ["123_[1-3,"]),
        ("123_[1-3,x]", ["123_[1-3,x]"]),
        ("123_[1-6:0]", ["123_[1-6:0]"]),
        ("123_[-1]", ["123_[-1]"]),
        ("abc_[1-2]", ["abc_[1-2]"]),
    ],
)
def test_expand_array_id(jid, ids):
    assert expand_array_id(jid) == ids


def test_expand_array_id_large():
    ids = expand_array_id("9_[0-999%8]")
    assert len(ids) == 1000
    assert ids[0] == "9_0"
    assert ids[-1] == "9_999"


# -- hostlists --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("nodelist", "hosts"),
    [
        ("node1", ["node1"]),
        ("node1,node2", ["node1", "node2"]),
        ("node[1-3,5]", ["node1", "node2", "node3", "node5"]),
        ("gpu-a[01-02],cpu7", ["gpu-a01", "gpu-a02", "cpu7"]),
        ("a[1-2]b[3-4]", ["a1b3", "a1b4", "a2b3", "a2b4"]),  # several brackets multiply
        ("n[08-10]", ["n08", "n09", "n10"]),  # the lower bound's padding
        ("n[8-10]", ["n8", "n9", "n10"]),
        ("n[098-101]", ["n098", "n099", "n100", "n101"]),
        ("n[001-003]", ["n001", "n002", "n003"]),
        ("n[1]", ["n1"]),
        ("n[7,3]", ["n7", "n3"]),  # order as written
        ("n[1-2]-ib", ["n1-ib", "n2-ib"]),  # text after the bracket
        ("n[1-2],m[3-4]", ["n1", "n2", "m3", "m4"]),
        ("rack1-n[1-2],login", ["rack1-n1", "rack1-n2", "login"]),
        ("c1.cluster,c2.cluster", ["c1.cluster", "c2.cluster"]),
        ("[1-2]", ["1", "2"]),
        ("", []),
        ("   ", []),
        ("n1,", ["n1"]),
        (",n1", ["n1"]),
        (" n1 , n2 ", ["n1", "n2"]),
    ],
)
def test_expand_hostlist(nodelist, hosts):
    assert expand_hostlist(nodelist) == hosts


def test_expand_hostlist_large():
    hosts = expand_hostlist("gpu[0001-1024]")
    assert len(hosts) == 1024
    assert hosts[0] == "gpu0001"
    assert hosts[-1] == "gpu1024"
    assert len(set(hosts)) == 1024


@pytest.mark.parametrize(
    "bad",
    [
        "n[1-2",  # unclosed
        "n1-2]",  # unbalanced
        "n[[1]]",  # nested
        "n[a-b]",  # not numbers
        "n[3-1]",  # reversed
        "n[]",  # empty
        "n[1-2-3]",
        "n[-1]",
        "n[1,]",
        "n[1-2]x[",
    ],
)
def test_expand_hostlist_rejects(bad):
    with pytest.raises(ValueError):
        expand_hostlist(bad)


# -- tasks per node ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "counts"),
    [
        ("1", [1]),
        ("4", [4]),
        ("2,2", [2, 2]),
        ("2(x3),1", [2, 2, 2, 1]),
        ("1(x2)", [1, 1]),
        ("8(x4)", [8, 8, 8, 8]),
        ("2(x2),1,3(x2)", [2, 2, 1, 3, 3]),
        ("16", [16]),
        (" 2(x2) , 1 ", [2, 2, 1]),
        ("1(x1)", [1]),
    ],
)
def test_tasks_per_node(spec, counts):
    assert tasks_per_node(spec) == counts


@pytest.mark.parametrize(
    "bad", ["", " ", "x", "2(3)", "2(x)", "(x2)", "2x3", "-1", "2(x3", "2,,1", "2(x-1)", "a,b"]
)
def test_tasks_per_node_rejects(bad):
    with pytest.raises(HpcdlError):
        tasks_per_node(bad)


# -- master port ------------------------------------------------------------------------------


@pytest.mark.parametrize("job_id", ["1", "42", "123456", "9999999", "local-abc", ""])
@pytest.mark.parametrize("task", [None, "0", "1", "999"])
def test_master_port_range(no_port_override, job_id, task):
    port = master_port(job_id, task)
    assert 20000 <= port <= 32767  # below the ephemeral ports
    assert port == master_port(job_id, task)


def test_master_port_separates_jobs_and_array_tasks(no_port_override):
    """Array tasks of one job, and neighbouring jobs, share nodes: their ports must differ."""
    tasks = {master_port("1234", str(i)) for i in range(16)}
    assert len(tasks) == 16
    jobs = {master_port(str(j)) for j in range(5000, 5016)}
    assert len(jobs) == 16
    assert master_port("1234") == master_port("1234", None) == master_port("1234", "")
    assert master_port("1234") != master_port("1234", "0")


@pytest.mark.parametrize(("value", "port"), [("29500", 29500), ("1024", 1024), ("65535", 65535)])
def test_master_port_override(monkeypatch, value, port):
    monkeypatch.setenv("HPCDL_MASTER_PORT", value)
    assert master_port("1234", "5") == port
    assert master_port("other") == port


def test_master_port_empty_override_is_ignored(monkeypatch):
    monkeypatch.setenv("HPCDL_MASTER_PORT", "")
    assert 20000 <= master_port("1234") <= 32767


@pytest.mark.parametrize("value", ["abc", "12.5", "port"])
def test_master_port_bad_override(monkeypatch, value):
    monkeypatch.setenv("HPCDL_MASTER_PORT", value)
    with pytest.raises((ValueError, HpcdlError)):
        master_port("1234")


# -- learning-rate schedule and DeepSpeed config ----------------------------------------------


def _train_config(**fields):
    from hpcdl.train.config import TrainConfig

    return TrainConfig(data={"train": "train", "val": "val"}, **fields)


def _lr(schedule: dict, total: int):
    from hpcdl.train.engine import lr_factor

    return lr_factor(_train_config(schedule=schedule), total)


_COS_QUARTER = 0.5 * (1 + math.cos(math.pi / 4))


@pytest.mark.parametrize(
    ("schedule", "total", "step", "factor"),
    [
        ({}, 100, 0, 1.0),  # constant, no warmup
        ({}, 100, 99, 1.0),
        ({}, 100, 1000, 1.0),
        ({"warmup_steps": 10}, 100, 0, 0.1),  # linear warmup from 1/warmup
        ({"warmup_steps": 10}, 100, 4, 0.5),
        ({"warmup_steps": 10}, 100, 9, 1.0),
        ({"warmup_steps": 10}, 100, 10, 1.0),
        ({"warmup_steps": 10}, 100, 500, 1.0),
        ({"warmup_steps": 1}, 100, 0, 1.0),
        ({"name": "cosine"}, 100, 0, 1.0),
        ({"name": "cosine"}, 100, 25, _COS_QUARTER),
        ({"name": "cosine"}, 100, 50, 0.5),
        ({"name": "cosine"}, 100, 100, 0.0),
        ({"name": "cosine"}, 100, 1000, 0.0),  # past the end: stays at the floor
        ({"name": "cosine", "min_lr_ratio": 0.1}, 100, 50, 0.55),
        ({"name": "cosine", "min_lr_ratio": 0.1}, 100, 100, 0.1),
        ({"name": "cosine", "min_lr_ratio": 1.0}, 100, 60, 1.0),
        ({"name": "cosine", "warmup_steps": 10}, 110, 5, 0.6),
        ({"name": "cosine", "warmup_steps": 10}, 110, 10, 1.0),
        ({"name": "cosine", "warmup_steps": 10}, 110, 60, 0.5),
        ({"name": "cosine", "warmup_steps": 10}, 110, 110, 0.0),
        ({"name": "linear"}, 100, 0, 1.0),
        ({"name": "linear"}, 100, 25, 0.75),
        ({"name": "linear"}, 100, 50, 0.5),
        ({"name": "linear"}, 100, 100, 0.0),
        ({"name": "linear", "min_lr_ratio": 0.2}, 100, 50, 0.6),
        ({"name": "linear", "min_lr_ratio": 0.2}, 100, 200, 0.2),
        ({"name": "linear", "warmup_steps": 10}, 110, 60, 0.5),
        ({"name": "linear", "warmup_steps": 10}, 5, 3, 0.4),  # warmup longer than the run
        ({"name": "linear", "warmup_steps": 10}, 5, 10, 1.0),
        ({"name": "linear"}, 1, 0, 1.0),  # a one-step run
        ({"name": "cosine"}, 0, 0, 1.0),  # no steps at all: no division by zero
    ],
)
def test_lr_factor(schedule, total, step, factor):
    assert _lr(schedule, total)(step) == pytest.approx(factor)


@pytest.mark.parametrize("name", ["cosine", "linear"])
@pytest.mark.parametrize("floor", [0.0, 0.3])
def test_lr_factor_decays_monotonically_within_bounds(name, floor):
    f = _lr({"name": name, "warmup_steps": 20, "min_lr_ratio": floor}, 200)
    warm = [f(s) for s in range(20)]
    decay = [f(s) for s in range(20, 260)]
    assert warm == sorted(warm)
    assert decay == sorted(decay, reverse=True)
    assert all(floor - 1e-12 <= v <= 1.0 for v in decay)


@pytest.mark.parametrize(
    "schedule",
    [
        {"name": "exponential"},
        {"warmup_steps": -1},
        {"min_lr_ratio": -0.1},
        {"min_lr_ratio": 1.5},
        {"name": "cosine", "decay": 2},  # unknown key
        {"warmup_steps": "ten"},
    ],
)
def test_lr_schedule_rejects(schedule):
    with pytest.raises(ValidationError):
        _train_config(schedule=schedule)


def _ds(world: int = 1, **fields):
    from hpcdl.train.engine import deepspeed_config

    return deepspeed_config(_train_config(**fields), world)


@pytest.mark.parametrize(
    ("fields", "world", "expected"),
    [
        ({}, 1, {"train_batch_size": 64, "train_micro_batch_size_per_gpu": 16}),
        ({}, 1, {"gradient_accumulation_steps": 4}),
        ({}, 2, {"gradient_accumulation_steps": 2}),
        ({}, 4, {"gradient_accumulation_steps": 1}),
        ({"batch": {"size": 96, "micro": 8}}, 3, {"gradient_accumulation_steps": 4}),
        ({}, 1, {"zero_optimization": {"stage": 2}}),
        ({"zero_stage": 0}, 1, {"zero_optimization": {"stage": 0}}),
        ({"zero_stage": 3}, 1, {"zero_optimization": {"stage": 3}}),
        ({}, 1, {"bf16": {"enabled": False}, "fp16": {"enabled": False}}),
        ({"precision": "bf16"}, 1, {"bf16": {"enabled": True}, "fp16": {"enabled": False}}),
        ({"precision": "fp16"}, 1, {"bf16": {"enabled": False}, "fp16": {"enabled": True}}),
        ({}, 1, {"gradient_clipping": 1.0}),
        ({"grad_clip": 0.5}, 1, {"gradient_clipping": 0.5}),
        # merged over the generated config: nested dicts key by key, anything else replaces
        (
            {"deepspeed": {"zero_optimization": {"offload_optimizer": {"device": "cpu"}}}},
            1,
            {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}},
        ),
        (
            {"zero_stage": 1, "deepspeed": {"zero_optimization": {"stage": 3}}},
            1,
            {"zero_optimization": {"stage": 3}},
        ),
        (
            {"deepspeed": {"bf16": {"enabled": True}}},
            1,
            {"bf16": {"enabled": True}, "fp16": {"enabled": False}},
        ),
        ({"deepspeed": {"steps_per_print": 10}}, 1, {"steps_per_print": 10}),
        ({"deepspeed": {"gradient_clipping": 0.0}}, 1, {"gradient_clipping": 0.0}),
        ({"deepspeed": {"wall_clock_breakdown": True}}, 1, {"wall_clock_breakdown": True}),
        ({"deepspeed": {"zero_optimization": 2}}, 1, {"zero_optimization": 2}),  # replaces
        (
            {"deepspeed": {"fp16": {"loss_scale": 0, "initial_scale_power": 8}}},
            1,
            {"fp16": {"enabled": False, "loss_scale": 0, "initial_scale_power": 8}},
        ),
        (
            {
                "deepspeed": {
                    "zero_optimization": {"offload_param": {"device": "cpu", "pin_memory": True}}
                }
            },
            1,
            {
                "zero_optimization": {
                    "stage": 2,
                    "offload_param": {"device": "cpu", "pin_memory": True},
                }
            },
        ),
    ],
)
def test_deepspeed_config(fields, world, expected):
    ds = _ds(world, **fields)
    for key, value in expected.items():
        assert ds[key] == value, key


@pytest.mark.parametrize("world", [1, 2, 4])
@pytest.mark.parametrize(("size", "micro"), [(64, 16), (32, 8), (16, 4)])
def test_deepspeed_batch_arithmetic(world, size, micro):
    """DeepSpeed requires train_batch_size = micro x accumulation x world."""
    ds = _ds(world, batch={"size": size, "micro": micro})
    assert ds["train_batch_size"] == (
        ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * world
    )


def test_deepspeed_config_without_clipping_has_no_clipping_key():
    assert "gradient_clipping" not in _ds(grad_clip=None)


def test_deepspeed_config_leaves_the_config_alone():
    """The merge copies: the user's dict and the next call's result stay as they were."""
    cfg = _train_config(deepspeed={"zero_optimization": {"offload_optimizer": {"device": "cpu"}}})
    from hpcdl.train.engine import deepspeed_config

    before = cfg.model_dump()
    first = deepspeed_config(cfg, 1)
    first["zero_optimization"]["stage"] = 99
    assert cfg.model_dump() == before
    assert deepspeed_config(cfg, 1)["zero_optimization"]["stage"] == 2


@pytest.mark.parametrize(
    "fields",
    [
        {"batch": {"size": 60, "micro": 16}},  # not a multiple of micro
        {"batch": {"size": 0}},
        {"batch": {"micro": 0}},
        {"zero_stage": 4},
        {"precision": "fp8"},
        {"grad_clip": 0},
        {"grad_clip": -1.0},
        {"deepspeed": "stage3.json"},
    ],
)
def test_deepspeed_inputs_rejected(fields):
    with pytest.raises(ValidationError):
        _train_config(**fields)


# -- partitions (``scontrol show partition -o`` + ``sinfo``) ----------------------------------------
SINFO = "node1|4|4000|(null)\nnode2|4|4000|(null)\nnode3|4|4000|gpu:2(S:0)\n"
SCONTROL = (
    "PartitionName=cpu Default=YES GraceTime=0 MaxNodes=UNLIMITED MaxTime=1-00:00:00 "
    "Nodes=node[1-3] PreemptMode=OFF State=UP TotalNodes=3\n"
    "PartitionName=low Default=NO GraceTime=20 MaxNodes=UNLIMITED MaxTime=04:00:00 "
    "Nodes=node[1-2] PreemptMode=REQUEUE State=UP TotalNodes=2\n"
    "PartitionName=gang Default=NO GraceTime=5 MaxNodes=2 MaxTime=UNLIMITED "
    "Nodes=node3 PreemptMode=GANG,SUSPEND State=DOWN TotalNodes=1\n"
)


def test_partitions_carry_their_preemption_mode_and_grace_time():
    from hpcdl.scheduler.live import import_site, parse_partitions

    live = parse_partitions(SINFO, SCONTROL)
    assert [(p.name, p.preempt_mode, p.grace_time_s) for p in live.values()] == [
        ("cpu", "OFF", 0),
        ("low", "REQUEUE", 20),
        ("gang", "GANG", 5),
    ]
    assert (live["gang"].max_time, live["gang"].max_nodes, live["gang"].gpus_per_node) == (
        "infinite",
        2,
        2,
    )
    live.pop("gang")  # not a mode a profile takes
    draft = import_site("drafted", live)
    assert draft["partitions"][1]["grace_time_s"] == 20
    assert draft["preemption"]["grace_time_s"] == 20


def test_a_runs_grace_time_is_its_partitions():
    from hpcdl.config import validate
    from hpcdl.site import SiteProfile
    from hpcdl.train.run import preemption_values

    site = validate(
        SiteProfile,
        {
            "name": "t",
            "scheduler": "slurm",
            "partitions": [
                {"name": "cpu", "default": True, "cpus_per_node": 4},
                {"name": "low", "cpus_per_node": 4, "preempt_mode": "REQUEUE", "grace_time_s": 7},
            ],
            "preemption": {"grace_time_s": 45},
        },
        "t.yaml",
    )
    assert preemption_values(site, "low")["grace_time_s"] == 7
    assert preemption_values(site, None)["grace_time_s"] == 45  # cpu: the site's value
    assert preemption_values(site, "nope")["grace_time_s"] == 45
