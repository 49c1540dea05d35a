"""A real SLURM cluster (slurmctld + one slurmd, munge) on loopback for the launcher tests.

Follows the recipe measured on this kind of machine: every path under a scratch folder, SLURM_CONF exported,
munged started as the munge user, daemons started by hand (no systemd), torn down by pid.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

NEEDED = ("slurmctld", "slurmd", "sbatch", "scontrol", "sinfo", "munged", "munge")


def missing_tools() -> list[str]:
    found = {t: shutil.which(t) or (Path("/usr/sbin") / t).exists() for t in NEEDED}
    return [t for t, ok in found.items() if not ok]


def _conf(scratch: Path, host: str, cpus: int, mem_mb: int) -> str:
    return f"""ClusterName=megalm-test
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
EnforcePartLimits=ALL
MailProg=/bin/true
MpiDefault=none
ReturnToService=2
MinJobAge=600
StateSaveLocation={scratch}/state
SlurmdSpoolDir={scratch}/slurmd-%n
SlurmctldPidFile={scratch}/slurmctld.pid
SlurmdPidFile={scratch}/slurmd-%n.pid
SlurmctldLogFile={scratch}/slurmctld.log
SlurmdLogFile={scratch}/slurmd-%n.log
TmpFS={scratch}/tmp-%n
SlurmctldPort=16817
SlurmdPort=16818
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={mem_mb} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


class SlurmCluster:
    def __init__(self, scratch: Path, cpus: int = 4):
        self.scratch, self.host = Path(scratch), socket.gethostname().split(".")[0]
        for sub in ("state", f"slurmd-{self.host}", f"tmp-{self.host}"):
            (self.scratch / sub).mkdir(parents=True, exist_ok=True)
        self.conf = self.scratch / "slurm.conf"
        self.conf.write_text(_conf(self.scratch, self.host, cpus, 8000))
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.munged_pid = None

    def start(self) -> "SlurmCluster":
        subprocess.run(["install", "-d", "-o", "munge", "-g", "munge", "-m", "0755", "/run/munge"], check=True)
        if subprocess.run("munge -n | unmunge", shell=True, capture_output=True).returncode != 0:
            subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"], check=True)
            self._wait(lambda: subprocess.run("munge -n | unmunge", shell=True, capture_output=True).returncode == 0,
                       "munged")
            self.munged_pid = int(Path("/run/munge/munged.pid").read_text()) \
                if Path("/run/munge/munged.pid").exists() else None
        subprocess.run(["slurmctld", "-f", str(self.conf)], env=self.env, check=True)
        subprocess.run(["slurmd", "-f", str(self.conf)], env=self.env, check=True)
        self._wait(lambda: self.run(["sinfo", "-h", "-N", "-o", "%t"]).stdout.strip() in ("idle", "idle*"),
                   "slurmd to register as idle")
        return self

    def run(self, cmd, **kw):
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True, **kw)

    def sbatch(self, args: list[str], timeout_s: float = 300) -> dict:
        """Submit, poll scontrol every 0.5 s, cancel on timeout; returns the job's final fields."""
        out = self.run(["sbatch", "--parsable"] + args, check=True).stdout.strip()
        job = out.split(";")[0]
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            fields = dict(kv.split("=", 1) for kv in self.run(["scontrol", "show", "job", job]).stdout.split()
                          if "=" in kv)
            if fields.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
                return fields
            time.sleep(0.5)
        self.run(["scancel", job])
        raise TimeoutError(f"SLURM job {job} did not finish within {timeout_s}s")

    def stop(self) -> None:
        self.run(["scancel", "--full", "-u", "root"])
        pids = []
        for name in (f"slurmd-{self.host}.pid", "slurmctld.pid"):
            pid_file = self.scratch / name
            if pid_file.exists():
                pids.append(int(pid_file.read_text().strip()))
        if self.munged_pid:
            pids.append(self.munged_pid)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.time() + 15
        while time.time() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.2)
        for pid in pids:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)

    @staticmethod
    def _wait(predicate, what: str, timeout_s: float = 30) -> None:
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if predicate():
                return
            time.sleep(0.2)
        raise TimeoutError(f"timed out waiting for {what}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
