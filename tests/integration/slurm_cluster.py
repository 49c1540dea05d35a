"""A real SLURM cluster on loopback for the launcher tests: slurmctld, munge and N slurmd daemons on this host,
each daemon a node of its own name (megalm-n1, megalm-n2, ...).

Follows the recipe measured on this kind of machine (../shared/notes/slurm-mpi-on-one-host.md): every path under
a scratch folder, SLURM_CONF exported, munged started as the munge user, daemons started by hand (no systemd),
one ``slurmd -N NAME`` per node on its own port, the node names resolvable through /etc/hosts lines that are
removed again at tear-down, everything stopped by pid. Two settings only make the tests faster: a requeued job
may start again once its credential has expired (``cred_expire``, 120 s by default: 5 s here), and the main
scheduler runs every second instead of every minute.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

NEEDED = ("slurmctld", "slurmd", "sbatch", "scontrol", "sinfo", "munged", "munge")
HOSTS_FILE = Path("/etc/hosts")
HOSTS_MARK = "# megalm-test-slurm"
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")


def missing_tools() -> list[str]:
    found = {t: shutil.which(t) or (Path("/usr/sbin") / t).exists() for t in NEEDED}
    return [t for t, ok in found.items() if not ok]


def node_names(count: int) -> list[str]:
    return [f"megalm-n{i + 1}" for i in range(count)]


def _conf(scratch: Path, nodes: list[str], cpus: int, mem_mb: int) -> str:
    node_lines = "\n".join(f"NodeName={name} NodeHostname={_host()} NodeAddr=127.0.0.1 Port={16821 + i} "
                           f"CPUs={cpus} RealMemory={mem_mb} State=UNKNOWN" for i, name in enumerate(nodes))
    return f"""ClusterName=megalm-test
SlurmctldHost={_host()}(127.0.0.1)
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
KillWait=20
AuthInfo=cred_expire=5
SchedulerParameters=sched_interval=1,sched_min_interval=100000
StateSaveLocation={scratch}/state
SlurmdSpoolDir={scratch}/slurmd-%n
SlurmctldPidFile={scratch}/slurmctld.pid
SlurmdPidFile={scratch}/slurmd-%n.pid
SlurmctldLogFile={scratch}/slurmctld.log
SlurmdLogFile={scratch}/slurmd-%n.log
TmpFS={scratch}/tmp-%n
SlurmctldPort=16817
{node_lines}
PartitionName=debug Nodes={",".join(nodes)} Default=YES MaxTime=INFINITE State=UP
"""


def _host() -> str:
    import socket

    return socket.gethostname().split(".")[0]


class SlurmCluster:
    def __init__(self, scratch: Path, nodes: int = 2, cpus: int = 4):
        self.scratch, self.nodes = Path(scratch), node_names(nodes)
        for sub in ["state"] + [f"{kind}-{n}" for n in self.nodes for kind in ("slurmd", "tmp")]:
            (self.scratch / sub).mkdir(parents=True, exist_ok=True)
        self.conf = self.scratch / "slurm.conf"
        self.conf.write_text(_conf(self.scratch, self.nodes, cpus, 8000))
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.munged_pid = None

    def start(self) -> "SlurmCluster":
        self._add_host_names()
        subprocess.run(["install", "-d", "-o", "munge", "-g", "munge", "-m", "0755", "/run/munge"], check=True)
        if subprocess.run("munge -n | unmunge", shell=True, capture_output=True).returncode != 0:
            subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"], check=True)
            self._wait(lambda: subprocess.run("munge -n | unmunge", shell=True, capture_output=True).returncode == 0,
                       "munged")
            self.munged_pid = int(Path("/run/munge/munged.pid").read_text()) \
                if Path("/run/munge/munged.pid").exists() else None
        subprocess.run(["slurmctld", "-f", str(self.conf)], env=self.env, check=True)
        for name in self.nodes:
            subprocess.run(["slurmd", "-f", str(self.conf), "-N", name], env=self.env, check=True)
        self._wait(lambda: self.run(["sinfo", "-h", "-N", "-o", "%t"]).stdout.split() == ["idle"] * len(self.nodes),
                   f"{len(self.nodes)} slurmd to register as idle")
        return self

    def run(self, cmd, **kw):
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True, **kw)

    def submit(self, args: list[str]) -> str:
        return self.run(["sbatch", "--parsable"] + args, check=True).stdout.strip().split(";")[0]

    def job(self, job: str) -> dict:
        return dict(kv.split("=", 1) for kv in self.run(["scontrol", "show", "job", job]).stdout.split() if "=" in kv)

    def wait(self, job: str, timeout_s: float = 300) -> dict:
        """Poll scontrol every 0.5 s until the job has ended (a requeued job counts once its last run ended);
        cancel it on timeout. Returns the job's final fields."""
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            fields = self.job(job)
            if fields.get("JobState") in ENDED:
                return fields
            time.sleep(0.5)
        self.run(["scancel", job])
        raise TimeoutError(f"SLURM job {job} did not finish within {timeout_s}s")

    def sbatch(self, args: list[str], timeout_s: float = 300) -> dict:
        return self.wait(self.submit(args), timeout_s)

    def stop(self) -> None:
        self.run(["scancel", "--full", "-u", "root"])
        pids = []
        for name in [f"slurmd-{n}.pid" for n in self.nodes] + ["slurmctld.pid"]:
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
        self._remove_host_names()

    def _add_host_names(self) -> None:
        self._remove_host_names()
        with HOSTS_FILE.open("a") as f:
            f.write("".join(f"127.0.0.1 {name} {HOSTS_MARK}\n" for name in self.nodes))

    @staticmethod
    def _remove_host_names() -> None:
        lines = HOSTS_FILE.read_text().splitlines(keepends=True)
        HOSTS_FILE.write_text("".join(line for line in lines if HOSTS_MARK not in line))

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
