"""A real one-node SLURM cluster on localhost for tests: Debian's slurm-wlm and munge, no cgroups.

`SlurmCluster(root).start()` writes a slurm.conf under `root` (state, spool, logs and PID files all
there; free ports), starts `munged` if none answers yet, then `slurmctld -D` and `slurmd -D` as
background processes, and waits until the node is idle. `stop()` ends the daemons it started, by PID.
`env` is the environment for sbatch/srun/squeue/scontrol (SLURM_CONF points at our config).

Plugins: select/cons_tres (CPU-level allocation), proctrack/linuxproc and task/none (no cgroups, so
it runs in containers), auth/munge. The partition oversubscribes, so more tasks than cores fit.

Run alone for a cluster to try things by hand: `python tests/slurm_cluster.py /tmp/slurm` (Ctrl-C stops it).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

MUNGE_SOCKET_DIR = "/run/munge"
DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "squeue", "scancel")


def missing_binaries() -> list[str]:
    return [b for b in DAEMONS if shutil.which(b) is None and not os.path.exists(f"/usr/sbin/{b}")]


def _which(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def munge_works() -> bool:
    """Whether a munged answers on the default socket (a credential encodes and decodes)."""
    if shutil.which("munge") is None or shutil.which("unmunge") is None:
        return False
    try:
        cred = subprocess.run(["munge", "-n"], capture_output=True, timeout=10)
        if cred.returncode:
            return False
        return subprocess.run(["unmunge"], input=cred.stdout, capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


class SlurmCluster:
    def __init__(self, root: str, cpus: int | None = None):
        self.root = os.path.abspath(root)
        self.node = socket.gethostname().split(".")[0]
        # Never fewer than 2 CPUs, so a 2-task job fits on a 1-core machine too (oversubscribed).
        self.cpus = cpus or max(2, os.cpu_count() or 1)
        self.conf = os.path.join(self.root, "slurm.conf")
        self.env = {**os.environ, "SLURM_CONF": self.conf}
        for k in [k for k in self.env if k.startswith(("SLURM_", "SBATCH_", "SRUN_"))]:
            if k != "SLURM_CONF":
                del self.env[k]
        self._procs: dict[str, subprocess.Popen] = {}
        self._munge_root: str | None = None  # munged's log/seed dir, when this cluster started munged

    # ------------------------------------------------------------------------------------------------

    def start(self, timeout: float = 60) -> "SlurmCluster":
        for d in ("state", "spool", "log"):
            os.makedirs(os.path.join(self.root, d), exist_ok=True)
        self._start_munge()
        self._write_conf()
        self._spawn("slurmctld", [_which("slurmctld"), "-D", "-f", self.conf])
        self._wait(lambda: self.run("scontrol", "ping").stdout.count("UP") > 0, timeout, "slurmctld to answer")
        self._spawn("slurmd", [_which("slurmd"), "-D", "-N", self.node, "-f", self.conf])
        self._wait(lambda: self.run("sinfo", "-h", "-o", "%T").stdout.strip() == "idle", timeout, "the node to be idle")
        return self

    def stop(self) -> None:
        """End the daemons this cluster started (SIGTERM, then SIGKILL), newest first."""
        for name in reversed(list(self._procs)):
            p = self._procs.pop(name)
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        if self._munge_root:
            shutil.rmtree(self._munge_root, ignore_errors=True)
            self._munge_root = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # ------------------------------------------------------------------------------------------------

    def run(self, cmd: str, *args: str, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        """A SLURM client command (sbatch, squeue, scontrol, scancel, sinfo) against this cluster."""
        return subprocess.run([_which(cmd), *args], env=kw.pop("env", self.env), capture_output=True, text=True, timeout=timeout, **kw)

    def job_state(self, job_id: str) -> str:
        r = self.run("scontrol", "show", "job", job_id, "-o")
        for field in r.stdout.split():
            if field.startswith("JobState="):
                return field.split("=", 1)[1]
        return ""

    def job_field(self, job_id: str, name: str) -> str | None:
        r = self.run("scontrol", "show", "job", job_id, "-o")
        for field in r.stdout.split():
            if field.startswith(name + "="):
                return field.split("=", 1)[1]
        return None

    def logs(self) -> str:
        out = []
        for name in ("slurmctld", "slurmd"):
            path = os.path.join(self.root, "log", f"{name}.log")
            if os.path.exists(path):
                with open(path, errors="replace") as f:
                    out.append(f"--- {name}.log (tail)\n" + "".join(f.readlines()[-40:]))
        return "\n".join(out)

    # ------------------------------------------------------------------------------------------------

    def _start_munge(self) -> None:
        if munge_works():
            return  # a munged is already running (the system's, or another test session's): share it
        import pwd

        munge = pwd.getpwnam("munge")
        os.makedirs(MUNGE_SOCKET_DIR, exist_ok=True)
        os.chown(MUNGE_SOCKET_DIR, munge.pw_uid, munge.pw_gid)
        os.chmod(MUNGE_SOCKET_DIR, 0o755)
        # munged insists on a log dir its user owns, on a path it can walk (pytest's tmp dirs are 0700).
        self._munge_root = tempfile.mkdtemp(prefix="jaxpretrain-munge-")
        os.chmod(self._munge_root, 0o755)
        log_dir = os.path.join(self._munge_root, "munge")
        os.makedirs(log_dir, exist_ok=True)
        os.chown(log_dir, munge.pw_uid, munge.pw_gid)
        os.chmod(log_dir, 0o700)
        self._spawn(
            "munged",
            [_which("munged"), "--foreground", f"--log-file={log_dir}/munged.log", f"--pid-file={log_dir}/munged.pid",
             f"--seed-file={log_dir}/munged.seed"],
            user=munge.pw_uid, group=munge.pw_gid,
        )
        self._wait(munge_works, 30, "munged to answer")

    def _write_conf(self) -> None:
        r = self.root
        lines = [
            "ClusterName=jaxpretrain-test",
            f"SlurmctldHost={self.node}(127.0.0.1)",
            "SlurmUser=root",
            "SlurmdUser=root",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            "AuthType=auth/munge",
            # A requeued job waits out its old credentials before it starts again: 120 s by default.
            "AuthInfo=cred_expire=10",
            "CredType=cred/munge",
            f"StateSaveLocation={r}/state",
            f"SlurmdSpoolDir={r}/spool",
            f"SlurmctldPidFile={r}/slurmctld.pid",
            f"SlurmdPidFile={r}/slurmd.pid",
            f"SlurmctldLogFile={r}/log/slurmctld.log",
            f"SlurmdLogFile={r}/log/slurmd.log",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "SchedulerType=sched/builtin",
            "SchedulerParameters=sched_interval=2",  # look at pending (e.g. requeued) jobs every 2 s, not 60
            "JobCompType=jobcomp/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "MpiDefault=none",
            "ReturnToService=2",
            "SlurmdParameters=config_overrides",  # trust the CPU count below, whatever the machine has
            "KillWait=10",
            "MinJobAge=600",  # finished jobs stay visible to scontrol for the test's checks
            "InactiveLimit=0",
            "SlurmctldTimeout=60",
            "SlurmdTimeout=60",
            f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} State=UNKNOWN",
            f"PartitionName=debug Nodes={self.node} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4",
        ]
        with open(self.conf, "w") as f:
            f.write("\n".join(lines) + "\n")

    def _spawn(self, name: str, argv: list[str], **kw) -> None:
        log = open(os.path.join(self.root, "log", f"{name}.stdout"), "w")
        self._procs[name] = subprocess.Popen(argv, env=self.env, stdout=log, stderr=subprocess.STDOUT, **kw)

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, p in self._procs.items():
                if p.poll() is not None:
                    raise RuntimeError(f"{name} exited with {p.returncode} while waiting for {what}\n{self.logs()}")
            try:
                if ready():
                    return
            except (OSError, subprocess.TimeoutExpired):
                pass
            time.sleep(0.5)
        raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}\n{self.logs()}")


if __name__ == "__main__":
    root = sys.argv[1] if len(sys.argv) > 1 else "/tmp/jaxpretrain-slurm"
    with SlurmCluster(root) as c:
        print(f"export SLURM_CONF={c.conf}  # then sbatch/squeue/scontrol; Ctrl-C stops the cluster", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
