"""A SLURM cluster on the test hosts of netns.py: slurmctld on host 0, a slurmd on every host,
authentication by a munged of the test's own (key, socket, state and logs in a temporary folder
of its own; Debian's slurmctld, slurmd, slurm-client and munge, tests/hosts/install.sh).

    with Hosts(2, tmp) as hosts, Slurm(hosts) as slurm:
        hosts.run(0, ["sbatch", "--wait", ...], env=slurm.env)

Node names are the hosts' namespace names (netns.py maps them to their addresses in every
host's /etc/hosts). Teardown kills the daemons (Hosts' own teardown would too).
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from netns import Managed

DAEMONS = ("/usr/sbin/slurmctld", "/usr/sbin/slurmd", "/usr/bin/sbatch", "/usr/sbin/munged",
           "/usr/sbin/mungekey")


def unavailable() -> str:
    missing = [d for d in DAEMONS if not os.access(d, os.X_OK)]
    return f"needs {', '.join(missing)} (tests/hosts/install.sh installs them as root)" if missing else ""


class Slurm(Managed):
    def __init__(self, hosts):
        # A short path of its own: slurmd's step sockets live in its spool folder, and a Unix
        # socket's path has 107 bytes at most. Under a pytest tmp_path slurmstepd failed to start
        # ("Resource temporarily unavailable", the job requeued); under /tmp/dbslurm* it runs.
        self.hosts, self.dir = hosts, Path(tempfile.mkdtemp(prefix="dbslurm", dir="/tmp"))
        self.conf = self.dir / "slurm.conf"
        self.env = {"SLURM_CONF": str(self.conf)}
        self._procs = []

    def _start(self):
        d = self.dir  # mode 0700, made by mkdtemp
        (d / "state").mkdir(exist_ok=True)
        subprocess.run(["mungekey", "--create", f"--keyfile={d / 'munge.key'}"], check=True,
                       capture_output=True)
        self._spawn(0, ["/usr/sbin/munged", "--foreground", "--force", f"--key-file={d / 'munge.key'}",
                        f"--socket={d / 'munge.sock'}", f"--pid-file={d / 'munged.pid'}",
                        f"--log-file={d / 'munged.log'}", f"--seed-file={d / 'munged.seed'}"], "munged")
        self._wait(lambda: (d / "munge.sock").exists(), "munged's socket")
        self.conf.write_text(self._config())
        (d / "cgroup.conf").write_text("CgroupPlugin=cgroup/v1\nCgroupMountpoint=/sys/fs/cgroup\n")
        self._spawn(0, ["/usr/sbin/slurmctld", "-D", "-f", self.conf], "slurmctld")
        for i, name in enumerate(self.hosts.names):
            (d / f"spool-{name}").mkdir(exist_ok=True)
            self._spawn(i, ["/usr/sbin/slurmd", "-D", "-N", name, "-f", self.conf], f"slurmd-{name}",
                        keep_sys=True)
        self._wait(self._nodes_idle, "every node idle in sinfo", timeout=60)

    def _config(self) -> str:
        d, h = self.dir, self.hosts
        nodes = "".join(f"NodeName={n} NodeAddr={a} CPUs={os.cpu_count()} State=UNKNOWN\n"
                        for n, a in zip(h.names, h.addr))
        # slurmctld checks that the machine's name is its host's: every namespace shares it
        return (f"ClusterName=distbn\nSlurmctldHost={socket.gethostname()}({h.addr[0]})\n"
                "SlurmUser=root\nSlurmdUser=root\nAuthType=auth/munge\nCredType=cred/munge\n"
                f"AuthInfo=socket={d / 'munge.sock'}\n"
                "MpiDefault=none\nProctrackType=proctrack/linuxproc\nTaskPlugin=task/none\n"
                "SelectType=select/linear\nSchedulerType=sched/builtin\nReturnToService=2\n"
                "SlurmdParameters=config_overrides\nJobAcctGatherType=jobacct_gather/none\n"
                "AccountingStorageType=accounting_storage/none\nJobCompType=jobcomp/none\n"
                f"StateSaveLocation={d / 'state'}\nSlurmdSpoolDir={d / 'spool-%n'}\n"
                f"SlurmctldPidFile={d / 'slurmctld.pid'}\nSlurmdPidFile={d / 'slurmd-%n.pid'}\n"
                f"SlurmctldLogFile={d / 'slurmctld.log'}\nSlurmdLogFile={d / 'slurmd-%n.log'}\n"
                f"{nodes}PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP\n")

    def _spawn(self, i, cmd, name, keep_sys=False):
        """``keep_sys``: slurmd checks the machine's cgroup mounts under /sys, which `ip netns
        exec` hides by mounting a fresh /sys; it gets the host's network namespace and its own
        mount namespace with only /etc/hosts replaced instead (what `ip netns exec` also does)."""
        log = open(self.dir / f"{name}.out", "w")
        if keep_sys:
            ns = self.hosts.names[i]
            cmd = ["nsenter", f"--net=/run/netns/{ns}", "unshare", "--mount", "--propagation",
                   "private", "sh", "-c", f'mount --bind /etc/netns/{ns}/hosts /etc/hosts && exec "$@"',
                   "sh", *map(str, cmd)]
            proc = subprocess.Popen(cmd, env=self.hosts.env(self.env), stdout=log, stderr=subprocess.STDOUT)
        else:
            proc = self.hosts.popen(i, cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        self._procs.append(proc)

    def _nodes_idle(self) -> bool:
        out = self.hosts.run(0, ["sinfo", "-h", "-N", "-o", "%N %t"], timeout=15, check=False,
                             env=self.env).stdout.split()
        states = dict(zip(out[0::2], out[1::2]))
        return all(states.get(n) == "idle" for n in self.hosts.names)

    def _wait(self, ok, what, timeout=20.0):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if ok():
                return
            for p in self._procs:
                if p.poll() is not None:
                    raise RuntimeError(f"{p.args[3:5]} exited: {self.logs()}")
            time.sleep(0.3)
        raise RuntimeError(f"timed out waiting for {what}: {self.logs()}")

    def logs(self) -> str:
        return "\n".join(f"== {p.name}\n{p.read_text()[-1500:]}" for p in sorted(self.dir.glob("*.out"))
                         if p.stat().st_size) + "\n".join(
            f"== {p.name}\n{p.read_text()[-1500:]}" for p in sorted(self.dir.glob("*.log")))

    def close(self):
        for p in self._procs:
            if p.poll() is None:
                p.kill()
        for p in self._procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        shutil.rmtree(self.dir, ignore_errors=True)
