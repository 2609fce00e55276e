"""Test hosts on one machine: network namespaces joined by a bridge, an sshd in each.

    with Hosts(2, tmp_path) as hosts:
        hosts.run(0, ["horovodrun", "-H", f"{hosts.addr[0]}:2,{hosts.addr[1]}:2", ...])

Layout: a "switch" namespace holds a bridge; host i is namespace ``<tag>h<i>`` whose interface
``dbn0`` (a veth pair, its other end on the bridge) has 198.18.0.<i+1>/24, from the
benchmarking range 198.18.0.0/15, with no route anywhere else. Nothing is added to the
machine's own namespace: no interface, no address, no listening socket. Each host runs
``sshd`` (host key, client key and configs generated in the test's folder, listening only on
its host's address) so that horovodrun starts workers over ssh as on a cluster; the file system
is shared, like a cluster's shared home. ``ssh_path`` is a folder whose ``ssh`` wraps the real
one with the test's key and known-hosts file (nothing is written to ~/.ssh); put it first on
the launcher's PATH.

Teardown (``__exit__``, also after a failed or timed-out test): every process in the
namespaces is killed, then the namespaces are deleted (their veths go with them).
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

SUBNET = "198.18.0"
IFACE = "dbn0"


def unavailable() -> str:
    """Why the harness cannot run here ("" when it can)."""
    if os.geteuid() != 0:
        return "needs root (ip netns)"
    for tool in ("ip", "ssh", "ssh-keygen"):
        if shutil.which(tool) is None:
            return f"needs {tool} (tests/hosts/install.sh installs it as root)"
    if not os.access("/usr/sbin/sshd", os.X_OK):
        return "needs /usr/sbin/sshd (openssh-server; tests/hosts/install.sh installs it as root)"
    probe = f"dbnprobe{os.getpid()}"
    if subprocess.run(["ip", "netns", "add", probe], capture_output=True).returncode != 0:
        return "ip netns add is not permitted here"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return ""


def _ip(*args, check=True):
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


class Managed:
    """A context manager that starts with ``_start`` and always ends with ``close``, also
    when the start fails half-way."""

    def __enter__(self):
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc):
        self.close()


class Hosts(Managed):
    def __init__(self, n: int, folder: Path):
        self.n, self.dir = n, Path(folder)
        self.tag = f"dbn{os.getpid() % 100000}"
        self.switch = f"{self.tag}sw"
        self.names = [f"{self.tag}h{i}" for i in range(n)]
        self.addr = [f"{SUBNET}.{i + 1}" for i in range(n)]
        self.ssh_path = self.dir / "bin"
        self._sshd = []

    # --- building -----------------------------------------------------------------------
    def _start(self):
        self._network()
        self._keys()
        for i in range(self.n):
            self._start_sshd(i)
        for i in range(self.n):
            self._wait_ssh(i)

    def _network(self):
        _ip("netns", "add", self.switch)
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")
        for i, ns in enumerate(self.names):
            self._hosts_file(i)
            _ip("netns", "add", ns)
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("link", "add", IFACE, "netns", ns, "type", "veth", "peer", "name", f"p{i}",
                "netns", self.switch)
            _ip("-n", self.switch, "link", "set", f"p{i}", "master", "br0", "up")
            _ip("-n", ns, "addr", "add", f"{self.addr[i]}/24", "dev", IFACE)
            _ip("-n", ns, "link", "set", IFACE, "up")

    def _hosts_file(self, i: int):
        """/etc/netns/<ns>/hosts, which `ip netns exec` mounts over /etc/hosts inside host i:
        the machine's name resolves to host i's address there, as a cluster node's name does, and
        every host's namespace name to its address (node names, for SLURM).
        Horovod 0.28.1 needs it: its process-set Gloo contexts (the global one included) ignore
        HOROVOD_GLOO_IFACE and bind to the address of the host name (127.0.1.1 on a stock
        Debian, unreachable from the other hosts)."""
        folder = Path("/etc/netns") / self.names[i]
        folder.mkdir(parents=True, exist_ok=True)
        others = "".join(f"{a} {n}\n" for a, n in zip(self.addr, self.names))  # node names
        (folder / "hosts").write_text(f"127.0.0.1 localhost\n{self.addr[i]} {socket.gethostname()}\n"
                                      f"{others}")

    def _keys(self):
        self.dir.mkdir(parents=True, exist_ok=True)
        for name in ("host_key", "client_key"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.dir / name)],
                           check=True)
        shutil.copy(self.dir / "client_key.pub", self.dir / "authorized_keys")
        (self.dir / "ssh_config").write_text(
            f"IdentityFile {self.dir / 'client_key'}\nUserKnownHostsFile {self.dir / 'known_hosts'}\n"
            "StrictHostKeyChecking no\nLogLevel ERROR\nConnectTimeout 10\n")  # no keep-alives: ssh's defaults
        self.ssh_path.mkdir(exist_ok=True)
        wrapper = self.ssh_path / "ssh"
        wrapper.write_text(f'#!/bin/sh\nexec /usr/bin/ssh -F {self.dir / "ssh_config"} "$@"\n')
        wrapper.chmod(0o755)

    def _start_sshd(self, i: int):
        cfg = self.dir / f"sshd_{i}.conf"
        cfg.write_text(
            f"ListenAddress {self.addr[i]}\nPort 22\nHostKey {self.dir / 'host_key'}\n"
            f"AuthorizedKeysFile {self.dir / 'authorized_keys'}\nPermitRootLogin prohibit-password\n"
            "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n"
            f"StrictModes no\nPidFile {self.dir / f'sshd_{i}.pid'}\nAcceptEnv *\n"
            "MaxStartups 100\nMaxSessions 100\n")
        Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege-separation folder
        log = open(self.dir / f"sshd_{i}.log", "w")
        self._sshd.append(subprocess.Popen(
            ["ip", "netns", "exec", self.names[i], "/usr/sbin/sshd", "-D", "-e", "-f", str(cfg)],
            stdout=log, stderr=subprocess.STDOUT))

    def _wait_ssh(self, i: int, timeout: float = 20.0):
        deadline = time.time() + timeout
        while time.time() < deadline:
            ok = self.run(0, ["ssh", self.addr[i], "true"], timeout=15, check=False).returncode == 0
            if ok:
                return
            time.sleep(0.3)
        raise RuntimeError(f"sshd on {self.names[i]} ({self.addr[i]}) did not answer: "
                           f"{(self.dir / f'sshd_{i}.log').read_text()[-2000:]}")

    # --- using ----------------------------------------------------------------------------
    def env(self, extra=None) -> dict:
        """The environment for a command on a host: the test's ssh first on PATH."""
        return {**os.environ, "PATH": f"{self.ssh_path}:{os.environ['PATH']}", **(extra or {})}

    def command(self, i: int, cmd: list) -> list:
        return ["ip", "netns", "exec", self.names[i], *map(str, cmd)]

    def run(self, i: int, cmd: list, timeout: float, check=True, env=None, **kw):
        return subprocess.run(self.command(i, cmd), env=self.env(env), capture_output=True,
                              text=True, timeout=timeout, check=check, **kw)

    def popen(self, i: int, cmd: list, env=None, **kw):
        return subprocess.Popen(self.command(i, cmd), env=self.env(env), **kw)

    def pids(self, i: int, but_sshd: bool = True) -> list:
        """Processes in host i's namespace (sshd's own processes left out by default)."""
        pids = []
        for p in map(int, _ip("netns", "pids", self.names[i], check=False).stdout.split()):
            try:
                if but_sshd and Path(f"/proc/{p}/comm").read_text().strip() == "sshd":
                    continue
            except OSError:  # gone meanwhile
                continue
            pids.append(p)
        return pids

    def kill_host(self, i: int):
        """Host i is lost: every process in it (its workers, its sshd) is killed."""
        for p in self.pids(i, but_sshd=False):
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def link(self, i: int, up: bool):
        _ip("-n", self.switch, "link", "set", f"p{i}", "up" if up else "down")

    # --- teardown -------------------------------------------------------------------------
    def close(self):
        for ns in [*self.names, self.switch]:
            for _ in range(3):
                pids = _ip("netns", "pids", ns, check=False).stdout.split()
                if not pids:
                    break
                for p in pids:
                    try:
                        os.kill(int(p), signal.SIGKILL)
                    except (ProcessLookupError, ValueError):
                        pass
                time.sleep(0.2)
            _ip("netns", "del", ns, check=False)
            shutil.rmtree(Path("/etc/netns") / ns, ignore_errors=True)
        for p in self._sshd:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
