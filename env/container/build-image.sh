#!/usr/bin/env bash
# A small Debian bookworm image for the charliecloud runtime (`ch-run IMAGE_DIR -- CMD`), built
# from Debian's packages by debootstrap: no registry pulls. hpcdl's Python is NOT copied in: the
# site profile binds the checkout, the venv and the interpreter the venv was made from at the
# same paths (see docs/site-admin.md, "Containers"). The image only has to provide the shared
# libraries that interpreter links against, and the mount points for those binds.
#
#   env/container/build-image.sh            # prints the image directory on its last line
#
# The image is cached outside the checkout, in $HPCDL_IMAGE_ROOT/<hash of this recipe>
# (default /var/tmp/hpcdl-images), and reused while the recipe is unchanged: a second call takes
# well under a second. Building needs root (debootstrap; apt installs debootstrap and
# charliecloud); using it does not: the image is built for unprivileged users (`ch-run` runs as
# the user, in a user namespace), as a site's shared image is. So the tree is world-readable,
# the mount points' parent folders are searchable, and the cache key does not depend on who
# asks: an unprivileged user (the tests run as hpcdl-alice) finds the image root built.
set -euo pipefail
# The image holds Debian's public packages only: readable by all, whatever the caller's umask
# (under 077 every folder made here would be root's alone and ch-run could not enter it).
umask 022

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CHECKOUT=$(cd "$HERE/../.." && pwd)
IMAGE_ROOT=${HPCDL_IMAGE_ROOT:-/var/tmp/hpcdl-images}
MIRROR=${HPCDL_DEBIAN_MIRROR:-http://deb.debian.org/debian}
SUITE=bookworm
HOST_PACKAGES=(debootstrap charliecloud)
# What the bound interpreter (pyenv's CPython) and its extension modules link against, beyond
# minbase; procps for `ps` in debugging sessions.
IMAGE_PACKAGES=(libssl3 libffi8 zlib1g libbz2-1.0 liblzma5 libsqlite3-0 libreadline8
    libncursesw6 libuuid1 libnsl2 libtirpc3 libexpat1 libgdbm6 ca-certificates procps)
# The interpreter the venv was made from (pyvenv.cfg `home` is its bin/): bound at the same path.
VENV=${HPCDL_VENV:-$CHECKOUT/.venv}
PY_PREFIX=$(sed -n 's/^home *= *//p' "$VENV/pyvenv.cfg" 2>/dev/null | sed 's:/bin$::')
# Mount points for the binds a profile uses: the checkout (the venv lives in it), the Python
# prefix, plus $HPCDL_IMAGE_MOUNTS (colon-separated). ch-run binds onto existing directories
# only, so they are made in the image. The users' homes (the default job root is
# $HOME/.hpcdl/jobs) need none of their own: a profile binds the home tree, /home, which the
# image has; a mount point under the builder's $HOME (root's /root) would serve root alone.
MOUNTS=("$CHECKOUT" ${PY_PREFIX:+"$PY_PREFIX"})
[[ $VENV == "$CHECKOUT"/* ]] || MOUNTS+=("$VENV")
IFS=: read -r -a EXTRA <<<"${HPCDL_IMAGE_MOUNTS:-}"
MOUNTS+=("${EXTRA[@]}")

say() { echo "build-image: $*" >&2; }
die() { say "error: $*"; exit 1; }

start=$EPOCHREALTIME
elapsed() { awk -v a="$start" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }'; }

# The cache key: this recipe, the suite and the mount points (paths differ between checkouts).
KEY=$( { cat "${BASH_SOURCE[0]}"; echo "$SUITE ${IMAGE_PACKAGES[*]} ${MOUNTS[*]}"; } | sha256sum | cut -c1-16)
IMAGE=$IMAGE_ROOT/$KEY
if [[ -f $IMAGE/etc/hpcdl-image ]]; then
    say "cached image $IMAGE ($(elapsed) s)"
    echo "$IMAGE"
    exit 0
fi

(( EUID == 0 )) || die "no image for this recipe in $IMAGE_ROOT ($KEY), and building one needs root (debootstrap): run 'make image' as root, or set HPCDL_IMAGE_ROOT to where it was built"

# Host packages, the same way slurm/devcluster/devcluster.sh installs its own: apt-get update
# only when the install cannot work without it.
missing=()
for p in "${HOST_PACKAGES[@]}"; do
    [[ $(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null || true) == installed ]] || missing+=("$p")
done
if ((${#missing[@]})); then
    say "installing ${missing[*]} (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    log=$(mktemp)
    if ! apt-get install -y -q -o DPkg::Lock::Timeout=300 "${missing[@]}" >"$log" 2>&1; then
        apt-get update -q -o DPkg::Lock::Timeout=300 >>"$log" 2>&1 || { tail -n 30 "$log" >&2; die "apt-get update failed"; }
        apt-get install -y -q -o DPkg::Lock::Timeout=300 "${missing[@]}" >>"$log" 2>&1 || { tail -n 30 "$log" >&2; die "apt-get install ${missing[*]} failed"; }
    fi
    rm -f "$log"
fi

mkdir -p "$IMAGE_ROOT"
tmp=$(mktemp -d "$IMAGE_ROOT/.build-$KEY.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
say "debootstrap --variant=minbase $SUITE into $tmp (a few minutes; log in $tmp.log)"
include=$(IFS=,; echo "${IMAGE_PACKAGES[*]}")
if ! debootstrap --variant=minbase --include="$include" "$SUITE" "$tmp" "$MIRROR" >"$tmp.log" 2>&1; then
    tail -n 30 "$tmp.log" >&2
    die "debootstrap failed (full log: $tmp.log)"
fi
rm -rf "$tmp"/var/cache/apt/archives/*.deb "$tmp"/var/lib/apt/lists/*
for m in "${MOUNTS[@]}"; do
    [[ -n $m ]] || continue
    mkdir -p "$tmp$m"
    # A user's ch-run must reach each mount point: search permission on every parent in the
    # image (the Python prefix of a pyenv lies under /root, 0700 in the image as on the host,
    # where `devcluster.sh grant` opens it). Never through a symlink: one with an absolute
    # target would name a host path.
    d=$m
    while [[ $d != / ]]; do
        [[ -L $tmp$d ]] || chmod a+x "$tmp$d"
        d=$(dirname -- "$d")
    done
done
# ch-run binds the host's /etc/hosts and /etc/resolv.conf over these: they must exist.
touch "$tmp/etc/hosts" "$tmp/etc/resolv.conf"
# The marker the tests read to prove a command ran inside (and the cache's "complete" flag).
printf 'hpcdl-image %s\nsuite %s\n' "$KEY" "$SUITE" >"$tmp/etc/hpcdl-image"
# mktemp made the root of the tree 0700: the image is for every user of the machine.
chmod 755 "$tmp"
mv "$tmp" "$IMAGE"
trap - EXIT
rm -f "$tmp.log"
say "built $IMAGE in $(elapsed) s"
echo "$IMAGE"
