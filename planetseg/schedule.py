"""Recurring runs of a workflow: ``planetseg schedule WORKFLOW --every "CRON"``.

The scheduled command is ``<python> -m planetseg.cli run <absolute workflow path>`` (the
interpreter planetseg is installed in, so it needs no ``PATH``). Three backends install it:

* ``scrontab``: a SLURM cron entry (``#SCRON`` options, then the cron line), where the site
  set ``ScronParameters=enable``; SLURM runs it and never starts one run before the last ends.
* ``sbatch``: the batch script ``cluster/planetseg-run.sbatch``, rendered for the workflow and
  submitted with ``--begin`` (the next cron time) and ``--dependency=singleton``. On start, each
  job first submits its successor (so a failed or killed run does not end the schedule), then
  runs; the singleton dependency (one job named ``planetseg-<name>`` at a time) keeps runs
  from overlapping.
* ``crontab``: a plain crontab line where there is no batch scheduler.

Each entry carries the marker ``planetseg:<workflow path>`` (a comment line above crontab and
scrontab entries, the job comment of sbatch jobs), so listing shows only planetseg's entries
and removal touches only the workflow's own: every other line of a crontab stays as it was.
The rendered script and the runs' logs live in :func:`state_dir`.
"""

from __future__ import annotations

import calendar
import contextlib
import hashlib
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from planetseg.errors import InvalidArgumentError, SchedulerUnavailableError

if TYPE_CHECKING:
    from planetseg.config import ScheduleConfig

BACKENDS = ("auto", "scrontab", "sbatch", "crontab")
MARKER = "planetseg:"
TEMPLATE = "planetseg-run.sbatch"
DISABLED = "#DISABLED: "  # how scrontab -l shows an entry SLURM disabled
#: How often a job retries submitting its successor, and the seconds between tries.
SUBMIT_TRIES = 5
SUBMIT_PAUSE = 20

# ----------------------------------------------------------------------------- cron


@dataclass(frozen=True)
class _Field:
    name: str
    low: int
    high: int
    names: tuple[str, ...] = ()  # names of low, low+1, ... (jan, sun)


_FIELDS = (
    _Field("minute", 0, 59),
    _Field("hour", 0, 23),
    _Field("day-of-month", 1, 31),
    _Field("month", 1, 12, tuple(m.lower() for m in calendar.month_abbr[1:])),
    _Field("day-of-week", 0, 7, ("sun", "mon", "tue", "wed", "thu", "fri", "sat", "sun")),
)
_ALIASES = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}


@dataclass(frozen=True)
class Cron:
    """A parsed 5-field cron expression (minute hour day-of-month month day-of-week).

    Each field is ``*``, a number, a range ``a-b``, a list ``a,b-c``, any of those with a step
    ``/n``, or (month, day of week) a name such as ``jan`` or ``mon``; day of week 0 and 7 are
    Sunday. As in cron, when both day of month and day of week are restricted, a day matching
    either runs. The aliases ``@hourly``, ``@daily``, ``@weekly``, ``@monthly`` and ``@yearly``
    are accepted.

    Attributes:
        expression: The expression as given.
    """

    expression: str
    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]  # 0 = Sunday .. 6
    any_day: bool  # day of month is *
    any_weekday: bool  # day of week is *

    @classmethod
    def parse(cls, expression: str) -> Cron:
        """Parse ``expression``.

        Raises:
            InvalidArgumentError: not 5 fields, or a field that is malformed or out of range;
                the message names the field.
        """
        text = _ALIASES.get(expression.strip().lower(), expression)
        parts = text.split()
        if len(parts) != 5:
            raise InvalidArgumentError(
                f'--every "{expression}": give 5 fields, minute hour day-of-month month '
                'day-of-week (e.g. "0 2 * * *" for 02:00 every day)'
            )
        sets = [
            _parse_field(part, field, expression)
            for part, field in zip(parts, _FIELDS, strict=True)
        ]
        weekdays = frozenset(d % 7 for d in sets[4])
        return cls(
            expression, *map(frozenset, sets[:4]), weekdays, parts[2] == "*", parts[4] == "*"
        )

    def _day_matches(self, day: datetime) -> bool:
        in_month = day.day in self.days
        in_week = (day.weekday() + 1) % 7 in self.weekdays  # Python: Monday 0; cron: Sunday 0
        if self.any_day or self.any_weekday:
            return in_month and in_week
        return in_month or in_week

    def next_after(self, when: datetime) -> datetime:
        """The first time strictly after ``when`` (to the minute) that the expression names.

        Raises:
            InvalidArgumentError: the expression never matches (e.g. ``0 0 31 2 *``).
        """
        t = when.replace(second=0, microsecond=0) + timedelta(minutes=1)
        limit = t.replace(year=t.year + 5)  # every valid expression matches within 4 years
        while t < limit:
            if t.month not in self.months:
                t = (t.replace(day=1, hour=0, minute=0) + timedelta(days=32)).replace(day=1)
            elif not self._day_matches(t):
                t = t.replace(hour=0, minute=0) + timedelta(days=1)
            elif t.hour not in self.hours:
                t = t.replace(minute=0) + timedelta(hours=1)
            elif t.minute not in self.minutes:
                t += timedelta(minutes=1)
            else:
                return t
        raise InvalidArgumentError(f'--every "{self.expression}": names no day that exists')


def _parse_field(text: str, field: _Field, expression: str) -> set[int]:
    def bad(why: str) -> InvalidArgumentError:
        return InvalidArgumentError(f'--every "{expression}": {field.name} field {text!r} {why}')

    def number(token: str) -> int:
        token = token.lower()
        if token in field.names:
            return field.low + field.names.index(token)
        if not token.isdigit():
            raise bad(f"has {token!r}, not a number" + (" or name" if field.names else ""))
        value = int(token)
        if not field.low <= value <= field.high:
            raise bad(f"has {value}, outside {field.low}..{field.high}")
        return value

    values: set[int] = set()
    for item in text.split(","):
        span, _, step_text = item.partition("/")
        step = 1
        if step_text:
            if not step_text.isdigit() or int(step_text) == 0:
                raise bad(f"has step {step_text!r}: give a positive whole number")
            step = int(step_text)
        if span == "*":
            low, high = field.low, field.high
        elif "-" in span:
            a, _, b = span.partition("-")
            low, high = number(a), number(b)
            if low > high:
                raise bad(f"has the range {span!r}, whose start is after its end")
        else:
            low = number(span)
            high = field.high if step_text else low  # "5/15" = 5-59/15, as in cron
        values.update(range(low, high + 1, step))
    return values


def next_time(expression: str, after: datetime | None = None) -> datetime:
    """The next local time after ``after`` (default: now) that ``expression`` names."""
    return Cron.parse(expression).next_after(after or datetime.now())


# ----------------------------------------------------------------------------- entries


@dataclass(frozen=True)
class Entry:
    """One installed schedule of a workflow.

    Attributes:
        workflow: The workflow file (absolute).
        backend: ``scrontab``, ``sbatch`` or ``crontab``.
        every: The cron expression.
        detail: What the backend reports: the cron line, or the job id, state and start time.
    """

    workflow: Path
    backend: str
    every: str
    detail: str


def state_dir(workflow: Path) -> Path:
    """Where the rendered batch script and the logs of ``workflow``'s scheduled runs live.

    ``$XDG_STATE_HOME/planetseg/schedule/<stem>-<hash of the path>`` (default
    ``~/.local/state``): outside the user's data, one folder per workflow file.
    """
    base = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
    digest = hashlib.sha256(str(workflow).encode()).hexdigest()[:8]
    return base / "planetseg" / "schedule" / f"{workflow.stem}-{digest}"


def run_command(workflow: Path) -> str:
    """The shell command a scheduled run executes."""
    return shlex.join([sys.executable, "-m", "planetseg.cli", "run", str(workflow)])


def job_name(name: str) -> str:
    """The SLURM job name of a workflow's runs (``--dependency=singleton`` is per name)."""
    return "planetseg-" + re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise SchedulerUnavailableError(
            f"--backend needs {name}, which is not installed here: pick another --backend "
            "(or leave it auto)"
        )
    return path


def _call(args: list[str], *, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, input=stdin, capture_output=True, text=True, timeout=60)


def _failed(what: str, proc: subprocess.CompletedProcess[str]) -> SchedulerUnavailableError:
    why = " ".join((proc.stderr or proc.stdout).split()) or f"exit code {proc.returncode}"
    return SchedulerUnavailableError(f"{what} failed: {why}")


def slurm_config() -> str | None:
    """``scontrol show config``, or None when SLURM is not installed or does not answer."""
    if shutil.which("scontrol") is None:
        return None
    try:
        proc = _call(["scontrol", "show", "config"])
    except subprocess.TimeoutExpired:
        return None
    return proc.stdout if proc.returncode == 0 else None


def scron_enabled(config: str) -> bool:
    """Whether ``scontrol show config`` output has ``ScronParameters`` with ``enable``."""
    match = re.search(r"^ScronParameters\s*=\s*(\S*)", config, re.MULTILINE)
    return bool(match) and "enable" in match.group(1).split(",")


def pick_backend(backend: str) -> str:
    """Resolve ``auto``: scrontab where SLURM enables it, else sbatch, else crontab.

    Raises:
        InvalidArgumentError: an unknown backend.
        SchedulerUnavailableError: ``auto`` found neither SLURM nor crontab.
    """
    if backend not in BACKENDS:
        raise InvalidArgumentError(f"--backend {backend!r}: use one of {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend
    config = slurm_config()
    if config is not None:
        if scron_enabled(config) and shutil.which("scrontab"):
            return "scrontab"
        if shutil.which("sbatch"):
            return "sbatch"
    if shutil.which("crontab"):
        return "crontab"
    raise SchedulerUnavailableError(
        "no scheduler found: SLURM does not answer (scontrol show config) and crontab is not "
        "installed; install cron, or run on a SLURM login node"
    )


def _available() -> list[str]:
    """Backends whose tools are installed and answer, for listing and removing under auto."""
    found = []
    config = slurm_config()
    if config is not None:
        if scron_enabled(config) and shutil.which("scrontab"):
            found.append("scrontab")
        if shutil.which("sbatch"):
            found.append("sbatch")
    if shutil.which("crontab"):
        found.append("crontab")
    return found


# ----------------------------------------------------------------------------- cron tables


def _read_table(tool: str) -> str:
    proc = _call([_tool(tool), "-l"])
    if proc.returncode != 0:
        if "no crontab" in (proc.stderr + proc.stdout).lower():
            return ""
        raise _failed(f"{tool} -l", proc)
    return proc.stdout


def _write_table(tool: str, text: str) -> None:
    """Install ``text`` as the whole table: ``crontab FILE``, or scrontab's editor round trip.

    SLURM 22.05's ``scrontab`` takes no file: it only edits, through ``$VISUAL``, and on a bad
    entry asks whether to edit again (answered ``n`` here; it then exits 0, so its message is
    what tells the failure).
    """
    with tempfile.TemporaryDirectory(prefix="planetseg-cron-") as tmp:
        table = Path(tmp) / "table.cron"
        table.write_text(text)
        if tool == "crontab":
            proc = _call([_tool(tool), str(table)])
        else:
            editor = Path(tmp) / "editor"
            editor.write_text(f'#!/bin/sh\ncat {shlex.quote(str(table))} > "$1"\n')
            editor.chmod(0o700)
            proc = subprocess.run(
                [_tool(tool)], input="n\n", capture_output=True, text=True, timeout=60,
                env={**os.environ, "VISUAL": str(editor), "EDITOR": str(editor)},
            )  # fmt: skip
    refused = "There are errors" in proc.stdout or "There was an issue" in proc.stdout
    if proc.returncode != 0 or refused:
        if refused:
            proc.stderr = proc.stdout.split("The failed line")[0]
        raise _failed(f"{tool} (installing the new table)", proc)


def _blocks(text: str) -> Iterable[tuple[Path, list[str], int, int]]:
    """The planetseg entries of a cron table: (workflow, lines, first, end) line indices.

    An entry is the marker comment, the ``#SCRON`` lines after it and the cron line.
    """
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        if not lines[i].startswith(f"# {MARKER}"):
            i += 1
            continue
        workflow = Path(lines[i][len(f"# {MARKER}") :].strip())
        j = i + 1
        while j < len(lines) and lines[j].startswith("#SCRON"):
            j += 1
        entry = j < len(lines) and lines[j].strip() and not lines[j].startswith("#")
        entry = entry or (j < len(lines) and lines[j].startswith(DISABLED))
        end = j + 1 if entry else j
        yield workflow, lines[i:end], i, end
        i = end


def _without(text: str, workflow: Path) -> tuple[str, bool]:
    """``text`` without ``workflow``'s entries; whether there were any."""
    lines = text.splitlines()
    drop = {k for w, _, i, end in _blocks(text) if w == workflow for k in range(i, end)}
    kept = [line for k, line in enumerate(lines) if k not in drop]
    return "".join(f"{line}\n" for line in kept), bool(drop)


def _cron_entry(workflow: Path, every: str, name: str, walltime: str, backend: str) -> str:
    logs = state_dir(workflow)
    lines = [f"# {MARKER}{workflow}"]
    command = run_command(workflow)
    if backend == "scrontab":
        lines += [
            f"#SCRON --job-name={job_name(name)}",
            f"#SCRON --time={walltime}",
            f"#SCRON --chdir={workflow.parent}",
            f"#SCRON --output={logs / 'scron-%j.log'}",
        ]
    else:
        # cron runs the line with sh, from $HOME; % would end the command (crontab(5)).
        log = shlex.quote(str(logs / "cron.log"))
        command = f"cd {shlex.quote(str(workflow.parent))} && {command} >> {log} 2>&1"
        command = command.replace("%", r"\%")
    fields = _ALIASES.get(every.strip().lower(), every)  # 5 fields: every cron reads them
    lines.append(f"{fields} {command}")
    return "".join(f"{line}\n" for line in lines)


def _table_entries(backend: str) -> list[Entry]:
    entries = []
    for workflow, lines, _, _ in _blocks(_read_table(backend)):
        last = lines[-1]
        is_entry = not last.startswith("#") or last.startswith(DISABLED)
        line = last.removeprefix(DISABLED) if is_entry else ""
        every = " ".join(line.split()[:5]) if line else "?"
        detail = f"disabled by SLURM: {line}" if last.startswith(DISABLED) else line
        entries.append(Entry(workflow, backend, every, detail or "(no cron line)"))
    return entries


# ----------------------------------------------------------------------------- sbatch


def template_path() -> Path:
    """``cluster/planetseg-run.sbatch`` in the working directory, else planetseg's own."""
    for base in (Path.cwd(), Path(__file__).resolve().parents[1]):
        candidate = base / "cluster" / TEMPLATE
        if candidate.is_file():
            return candidate
    raise SchedulerUnavailableError(f"the batch script template cluster/{TEMPLATE} is missing")


def render_script(workflow: Path, every: str, name: str, walltime: str) -> str:
    """The sbatch script of ``workflow``'s runs, from the template in ``cluster/``.

    Raises:
        SchedulerUnavailableError: the template is missing or names an unknown placeholder.
    """
    template = template_path()
    logs = state_dir(workflow)
    q = shlex.quote
    values = {
        "JOB_NAME": job_name(name),
        "WALLTIME": walltime,
        "COMMENT": q(f"{MARKER}{workflow} every {every}"),
        "CHDIR": q(str(workflow.parent)),
        "OUTPUT": q(str(logs / "%j.log")),
        "SCRIPT": q(str(logs / "run.sbatch")),
        "EVERY": q(every),
        "PYTHON": q(sys.executable),
        "RUN": run_command(workflow),
        "TRIES": str(SUBMIT_TRIES),
        "PAUSE": str(SUBMIT_PAUSE),
    }
    text = template.read_text()
    for key, value in values.items():
        text = text.replace(f"@{key}@", value)
    left = re.search(r"@[A-Z_]+@", text)
    if left:
        raise SchedulerUnavailableError(f"{template}: unknown placeholder {left.group(0)}")
    return text


def _sbatch_jobs(workflow: Path | None = None) -> list[tuple[str, str, str, str]]:
    """(id, state, start, comment) of this user's jobs that planetseg scheduled."""
    proc = _call([_tool("squeue"), "--me", "-h", "-o", "%i|%T|%S|%k"])
    if proc.returncode != 0:
        raise _failed("squeue", proc)
    jobs = []
    for line in proc.stdout.splitlines():
        job, state, start, comment = line.split("|", 3)
        if not comment.startswith(MARKER):
            continue
        path = Path(comment[len(MARKER) :].rsplit(" every ", 1)[0])
        if workflow is None or path == workflow:
            jobs.append((job, state, start, comment))
    return jobs


def _sbatch_entries() -> list[Entry]:
    entries = []
    for job, state, start, comment in _sbatch_jobs():
        path, _, every = comment[len(MARKER) :].rpartition(" every ")
        entries.append(Entry(Path(path), "sbatch", every, f"job {job} {state}, begins {start}"))
    return entries


def _cancel(workflow: Path, *, pending_only: bool = False, keep: str | None = None) -> bool:
    jobs = [job for job, state, *_ in _sbatch_jobs(workflow)
            if (state == "PENDING" or not pending_only) and job != keep]  # fmt: skip
    if jobs:
        proc = _call([_tool("scancel"), *jobs])
        if proc.returncode != 0:
            raise _failed("scancel", proc)
    return bool(jobs)


def _submit(workflow: Path, every: str, name: str, walltime: str) -> tuple[str, str]:
    """Render the script and submit its first run; (job id, begin time)."""
    script = state_dir(workflow) / "run.sbatch"
    script.write_text(render_script(workflow, every, name, walltime))
    script.chmod(0o755)
    proc = _call(["bash", str(script), "submit"])
    if proc.returncode != 0:
        script.unlink()
        raise _failed("sbatch", proc)
    return proc.stdout.split()[0].split(";")[0], proc.stdout.split("begins ")[-1].strip()


# ----------------------------------------------------------------------------- API


def install(workflow: Path, name: str, config: ScheduleConfig) -> Entry:
    """Install (or replace) the recurring run of ``workflow``.

    The new entry is installed first; then any earlier schedule of the same workflow, in any
    backend found, is removed, so installing twice never runs a workflow twice and a refused
    entry leaves the earlier schedule in place.

    Args:
        workflow: The workflow file, already checked by :func:`~planetseg.workflow.load_workflow`.
        name: The workflow's name (the job name is ``planetseg-<name>``).
        config: When, through which backend, and each run's time limit.

    Raises:
        SchedulerUnavailableError: no scheduler for the backend, or it refused the entry.
    """
    workflow = Path(workflow).resolve()
    every = config.every
    chosen = pick_backend(config.backend)
    _tool(chosen)
    folder = state_dir(workflow)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        if chosen == "sbatch":
            job, begin = _submit(workflow, every, name, config.walltime)
            _cancel(workflow, pending_only=True, keep=job)  # the schedule installed before
            entry = Entry(workflow, chosen, every, f"job {job}, begins {begin}")
        else:
            text, _ = _without(_read_table(chosen), workflow)
            block = _cron_entry(workflow, every, name, config.walltime, chosen)
            _write_table(chosen, text + block)
            entry = Entry(workflow, chosen, every, block.splitlines()[-1])
    except BaseException:
        with contextlib.suppress(OSError):
            folder.rmdir()  # only if empty: the logs of earlier runs stay
        raise
    for other in _available():
        if other != chosen:
            _remove_from(other, workflow)
    return entry


def entries(backend: str = "auto", workflow: Path | None = None) -> list[Entry]:
    """The installed planetseg schedules (of ``workflow`` only, if given).

    ``auto`` lists every backend found here; a named backend only that one.
    """
    if backend not in BACKENDS:
        raise InvalidArgumentError(f"--backend {backend!r}: use one of {', '.join(BACKENDS)}")
    found: list[Entry] = []
    for name in _available() if backend == "auto" else [backend]:
        found += _sbatch_entries() if name == "sbatch" else _table_entries(name)
    if workflow is not None:
        workflow = Path(workflow).resolve()
        found = [e for e in found if e.workflow == workflow]
    return found


def remove(workflow: Path, backend: str = "auto") -> list[str]:
    """Remove ``workflow``'s schedule; the backends it was removed from.

    Only the workflow's own entries go: other lines of a crontab or scrontab, and other jobs,
    stay. For sbatch, its pending and running jobs are cancelled and its script deleted.
    """
    if backend not in BACKENDS:
        raise InvalidArgumentError(f"--backend {backend!r}: use one of {', '.join(BACKENDS)}")
    workflow = Path(workflow).resolve()
    names = _available() if backend == "auto" else [backend]
    return [name for name in names if _remove_from(name, workflow)]


def _remove_from(backend: str, workflow: Path) -> bool:
    if backend == "sbatch":
        removed = _cancel(workflow)
        (state_dir(workflow) / "run.sbatch").unlink(missing_ok=True)
        return removed
    text = _read_table(backend)
    kept, removed = _without(text, workflow)
    if removed:
        _write_table(backend, kept)
    return removed


def main(argv: list[str] | None = None) -> None:
    """``python -m planetseg.schedule next "CRON"``: print the next run time.

    The batch script calls it for its successor's ``--begin``.
    """
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or args[0] != "next":
        sys.exit('usage: python -m planetseg.schedule next "CRON"')
    try:
        print(next_time(args[1]).strftime("%Y-%m-%dT%H:%M:%S"))
    except InvalidArgumentError as exc:
        sys.exit(f"planetseg: error: {exc}")


if __name__ == "__main__":
    main()
