"""A single-node SLURM on this machine, for the ``slurm`` tests.

Debian's ``slurm-wlm`` and ``munge``, run by hand (no systemd): ``munged`` with a key generated
here and its own socket, then ``slurmctld`` and ``slurmd`` with a generated ``slurm.conf`` that
needs no cgroups (``proctrack/linuxproc``, ``task/none``). Everything lives in one temporary
folder; the daemons are stopped by PID. Needs root (slurmd runs jobs as their users).

    with LocalSlurm(tmp_path) as slurm:
        env = slurm.env  # SLURM_CONF for sbatch/squeue/scancel
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "mungekey")


def missing() -> str | None:
    """Why a local SLURM cannot start here, or None if it can."""
    if os.geteuid() != 0:
        return "a local SLURM needs root"
    for tool in DAEMONS:
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install slurm-wlm munge)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalSlurm:
    """Start munged, slurmctld and slurmd in ``root``; stop them on exit."""

    def __init__(self, root: Path, *, cpus: int | None = None, timeout: float = 60.0) -> None:
        self.root = Path(root)
        self.cpus = cpus or os.cpu_count() or 1
        self.timeout = timeout
        self.pids: list[int] = []
        self.conf = self.root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    def __enter__(self) -> LocalSlurm:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _start(self) -> None:
        r = self.root
        for sub in ("munge", "spool", "state", "log"):
            (r / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(r / "munge", 0o700)
        key, sock = r / "munge" / "munge.key", r / "munge" / "munge.socket"
        subprocess.run(["mungekey", "--create", "--keyfile", str(key), "--force"], check=True)
        os.chmod(key, 0o600)
        subprocess.run(
            [
                "munged",
                "--force",  # running as root
                f"--key-file={key}",
                f"--socket={sock}",
                f"--pid-file={r / 'munge' / 'munged.pid'}",
                f"--log-file={r / 'log' / 'munged.log'}",
                f"--seed-file={r / 'munge' / 'munged.seed'}",
            ],
            check=True,
        )
        self.pids.append(int((r / "munge" / "munged.pid").read_text()))
        host = socket.gethostname().split(".")[0]
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20 // 2
        self.conf.write_text(
            "\n".join(
                [
                    "ClusterName=planetseg-test",
                    f"SlurmctldHost={host}(127.0.0.1)",
                    f"SlurmctldPort={_free_port()}",
                    f"SlurmdPort={_free_port()}",
                    "SlurmUser=root",
                    "SlurmdUser=root",
                    "AuthType=auth/munge",
                    f"AuthInfo=socket={sock}",
                    "CredType=cred/munge",
                    "ProctrackType=proctrack/linuxproc",
                    "TaskPlugin=task/none",
                    "MailProg=/bin/true",
                    "ScronParameters=enable",  # scrontab (planetseg schedule)
                    "ReturnToService=2",
                    "SchedulerType=sched/backfill",
                    "SelectType=select/cons_tres",
                    "SelectTypeParameters=CR_Core_Memory",
                    f"StateSaveLocation={r / 'state'}",
                    f"SlurmdSpoolDir={r / 'spool'}",
                    f"SlurmctldPidFile={r / 'slurmctld.pid'}",
                    f"SlurmdPidFile={r / 'slurmd.pid'}",
                    f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}",
                    f"SlurmdLogFile={r / 'log' / 'slurmd.log'}",
                    "JobCompType=jobcomp/none",
                    "AccountingStorageType=accounting_storage/none",
                    f"NodeName={host} NodeAddr=127.0.0.1 CPUs={self.cpus} "
                    f"RealMemory={memory} State=UNKNOWN",
                    "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
                    "",
                ]
            )
        )
        # -i: ignore state left by an earlier run; -c: clear it. Both daemonise.
        subprocess.run(["slurmctld", "-c", "-i", "-f", str(self.conf)], check=True, env=self.env)
        self.pids.append(self._pid(r / "slurmctld.pid"))
        subprocess.run(["slurmd", "-f", str(self.conf)], check=True, env=self.env)
        self.pids.append(self._pid(r / "slurmd.pid"))
        self._wait_idle()

    def _pid(self, path: Path) -> int:
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if path.exists() and path.read_text().strip():
                return int(path.read_text())
            time.sleep(0.1)
        raise RuntimeError(f"{path.name} did not appear: see {self.root / 'log'}")

    def _wait_idle(self) -> None:
        deadline = time.monotonic() + self.timeout
        state = ""
        while time.monotonic() < deadline:
            out = subprocess.run(
                ["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, env=self.env
            )
            state = out.stdout.strip()
            if state == "idle":
                return
            time.sleep(0.5)
        raise RuntimeError(f"the SLURM node is {state!r}, not idle: see {self.root / 'log'}")

    def stop(self) -> None:
        """Cancel every job, then stop the daemons by PID (newest first)."""
        if shutil.which("scancel") and self.conf.exists():
            subprocess.run(["scancel", "--user", "root"], env=self.env, capture_output=True)
        for pid in reversed(self.pids):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            for _ in range(50):
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)
            else:
                # It may exit between the last check and the kill (seen under load).
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        self.pids.clear()
