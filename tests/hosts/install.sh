#!/usr/bin/env bash
# What the multi-host tests (tests/test_multihost.py) need from the system: iproute2's `ip`,
# Debian's openssh-server (its sshd runs only inside the tests' network namespaces) and a
# SLURM (slurmctld, slurmd, slurm-client, munge: started by the test, inside them too). Installed
# here as root with apt-get when missing; anywhere else this says why the tests will skip.
# The packages' own services are never started: a policy-rc.d denies them during the install.
set -euo pipefail
need=()
command -v ip >/dev/null 2>&1 || need+=(iproute2)
[ -x /usr/sbin/sshd ] || need+=(openssh-server)
command -v ssh >/dev/null 2>&1 || need+=(openssh-client)
[ -x /usr/sbin/slurmctld ] || need+=(slurmctld)
[ -x /usr/sbin/slurmd ] || need+=(slurmd)
[ -x /usr/bin/sbatch ] || need+=(slurm-client)
[ -x /usr/sbin/munged ] || need+=(munge)
command -v nsenter >/dev/null 2>&1 || need+=(util-linux)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "tests/hosts/install.sh: missing ${need[*]} (needs root and apt-get): the multihost tests will skip" >&2
  exit 0
fi
guard=0
if [ ! -e /usr/sbin/policy-rc.d ]; then
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d && guard=1
fi
trap '[ $guard = 1 ] && rm -f /usr/sbin/policy-rc.d' EXIT
echo "tests/hosts/install.sh: apt-get install ${need[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null ||
  { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null; }
