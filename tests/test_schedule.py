"""``planetseg schedule``: the cron parser, one-line errors, and each backend for real.

The sbatch tests run on the single-node SLURM of :mod:`tests.slurm`: what the schedule installs
(a pending job with ``--begin`` and the singleton dependency, tagged with the workflow), and the
chain itself (a run starts at its cron time, tries ``planetseg run`` and submits its successor
whether the run fails or not). The crontab test uses this user's real crontab and restores it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from planetseg.errors import InvalidArgumentError
from planetseg.schedule import Cron, job_name, state_dir
from tests.test_cli import assert_one_line_error, planetseg

FLOW = """\
name: nightly
catalog:
  catalog: world
  collections: [synthetic-moon]
cube:
  store: cube.zarr
  tile: 256
steps:
  ingest: {}
outputs: out
"""


@pytest.fixture
def flow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A workflow that loads (its catalog folder is empty), and a private state folder."""
    (tmp_path / "world").mkdir()
    path = tmp_path / "flow.yaml"
    path.write_text(FLOW)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    return path


# ----------------------------------------------------------------------------- cron parser

NOW = datetime(2026, 12, 1, 11, 5, 30)  # a Tuesday


@pytest.mark.parametrize(
    ("expression", "after", "expected"),
    [
        ("* * * * *", NOW, datetime(2026, 12, 1, 11, 6)),
        ("*/15 * * * *", NOW, datetime(2026, 12, 1, 11, 15)),
        ("0 2 * * *", NOW, datetime(2026, 12, 2, 2, 0)),
        ("0 2 * * *", datetime(2026, 12, 2, 2, 0), datetime(2026, 12, 3, 2, 0)),  # strictly after
        ("30 4 1,15 * 5", NOW, datetime(2026, 12, 4, 4, 30)),  # day of month OR Friday
        ("0 0 29 2 *", NOW, datetime(2028, 2, 29)),
        ("@weekly", NOW, datetime(2026, 12, 6)),
        ("0 12 * * 7", NOW, datetime(2026, 12, 6, 12)),  # 7 is Sunday too
        ("5/20 9-17 * jan-mar mon-fri", NOW, datetime(2027, 1, 1, 9, 5)),
        ("0 0 1 * *", datetime(2026, 12, 31, 23, 59), datetime(2027, 1, 1)),
        ("10-20/5 * * * *", NOW, datetime(2026, 12, 1, 11, 10)),
    ],
)
def test_cron_next_time(expression: str, after: datetime, expected: datetime) -> None:
    assert Cron.parse(expression).next_after(after) == expected


def test_cron_sequence_of_a_step_list() -> None:
    cron = Cron.parse("0,30 8-9 * * mon")
    times, t = [], NOW
    for _ in range(5):
        t = cron.next_after(t)
        times.append(t)
    day = datetime(2026, 12, 7)
    assert times == [day.replace(hour=8), day.replace(hour=8, minute=30), day.replace(hour=9),
                     day.replace(hour=9, minute=30), datetime(2026, 12, 14, 8)]  # fmt: skip


@pytest.mark.parametrize(
    ("expression", "words"),
    [
        ("61 * * * *", ["minute field", "61", "0..59"]),
        ("* 24 * * *", ["hour field", "0..23"]),
        ("* * 0 * *", ["day-of-month field", "1..31"]),
        ("* * * foo *", ["month field", "'foo'"]),
        ("* * * * 8", ["day-of-week field", "0..7"]),
        ("*/0 * * * *", ["minute field", "step"]),
        ("5-1 * * * *", ["minute field", "'5-1'"]),
        ("* * * *", ["5 fields"]),
        ("0 0 31 2 *", ["names no day"]),
    ],
)
def test_bad_cron_names_the_field(expression: str, words: list[str]) -> None:
    with pytest.raises(InvalidArgumentError) as caught:
        Cron.parse(expression).next_after(NOW)
    assert all(w in str(caught.value) for w in words), caught.value


def test_removing_an_entry_keeps_every_other_line_of_the_table() -> None:
    from planetseg.schedule import _without

    users = "MAILTO=me\n#SCRON --time=1\n*/10 * * * * /bin/true\n\n# a note\n"
    ours = "# planetseg:/a/flow.yaml\n#SCRON --job-name=planetseg-a\n#DISABLED: 0 2 * * * run\n"
    other = "# planetseg:/b/flow.yaml\n0 3 * * * run\n"
    kept, removed = _without(users + ours + other + "PATH=/bin\n", Path("/a/flow.yaml"))
    assert removed and kept == users + other + "PATH=/bin\n"
    assert _without(kept, Path("/a/flow.yaml")) == (kept, False)


# ----------------------------------------------------------------------------- CLI errors


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--every", "* 25 * * *", "--backend", "crontab"], ["--every", "hour field", "25"]),
        (["--every", "0 2 * * *", "--backend", "at"], ["--backend at", "sbatch"]),
        (["--every", "0 2 * * *", "--walltime", "2h"], ["--walltime", "HH:MM:SS"]),
        ([], ["--every"]),
    ],
)
def test_bad_arguments_are_one_line_and_write_nothing(
    flow: Path, args: list[str], words: list[str]
) -> None:
    proc = planetseg("schedule", str(flow), *args)
    assert_one_line_error(proc, *words)
    assert proc.returncode == 2
    assert not (flow.parent / "state").exists()


def test_a_workflow_that_does_not_load_is_one_line(flow: Path) -> None:
    flow.write_text(FLOW.replace("  tile: 256\n", "  tile: big\n"))
    assert_one_line_error(planetseg("schedule", str(flow), "--every", "0 2 * * *"), "cube.tile")
    assert not (flow.parent / "state").exists()


@pytest.mark.parametrize(
    ("backend", "words"),
    [("auto", ["no scheduler found"]), ("sbatch", ["sbatch", "not installed"]),
     ("scrontab", ["scrontab", "not installed"]), ("crontab", ["crontab", "not installed"])],
)  # fmt: skip
def test_no_scheduler_for_the_backend_is_one_line(
    flow: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, backend: str, words: list[str]
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no sbatch, scontrol nor crontab
    proc = planetseg("schedule", str(flow), "--every", "0 2 * * *", "--backend", backend)
    assert_one_line_error(proc, *words)
    assert not (flow.parent / "state").exists()


# ----------------------------------------------------------------------------- crontab


@pytest.fixture
def user_crontab() -> Iterator[str]:
    """This user's crontab with a line of their own; the original restored afterwards."""
    if shutil.which("crontab") is None:
        pytest.skip("crontab is not installed (apt-get install cron)")
    before = subprocess.run(["crontab", "-l"], capture_output=True, text=True)
    original = before.stdout if before.returncode == 0 else None
    mine = (original or "") + "# my backup, 100% mine\n0 3 * * * /usr/local/bin/backup\n"
    subprocess.run(["crontab", "-"], input=mine, text=True, check=True)
    try:
        yield mine
    finally:
        if original is None:
            subprocess.run(["crontab", "-r"], check=True)
        else:
            subprocess.run(["crontab", "-"], input=original, text=True, check=True)


def _crontab() -> str:
    return subprocess.run(["crontab", "-l"], capture_output=True, text=True, check=True).stdout


def test_crontab_install_replace_list_remove_keeps_the_users_lines(
    flow: Path, user_crontab: str
) -> None:
    for every in ("0 2 * * *", "30 1 * * 1-5"):  # the second replaces the first
        proc = planetseg("schedule", str(flow), "--every", every, "--backend", "crontab")
        assert proc.returncode == 0, proc.stderr
    table = _crontab()
    assert table.startswith(user_crontab)
    added = table[len(user_crontab) :].splitlines()
    assert added[0] == f"# planetseg:{flow}"
    assert len(added) == 2 and added[1].startswith("30 1 * * 1-5 cd ")
    assert f"-m planetseg.cli run {flow} >> " in added[1]
    assert (state_dir(flow)).is_dir()  # where cron.log goes

    listed = planetseg("schedule", "--list", "--backend", "crontab")
    assert listed.returncode == 0, listed.stderr
    assert str(flow) in listed.stdout and "30 1 * * 1-5" in listed.stdout
    assert "backup" not in listed.stdout  # only planetseg's entries

    other = flow.parent / "other.yaml"
    other.write_text(FLOW)
    assert (
        planetseg("schedule", str(other), "--every", "@daily", "--backend", "crontab").returncode
        == 0
    )
    removed = planetseg("schedule", str(flow), "--remove", "--backend", "crontab")
    assert removed.returncode == 0 and "removed" in removed.stdout, removed.stderr
    table = _crontab()
    assert table.startswith(user_crontab) and str(flow) + "\n" not in table
    assert f"# planetseg:{other}\n0 0 * * * " in table  # the other workflow's entry stays
    planetseg("schedule", str(other), "--remove", "--backend", "crontab")
    assert _crontab() == user_crontab
    again = planetseg("schedule", str(flow), "--remove", "--backend", "crontab")
    assert again.returncode == 0 and "has no schedule" in again.stdout


# ----------------------------------------------------------------------------- SLURM


@pytest.fixture
def slurm(local_slurm: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    monkeypatch.setenv("SLURM_CONF", str(local_slurm.conf))
    yield local_slurm
    subprocess.run(["scancel", "--user", "root"], env=local_slurm.env, check=True)


def _reason(slurm: Any, job: str) -> str:
    """Why a pending job waits (``BeginTime``, ``Dependency``, ...)."""
    return subprocess.run(
        ["squeue", "-h", "-j", job, "-o", "%r"], capture_output=True, text=True, env=slurm.env
    ).stdout.strip()


def _jobs(slurm: Any) -> list[dict[str, str]]:
    keys = ("id", "name", "state", "begin", "dependency", "comment")
    out = subprocess.run(
        ["squeue", "-h", "-o", "%i|%j|%T|%S|%E|%k"],
        capture_output=True, text=True, check=True, env=slurm.env,
    ).stdout  # fmt: skip
    return [dict(zip(keys, line.split("|"), strict=True)) for line in out.splitlines()]


@pytest.mark.slurm
def test_sbatch_schedule_is_a_pending_singleton_job_listed_and_removed(
    flow: Path, slurm: Any
) -> None:
    # The user's own job of the same name runs: the scheduled run must wait for it.
    name = job_name("nightly")
    mine = subprocess.run(
        ["sbatch", "--parsable", "--job-name", name, "--mem=50M", "-o", "/dev/null",
         "--wrap", "sleep 300"],
        check=True, env=slurm.env, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and _jobs(slurm)[0]["state"] != "RUNNING":
        time.sleep(0.5)
    for _ in range(2):  # installing twice replaces
        proc = planetseg("schedule", str(flow), "--every", "*/30 * * * *", "--backend", "sbatch")
        assert proc.returncode == 0, proc.stderr
        assert "sbatch: nightly every '*/30 * * * *': job " in proc.stdout
    jobs = [j for j in _jobs(slurm) if j["id"] != mine]
    assert len(jobs) == 1, jobs
    job = jobs[0]
    assert job["name"] == name and job["comment"] == f"planetseg:{flow} every */30 * * * *"
    begin = datetime.fromisoformat(job["begin"])
    assert begin > datetime.now() and begin.minute in (0, 30) and begin.second == 0
    assert job["dependency"] == "singleton(unfulfilled)"
    script = state_dir(flow) / "run.sbatch"
    assert f"#SBATCH --job-name={name}" in script.read_text()

    listed = planetseg("schedule", "--list", "--backend", "sbatch")
    assert f"{flow}" in listed.stdout and f"job {job['id']} PENDING" in listed.stdout
    assert planetseg("schedule", "--list").stdout.count(str(flow)) == 1  # auto: every backend

    removed = planetseg("schedule", str(flow), "--remove", "--backend", "sbatch")
    assert removed.returncode == 0 and "from sbatch" in removed.stdout, removed.stderr
    left = _jobs(slurm)
    assert [j["id"] for j in left] == [mine], left  # the user's own job stays
    assert not script.exists()


@pytest.mark.slow
@pytest.mark.slurm
def test_sbatch_chain_runs_and_resubmits_after_a_failed_run(flow: Path, slurm: Any) -> None:
    proc = planetseg("schedule", str(flow), "--every", "* * * * *", "--backend", "sbatch")
    assert proc.returncode == 0, proc.stderr
    first = _jobs(slurm)[0]
    logs = state_dir(flow)
    log = logs / f"{first['id']}.log"
    deadline = time.monotonic() + 150  # the next minute, plus the run
    while time.monotonic() < deadline and "run ended" not in (
        log.read_text() if log.exists() else ""
    ):
        time.sleep(2)
    text = log.read_text()
    assert f"-m planetseg.cli run {flow}" in text  # it tried the run ...
    assert "run ended with exit code 0" not in text and "run ended with exit code" in text
    assert "next run submitted, begins " in text  # ... and the chain went on
    pending = [j for j in _jobs(slurm) if j["id"] != first["id"]]
    assert len(pending) == 1 and pending[0]["comment"] == first["comment"], pending
    assert datetime.fromisoformat(pending[0]["begin"]) > datetime.fromisoformat(first["begin"])
    assert planetseg("schedule", str(flow), "--remove").returncode == 0
    assert _jobs(slurm) == []


@pytest.mark.slurm
def test_scrontab_install_list_remove_keeps_the_users_lines(flow: Path, slurm: Any) -> None:
    if shutil.which("scrontab") is None:
        pytest.skip("scrontab is not installed (Debian's slurm-client 22.05 leaves it out)")
    mine = "#SCRON --time=1\n*/10 * * * * /bin/true\n"
    (flow.parent / "mine.cron").write_text(mine)
    editor = flow.parent / "editor"  # scrontab 22.05 only edits, through $VISUAL
    editor.write_text(f'#!/bin/sh\ncp {flow.parent / "mine.cron"} "$1"\n')
    editor.chmod(0o755)
    subprocess.run(["scrontab"], check=True, env={**slurm.env, "VISUAL": str(editor)})
    proc = planetseg("schedule", str(flow), "--every", "0 2 * * *", "--backend", "scrontab")
    assert proc.returncode == 0, proc.stderr
    table = subprocess.run(["scrontab", "-l"], capture_output=True, text=True,
                           env=slurm.env, check=True).stdout  # fmt: skip
    assert table.startswith(mine) and f"# planetseg:{flow}\n#SCRON --job-name=" in table
    assert "scrontab" in planetseg("schedule", "--list").stdout
    assert planetseg("schedule", str(flow), "--remove").returncode == 0
    table = subprocess.run(["scrontab", "-l"], capture_output=True, text=True,
                           env=slurm.env, check=True).stdout  # fmt: skip
    assert table == mine


def _wait_for_record(
    runs: Path, after: int, log_dir: Path, slurm: Any = None, timeout: float = 180
) -> dict:
    """The run record number ``after + 1`` (in time order), once a scheduled job wrote it.

    With ``slurm``, a job of the chain waiting for its cron time (``--begin``) is released now,
    as if the minute had come: the chain's own submissions, singleton dependency and runs are
    what is tested, not the clock.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        records = sorted(runs.glob("*.json")) if runs.exists() else []
        if len(records) > after:
            return json.loads(records[after].read_text())
        for job in _jobs(slurm) if slurm is not None else ():
            if job["state"] == "PENDING" and "BeginTime" in _reason(slurm, job["id"]):
                subprocess.run(
                    ["scontrol", "update", f"JobId={job['id']}", "StartTime=now"],
                    env=slurm.env, capture_output=True, check=False,
                )  # fmt: skip
        time.sleep(1)
    logs = "\n".join(p.read_text()[-2000:] for p in sorted(log_dir.glob("*.log")))
    raise AssertionError(f"no run record {after + 1} within {timeout} s; job logs:\n{logs}")


@pytest.mark.slow  # 27 s: the default run stays under 15 min
@pytest.mark.slurm
def test_scheduled_runs_process_exactly_the_new_epoch(
    world: dict[str, Path], tmp_path: Path, slurm: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.test_run import _flow, _processed

    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    flow = _flow(tmp_path, world, epochs=2)  # a local catalog of two synthetic epochs
    proc = planetseg("schedule", str(flow), "--every", "* * * * *", "--backend", "sbatch")
    assert proc.returncode == 0, proc.stderr
    runs, logs = tmp_path / "out" / "runs", state_dir(flow)
    try:
        first = _wait_for_record(runs, 0, logs, slurm)
        assert first["slurm_job_id"] and not first["errors"], first["errors"]
        assert _processed(first) == {"ingest": 2, "segment": 2, "diff": 1, "craters": 2}
        _flow(tmp_path, world, epochs=3)  # a third epoch arrives in the catalog
        n, record = 1, _wait_for_record(runs, 1, logs, slurm)
        while not any(_processed(record).values()):  # a job that started before it arrived
            n += 1
            record = _wait_for_record(runs, n, logs, slurm)
        assert _processed(record) == {"ingest": 1, "segment": 1, "diff": 1, "craters": 1}
        # The chain goes on by itself, and with nothing new it does nothing.
        after = _wait_for_record(runs, n + 1, logs, slurm)
        assert not any(_processed(after).values()) and not after["errors"]
    finally:
        assert planetseg("schedule", str(flow), "--remove").returncode == 0
    assert _jobs(slurm) == []
