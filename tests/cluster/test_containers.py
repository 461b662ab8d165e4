"""Containers: the exact wrapping each runtime renders (no cluster), bad container settings (one
line each), and jobs that really run inside a Charliecloud image on the dev cluster.

The image is ``env/container/build-image.sh``'s (``make image``): Debian bookworm from
debootstrap, with the checkout (and its venv) and the venv's base interpreter bound at the same
paths, so ``python -m hpcdl...`` works inside. The cluster tests are marked ``container`` as well
as ``slurm``: ``pytest -m "not container"`` skips them in a quick loop. ``make test`` runs them as
the unprivileged hpcdl-alice (``tests/run_as_user.sh``), as a site's users run an image root
built: root builds it (``make image``), the user finds it built and runs it with ``ch-run``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO, REPORT, WEIRD, one_line_error, site_data

from hpcdl import Job, load_site
from hpcdl.cli import main
from hpcdl.errors import ConfigError
from hpcdl.scheduler import log_tail

IMG = "/var/tmp/hpcdl-images/0123456789abcdef"
CH = {"runtime": "charliecloud", "image": IMG, "binds": ["/shared", "/opt/py:/opt/py"],
      "python": "/opt/venv/bin/python"}  # fmt: skip
HELPERS = REPO / "tests/helpers"


def _profile(folder: Path, container: dict, name: str = "ch-devcluster", **extra) -> Path:
    """The devcluster profile with a ``container`` section, as ``folder/NAME.yaml``."""
    data = yaml.safe_load((REPO / "hpcdl/sites/devcluster.yaml").read_text())
    data.update(name=name, container=container, **extra)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _callable() -> None:
    """A Python callable job's function (never run by the render tests)."""


# -- rendering (no cluster) ----------------------------------------------------------------------
def test_charliecloud_command_job_renders_ch_run(tmp_path):
    site = _profile(tmp_path, CH)
    job = Job(site=str(site), command=["python", "train.py", "--lr", "0.1"], cwd="/work/x")
    assert job.task(load_site(site)).argv == [
        "ch-run", "--bind=/shared", "--bind=/opt/py:/opt/py", "--cd=/work/x", IMG, "--",
        "python", "train.py", "--lr", "0.1"]  # fmt: skip
    lines = job.render(folder=tmp_path / "f").splitlines()
    assert lines[1] == (
        "# hpcdl: each task runs (charliecloud): ch-run --bind=/shared --bind=/opt/py:/opt/py "
        f"--cd=/work/x {IMG} -- python train.py --lr 0.1"
    )
    assert 'export USER="${USER:-$(id -un)}"' in lines  # ch-run refuses to start without it
    srun = [ln for ln in lines if ln.startswith("srun ")]
    assert srun and "ch-run" not in srun[0], "a command's task runs outside, its command inside"


def test_charliecloud_callable_job_renders_ch_run_interpreter(tmp_path):
    site = _profile(tmp_path, CH)
    folder = tmp_path / "f"
    script = Job(site=str(site), function=_callable, cwd="/work/x").render(folder=folder)
    inside = (f"ch-run --bind=/shared --bind=/opt/py:/opt/py --cd=/work/x {IMG} -- "
              f"/opt/venv/bin/python -u -m submitit.core._submit {folder}")  # fmt: skip
    srun = [ln for ln in script.splitlines() if ln.startswith("srun ")]
    assert len(srun) == 1 and srun[0].endswith(" " + inside), srun
    assert script.splitlines()[1] == (
        f"# hpcdl: each task runs (charliecloud): {inside.split(' -u -m')[0]}"
    )


def test_pyxis_wraps_command_and_callable_jobs(tmp_path):
    pyxis = {"runtime": "pyxis", "image": "nvcr.io#nvidia/pytorch:24.05-py3",
             "binds": ["/p/scratch:/scratch"]}  # fmt: skip
    site = _profile(tmp_path, pyxis, name="px")
    for job in (Job(site=str(site), command=["python", "train.py"], cwd="/w"),
                Job(site=str(site), function=_callable, cwd="/w")):  # fmt: skip
        script = job.render(folder=tmp_path / "f")
        srun = [ln for ln in script.splitlines() if ln.startswith("srun ")]
        assert len(srun) == 1
        assert " '--container-image=nvcr.io#nvidia/pytorch:24.05-py3' " in srun[0]
        assert " --container-mounts=/p/scratch:/scratch " in srun[0]
        assert f" python3 -u -m submitit.core._submit {tmp_path / 'f'}" in srun[0]
    assert script.splitlines()[1].startswith(
        "# hpcdl: each task runs (pyxis): srun '--container-image="
    )


NO_CLIENT = ("# hpcdl: the image has no Slurm client (container.slurm_client: false): trainings "
             "that requeue (scontrol) and sweeps (sbatch) are refused at submission")  # fmt: skip


def test_apptainer_wraps_callable_jobs_and_comments_commands():
    script = Job(site="example-gpu-site", function=_callable, cwd="/w").render(folder=Path("/f"))
    assert any(ln.endswith(" apptainer exec --bind /p/scratch --bind /p/project "
                           "/p/software/containers/pytorch-2.13.sif python3 -u -m "
                           "submitit.core._submit /f") for ln in script.splitlines())  # fmt: skip
    assert script.splitlines()[2] == NO_CLIENT
    script = Job(site="example-gpu-site", command=["python", "t.py"]).render(folder=Path("/f"))
    assert script.splitlines()[1] == (
        "# hpcdl: each task runs (apptainer): apptainer exec --bind /p/scratch --bind /p/project "
        "/p/software/containers/pytorch-2.13.sif python t.py"
    )
    assert script.splitlines()[2] == NO_CLIENT  # what the example site refuses, and why


def test_render_says_when_the_image_has_the_slurm_client(tmp_path):
    site = _profile(tmp_path, {**CH, "slurm_client": True})
    script = Job(site=str(site), command=["true"], cwd="/w").render(folder=tmp_path / "f")
    assert script.splitlines()[2] == (
        "# hpcdl: the image has the Slurm client (container.slurm_client: true): trainings that "
        "requeue (scontrol) and sweeps (sbatch) run them inside"
    )


def test_no_container_no_comment():
    script = Job(site="devcluster", command=["true"]).render(folder=Path("/f"))
    assert "# hpcdl: each task runs" not in script and "id -un" not in script


# -- bad input ---------------------------------------------------------------------------------
BAD = [
    ("relative image", {"runtime": "charliecloud", "image": "img"}, "container: charliecloud image 'img' must be an absolute path to an image directory"),
    ("no image", {"runtime": "charliecloud"}, "runtime 'charliecloud' needs an image"),
    ("bind options", {**CH, "binds": ["/a:/b:ro"]}, "bind '/a:/b:ro': use SRC or SRC:DST"),
    ("relative bind", {**CH, "binds": ["data:/data"]}, "bind 'data:/data': paths must be absolute"),
    ("empty bind", {**CH, "binds": [""]}, "bind '': use SRC or SRC:DST"),
    ("pyxis comma", {"runtime": "pyxis", "image": "x", "binds": ["/a,b"]}, "must not contain one"),
    ("relative python", {**CH, "python": "venv/bin/python"}, "python 'venv/bin/python': give a command name or an absolute path"),
    ("runtime", {"runtime": "docker", "image": "x"}, "container.runtime"),
    ("slurm_client", {**CH, "slurm_client": "perhaps"}, "container.slurm_client"),
    ("slurm_client list", {**CH, "slurm_client": ["sbatch"]}, "container.slurm_client"),
]  # fmt: skip


@pytest.mark.parametrize("label,container,expected", BAD, ids=[b[0] for b in BAD])
def test_bad_container_section(tmp_path, capsys, label, container, expected):
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(site_data(container=container)))
    line = one_line_error(capsys, main(["site", "show", str(path)]))
    assert str(path) in line and expected in line, line


def test_bad_job_container(tmp_path, capsys):
    site = _profile(tmp_path, CH)
    cmd = ["submit", "--site", str(site), "--container", "rel/img", "--", "true"]
    line = one_line_error(capsys, main(cmd))
    assert "container: charliecloud image 'rel/img' must be an absolute path" in line
    line = one_line_error(capsys, main(["submit", "--site", "devcluster", "--container",
                                          "/img", "--", "true"]))  # fmt: skip
    assert "container: this site has no container runtime" in line


# -- Slurm commands from inside the image: refused at submission without the client ------------
def _train_config(tmp_path: Path, **changes: object) -> Path:
    sys.path.insert(0, str(HELPERS))
    from train_setup import write_config

    data = tmp_path / "no-data"  # the container check comes before the datasets' own
    return write_config(tmp_path / "c.yaml", data, tmp_path / "runs", **changes)


def test_a_training_that_requeues_from_inside_an_image_without_slurm_needs_the_client(
    tmp_path, capsys
):
    from hpcdl.train.run import Run

    site = _profile(tmp_path, CH)
    config = _train_config(tmp_path)
    line = one_line_error(capsys, main(["train", str(config), "--site", str(site)]))
    assert f"{config}: job: container.slurm_client: the trainer requeues itself with 'scontrol " \
           f"requeue' inside the charliecloud image {IMG}, which has no Slurm client" in line  # fmt: skip
    assert "sets slurm_client: true; or set job.max_requeues=0" in line
    assert not (tmp_path / "runs").exists()  # nothing made
    # no requeues, or an image with the client: the next check (the datasets) speaks instead
    client = _profile(tmp_path, {**CH, "slurm_client": True}, name="client")
    for site_path, overrides in ((site, ["job.max_requeues=0"]), (client, [])):
        with pytest.raises(ConfigError) as exc:
            Run.from_config(config, overrides, site=str(site_path)).check()
        assert "slurm_client" not in str(exc.value) and "no-data" in str(exc.value), exc.value


def test_a_sweep_on_an_image_without_slurm_is_refused_before_anything_is_written(tmp_path, capsys):
    site = _profile(tmp_path, CH)
    spec = {"name": "ch-sweep", "objective": "tests.helpers.objectives:curve", "trials": 2,
            "space": {"x": {"type": "uniform", "low": 0.0, "high": 1.0}},
            "resources": {"site": str(site), "time": "10m"}}  # fmt: skip
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec))
    line = one_line_error(capsys, main(["sweep", "run", str(tmp_path / "s.yaml")]))
    assert line == (
        "error: sweep: container.slurm_client: the follow-up job submits with 'sbatch' inside "
        f"the charliecloud image {IMG}, which has no Slurm client (slurm_client: false in the "
        "site profile's container section): an admin who binds the Slurm client, /etc/slurm "
        "and the munge socket into the image sets slurm_client: true"
    )
    assert not list(load_site(site).job_root_path.glob("sweeps/*"))  # no sweep folder


def test_no_container_or_no_slurm_command_needs_no_client():
    from hpcdl.containers import Container, check_slurm_client

    ch = Container(**CH)
    check_slurm_client(ch, IMG, None, "job")  # nothing run inside
    check_slurm_client(Container(), None, "sbatch", "job")  # no container
    check_slurm_client(Container(**{**CH, "slurm_client": True}), IMG, "sbatch", "job")
    with pytest.raises(ConfigError, match=r"^job: container\.slurm_client: sbatch inside"):
        check_slurm_client(ch, IMG, "sbatch", "job")


# -- on the dev cluster, inside the image ------------------------------------------------------
@pytest.fixture(scope="module")
def image() -> str:
    """The image directory (built once, then cached: well under a second)."""
    proc = subprocess.run([str(REPO / "env/container/build-image.sh")], capture_output=True,
                          text=True, timeout=900, env={**os.environ, "HPCDL_VENV": sys.prefix})  # fmt: skip
    if proc.returncode != 0:
        pytest.fail(f"build-image.sh failed:\n{proc.stdout}\n{proc.stderr}", pytrace=False)
    return proc.stdout.strip().splitlines()[-1]


@pytest.fixture
def ch_site(image, tmp_path, monkeypatch) -> str:
    """A devcluster profile running every task in the image, found by name (jobs load it
    again inside); ``tmp_path/bound`` is bound at the image's /mnt."""
    (tmp_path / "bound").mkdir()
    binds = [str(REPO), sys.base_prefix, f"{tmp_path / 'bound'}:/mnt"]
    if not Path(sys.prefix).is_relative_to(REPO):  # a worktree using another checkout's venv
        binds.append(sys.prefix)  # (build-image.sh made its mount point)
    container = {
        "runtime": "charliecloud",
        "image": image,
        "binds": binds,
        "python": sys.executable,
    }
    _profile(tmp_path, container, env={"SITE_VALUE": "site: two words"})
    monkeypatch.setenv("HPCDL_SITE_PATH", f"{tmp_path}:{REPO / 'hpcdl/sites'}")
    monkeypatch.chdir(tmp_path)  # the tasks start here (ch-run --cd; /tmp is shared)
    return "ch-devcluster"


def _finished(handle, timeout: float) -> None:
    state = handle.wait(timeout=timeout)
    assert state == "COMPLETED", f"{state}\n{log_tail(handle)}"


@pytest.mark.slurm
@pytest.mark.container
def test_command_job_runs_inside_the_image(devcluster, ch_site, image, tmp_path):
    out = tmp_path / "inside.txt"
    probe = f"cat /etc/hpcdl-image; pwd; (command -v scontrol || echo none) > {out}"
    handle = Job(site=ch_site, name="ch-cmd", time="5m", command=["sh", "-c", probe]).submit()
    _finished(handle, 120)
    stdout = handle.log_paths()[0].read_text()
    assert f"hpcdl-image {Path(image).name}" in stdout, stdout  # the image's own marker
    assert f"\n{tmp_path}\n" in stdout  # started in the submission folder (--cd)
    assert out.read_text() == "none\n", "the image has no Slurm client: rendezvous cannot use it"


@pytest.mark.slurm
@pytest.mark.container
def test_binds_and_environment_arrive_intact(devcluster, ch_site, tmp_path):
    env = {f"WEIRD_{i}": value for i, value in enumerate(WEIRD)}
    names = ",".join([*env, "SITE_VALUE", "HPCDL_SITE", "USER"])
    # REPORT writes into /mnt inside: the file must appear in the bound folder outside.
    job = Job(site=ch_site, name="ch-env", time="5m", nodes=2, env=env,
              command=[sys.executable, REPORT, "/mnt/report", names, "a b", "$(x)"])  # fmt: skip
    _finished(job.submit(), 120)
    reports = [json.loads(p.read_text()) for p in sorted((tmp_path / "bound").glob("report.*"))]
    assert [r["procid"] for r in reports] == ["0", "1"], reports
    for r in reports:
        assert r["argv"] == ["a b", "$(x)"]
        assert {k: r["env"][k] for k in env} == env
        assert r["env"]["SITE_VALUE"] == "site: two words"
        assert r["env"]["HPCDL_SITE"] == "ch-devcluster" and r["env"]["USER"]
    assert not Path("/tmp/pwned-hpcdl").exists()


@pytest.mark.slurm
@pytest.mark.container
def test_two_node_training_inside_the_image(devcluster, ch_site, image, tmp_path, monkeypatch):
    sys.path.insert(0, str(HELPERS))
    from train_setup import rows, write_config, write_digits

    from hpcdl.train.run import Run

    monkeypatch.setenv("PYTHONPATH", f"{HELPERS}:{os.environ['PYTHONPATH']}")
    probe = tmp_path / "probe"
    model = {"name": "container_models:ImageProbeMLP", "hidden": [32], "probe": str(probe)}
    config = write_config(tmp_path / "c.yaml", write_digits(tmp_path / "digits"), tmp_path / "runs",
                          model=model, epochs=1, job__nodes=2, job__tasks_per_node=1,
                          job__time="00:05:00", job__max_requeues=0)  # fmt: skip
    # job.max_requeues=0: the image has no Slurm client, so no 'scontrol requeue' inside
    run = Run.from_config(config, site=ch_site)
    handle = run.submit()
    _finished(handle, 240)
    marker = f"hpcdl-image {Path(image).name}"
    for rank in (0, 1):  # both ranks built the model inside the image, in a world of two
        text = Path(f"{probe}.{rank}").read_text()
        assert marker in text and "world 2" in text, text
    assert len(rows(run.run_dir, "epoch")) == 1
    script = next(Path(handle.folder).glob("*_submission.sh")).read_text()
    assert f"{image} -- {sys.executable} -u -m submitit.core._submit" in script


@pytest.mark.slurm
@pytest.mark.container
def test_a_job_root_in_the_users_home_is_reached_through_the_home_tree(
    devcluster, ch_site, image, tmp_path, monkeypatch
):
    """The default job root is ``$HOME/.hpcdl/jobs``: a callable's pickle and result live there
    and are read and written inside the image. The image has no mount point per user (it is
    built once, by root, for all): a profile binds the home tree, ``/home``, and every user's
    job root is at its own path inside. Here as the user who runs the tests (hpcdl-alice in
    ``make test``; root's home, /root, is not under /home)."""
    home = Path.home()
    if not home.is_relative_to("/home"):
        pytest.skip(f"HOME {home} is not under /home: run as a user (tests/run_as_user.sh)")
    site = yaml.safe_load((tmp_path / f"{ch_site}.yaml").read_text())
    site["container"]["binds"].append("/home")
    (tmp_path / f"{ch_site}.yaml").write_text(yaml.safe_dump(site))
    # a folder of its own in the home (removed after), not the user's real ~/.hpcdl
    mine = home / f".hpcdl-test-containers-{os.getpid()}-{tmp_path.name}"
    monkeypatch.setenv("HPCDL_JOB_ROOT", str(mine / "jobs"))
    copy = mine / "marker"
    try:
        job = Job(site=ch_site, name="ch-home", time="5m", function=shutil.copyfile,
                  args=("/etc/hpcdl-image", str(copy)))  # fmt: skip
        handle = job.submit()
        assert Path(handle.folder).is_relative_to(home), handle.folder
        _finished(handle, 120)
        # the image's own file, copied into the home from inside: the same folder on both sides
        assert copy.read_text().startswith(f"hpcdl-image {Path(image).name}\n")
    finally:
        shutil.rmtree(mine, ignore_errors=True)
