#!/bin/sh
# Finishes the sandbox image. Runs as root inside the image being built, from a
# directory that also holds the `uv` binary:
#   - Dockerfile path:   RUN from the build context (see Dockerfile)
#   - debootstrap path:  chroot into the rootfs (see scripts/_lib.sh)
# Keep it POSIX sh and idempotent; both paths must end up with the same layout.
set -eu

here=$(dirname "$0")

# uv, copied from the host's .venv (it comes from the `uv` PyPI wheel).
install -m 0755 "$here/uv" /usr/local/bin/uv

# Unprivileged user that runs user code.
getent group sandbox >/dev/null || groupadd --gid 10001 sandbox
getent passwd sandbox >/dev/null ||
    useradd --uid 10001 --gid 10001 --home-dir /home/sandbox --create-home \
        --shell /bin/sh sandbox

# /work: the user's working directory. /opt/deps: where dependencies go. Both
# belong to the sandbox user: a fresh named volume mounted on /opt/deps takes
# this owner, so the install container (uid 10001) can write it; run containers
# mount it read-only.
install -d -o 10001 -g 10001 -m 0755 /work /opt/deps

# Keep the image small.
if command -v apt-get >/dev/null; then apt-get clean; fi
rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/cache/debconf/*-old \
    /usr/share/doc/* /usr/share/man/* /usr/share/info/* /usr/share/lintian/* \
    /var/log/apt/* /var/log/dpkg.log /var/log/bootstrap.log /root/.cache
