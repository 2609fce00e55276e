# Sourced: `nonfree_download DEST PACKAGE[=VERSION]...` puts Debian 12 (bookworm) non-free .deb
# files into DEST without installing them and without root: apt itself, on a private state
# folder with the non-free component only, so the archive's signature is checked as for any
# install and /etc/apt is left alone. Used for what PyPI lacks of CUDA 11 (nvcc, its static
# runtime: launch/cuda_toolkit.sh) and for the driver's libcuda (the GPU-install check).
DEBIAN_MIRROR=${DISTBN_DEBIAN_MIRROR:-http://deb.debian.org/debian}
# Debian 12's packaging of CUDA 11.8.89 (nvidia-cuda-toolkit, nvidia-cuda-dev): the release of
# PyPI's wheels in launch/cuda11.txt. Debian may replace it; then this is the one line to change.
CUDA_DEB_VERSION=11.8.89~11.8.0-5~deb12u1
DEBIAN_KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg

nonfree_download() {
  local dest=$1; shift
  command -v apt-get >/dev/null 2>&1 || { echo "apt-get is needed to fetch $* from Debian's archive" >&2; return 1; }
  [ -f "$DEBIAN_KEYRING" ] || { echo "$DEBIAN_KEYRING is missing (package debian-archive-keyring)" >&2; return 1; }
  local state rc=0
  state=$(mktemp -d)
  mkdir -p "$state/lists/partial" "$state/archives/partial" "$dest"
  echo "deb [signed-by=$DEBIAN_KEYRING] $DEBIAN_MIRROR bookworm non-free" > "$state/sources.list"
  local opts=(-q -o "Dir::State=$state" -o "Dir::State::status=/dev/null" -o "Dir::Cache=$state"
              -o "Dir::Etc::SourceList=$state/sources.list" -o "Dir::Etc::SourceParts=/nonexistent"
              -o Debug::NoLocking=1 -o "APT::Sandbox::User=$(id -un)")
  if apt-get "${opts[@]}" update >"$state/log" 2>&1; then
    (cd "$dest" && apt-get "${opts[@]}" download "$@") >>"$state/log" 2>&1 || rc=$?
  else
    rc=$?
  fi
  [ "$rc" = 0 ] || tail -5 "$state/log" >&2
  rm -rf "$state"
  return "$rc"
}
