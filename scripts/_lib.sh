#!/usr/bin/env bash
# shellcheck shell=bash
# Set-up helpers shared by scripts/*. Source this file; don't execute it.
#
#   ensure_venv           .venv exists and has the project installed (-e '.[dev]')
#   ensure_docker         a Docker engine answers `docker info` (starts one if root)
#   ensure_image [--force]  the sandbox image $SANDBOX_IMAGE matches the repo
#                         (--force: rebuild from scratch, bypassing all caches)
#   ensure_all            the three above, in that order, one line per step
#   ensure_browser        Debian's chromium and playwright-core in tests/browser
#                         (scripts/test only; never downloads a browser)
#   ensure_clients        the Vercel AI SDK in tests/clients (npm ci; scripts/test only)
#   ensure_redis          a Redis answers at $STREAMSVC_TEST_REDIS_URL (installs Debian's
#                         redis-server and starts a private instance when none does)
#   ensure_second_engine  a second dockerd on $STREAMSVC_TEST_DOCKER_HOST_2 with the
#                         sandbox image (scripts/test only: the multi-host tests)
#   stop_started          stop the private Redis and the second engine if this shell's
#                         ensure_redis / ensure_second_engine started them (else nothing)
#
# Environment:
#   PYTHON                    interpreter for a new .venv (default python3, >= 3.11)
#   SANDBOX_IMAGE             sandbox image name (default streamsvc-sandbox:latest)
#   SANDBOX_BUILD             auto (default) | dockerfile | debootstrap
#   SANDBOX_DEBIAN_MIRROR     mirror for debootstrap (default http://deb.debian.org/debian)
#   STREAMSVC_SKIP_DOCKER=1   ensure_all skips the engine and the image
#   STREAMSVC_SKIP_BROWSER=1  ensure_browser does nothing (the browser tests skip)
#   STREAMSVC_SKIP_REDIS=1    ensure_redis does nothing (the Redis tests skip, not in CI)
#   STREAMSVC_SKIP_ENGINE2=1  ensure_second_engine does nothing (likewise)
#   STREAMSVC_TEST_REDIS_URL  the tests' Redis (default redis://127.0.0.1:6390/0, private)
#   STREAMSVC_TEST_DOCKER_HOST_2  the second engine (default unix:///run/streamsvc-docker2.sock)
#   CHROMIUM                  browser binary (default /usr/bin/chromium)
#
# Everything is idempotent, and the slow paths take a lock, so scripts/run and
# scripts/test may start at the same time.

set -euo pipefail
shopt -s inherit_errexit

STREAMSVC_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SANDBOX_IMAGE=${STREAMSVC_SANDBOX_IMAGE:-${SANDBOX_IMAGE:-streamsvc-sandbox:latest}}
SANDBOX_IMAGE_DIR=$STREAMSVC_ROOT/streamsvc/sandbox/runner/image
SANDBOX_IMAGE_LABEL=streamsvc.image-version
SANDBOX_CACHE_DIR=${XDG_CACHE_HOME:-$HOME/.cache}/streamsvc
SANDBOX_DEBIAN_MIRROR=${SANDBOX_DEBIAN_MIRROR:-http://deb.debian.org/debian}
# The debootstrap recipe is part of the image definition (see sandbox_image_version).
SANDBOX_DEBOOTSTRAP_ARGS=(
    --variant=minbase
    '--include=python3,python3-venv,python3-pip,ca-certificates'
    bookworm
)
DOCKERD_LOG=/tmp/streamsvc-dockerd.log
DOCKERD_PIDFILE=/run/streamsvc-dockerd.pid
STREAMSVC_LOG_DIR=${TMPDIR:-/tmp}

# ---------------------------------------------------------------- helpers

_log() { printf '  .. %s\n' "$*" >&2; }
_die() {
    printf 'error: %s\n' "$*" >&2
    exit 1
}

# Milliseconds since the epoch (bash 5's EPOCHREALTIME, no subprocess).
_now_ms() {
    local us=${EPOCHREALTIME/[.,]/}
    echo $((us / 1000))
}

# _step NAME START_MS MESSAGE: the one summary line each ensure_* prints.
_step() {
    local ms=$(($(_now_ms) - $2))
    printf '%-7s %s (%d.%02ds)\n' "$1:" "$3" $((ms / 1000)) $((ms % 1000 / 10))
}

# _run_logged NAME CMD...: run an external command quietly; on failure show
# the end of its log and stop.
_run_logged() {
    local log=$STREAMSVC_LOG_DIR/streamsvc-$1.log
    shift
    if ! "$@" >"$log" 2>&1; then
        tail -n 25 "$log" >&2
        _die "failed: $* (full log: $log)"
    fi
}

# _lock FILE / _unlock: serialise a slow path between concurrent scripts.
_lock() {
    mkdir -p "$(dirname "$1")"
    exec {_STREAMSVC_LOCK_FD}>"$1"
    flock "$_STREAMSVC_LOCK_FD"
}
_unlock() { exec {_STREAMSVC_LOCK_FD}>&-; }

# _apt_install PKG...: apt-get install, running `apt-get update` only when a
# package has no candidate or the install fails on stale lists.
_apt_install() {
    local pkg candidate
    local -a apt=(env DEBIAN_FRONTEND=noninteractive apt-get -y -q -o Dpkg::Use-Pty=0)
    for pkg in "$@"; do
        candidate=$(apt-cache policy "$pkg" 2>/dev/null | awk '/Candidate:/ {print $2}')
        if [[ -z $candidate || $candidate == "(none)" ]]; then
            _log "apt-get update"
            "${apt[@]}" update >"$STREAMSVC_LOG_DIR/streamsvc-apt-update.log" 2>&1 ||
                _log "apt-get update reported errors; trying the install anyway"
            break
        fi
    done
    _log "apt-get install $*"
    if ! "${apt[@]}" install --no-install-recommends "$@" \
        >"$STREAMSVC_LOG_DIR/streamsvc-apt.log" 2>&1; then
        "${apt[@]}" update >"$STREAMSVC_LOG_DIR/streamsvc-apt-update.log" 2>&1 || true
        _run_logged apt "${apt[@]}" install --no-install-recommends "$@"
    fi
}

# ---------------------------------------------------------------- venv

_python_ok() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; }

ensure_venv() {
    local t0 venv=$STREAMSVC_ROOT/.venv py=${PYTHON:-python3} what=""
    t0=$(_now_ms)
    if [[ ! -x $venv/bin/python ]]; then
        command -v "$py" >/dev/null ||
            _die "$py not found: install Python >= 3.11 or set PYTHON=/path/to/python3.11"
        _python_ok "$py" ||
            _die "$("$py" -V 2>&1) ($(command -v "$py")) is too old: streamsvc needs" \
                "Python >= 3.11; set PYTHON=/path/to/python3.11"
        _log "creating .venv with $("$py" -V 2>&1)"
        "$py" -m venv "$venv"
        what="created, "
    fi
    _python_ok "$venv/bin/python" ||
        _die ".venv has $("$venv/bin/python" -V 2>&1), streamsvc needs >= 3.11:" \
            "remove .venv and rerun (PYTHON=/path/to/python3.11 to pick one)"

    local stamp=$venv/.installed
    if [[ ! -e $stamp || $STREAMSVC_ROOT/pyproject.toml -nt $stamp ]]; then
        _lock "$venv/.install.lock"
        if [[ ! -e $stamp || $STREAMSVC_ROOT/pyproject.toml -nt $stamp ]]; then
            _log "pip install -e '.[dev]' (log: $STREAMSVC_LOG_DIR/streamsvc-pip.log)"
            _run_logged pip "$venv/bin/python" -m pip install --disable-pip-version-check \
                -e "${STREAMSVC_ROOT}[dev]"
            touch "$stamp"
            what+="installed -e .[dev]"
        fi
        _unlock
    fi
    _step venv "$t0" ".venv ${what:-up to date}"
}

# ---------------------------------------------------------------- docker

# True if dockerd from our pidfile or the default one is alive.
_dockerd_alive() {
    local f pid
    for f in "$DOCKERD_PIDFILE" /var/run/docker.pid; do
        [[ -s $f ]] || continue
        pid=$(<"$f")
        if kill -0 "$pid" 2>/dev/null; then return 0; fi
    done
    return 1
}

_docker_answers() { docker info >/dev/null 2>&1; }

ensure_docker() {
    local t0 i
    t0=$(_now_ms)
    if command -v docker >/dev/null && _docker_answers; then
        _step docker "$t0" "engine $(docker version -f '{{.Server.Version}}' 2>/dev/null) answers"
        return 0
    fi

    # Only ever start the local default engine, and only as root on Debian/Ubuntu.
    case ${DOCKER_HOST:-} in
    "" | unix:///var/run/docker.sock | unix:///run/docker.sock) ;;
    *) _die "DOCKER_HOST=$DOCKER_HOST does not answer: start that engine or unset DOCKER_HOST" ;;
    esac
    ((EUID == 0)) || _die "no Docker engine answers 'docker info'. Start Docker (e.g." \
        "'sudo systemctl start docker'), add yourself to the docker group, or set" \
        "DOCKER_HOST; run as root to let this script install and start one."
    [[ -r /etc/debian_version ]] ||
        _die "no Docker engine answers and this is not Debian/Ubuntu: start Docker yourself"

    _lock /tmp/streamsvc-dockerd.lock
    if ! command -v dockerd >/dev/null; then
        _apt_install docker.io
    fi
    if _docker_answers || _dockerd_alive; then
        : # started meanwhile (another script, or the package's own init script)
    elif [[ -d /run/systemd/system ]] && systemctl cat docker.service >/dev/null 2>&1; then
        _log "systemctl start docker"
        systemctl start docker
    else
        _log "starting dockerd in the background (log: $DOCKERD_LOG)"
        # The daemon must not inherit the lock's fd, or it would hold the lock forever.
        # The subshell makes it an orphan at once: a caller that later execs (scripts/test
        # execs pytest) must not find the engine among its own children.
        (setsid nohup dockerd --pidfile "$DOCKERD_PIDFILE" \
            >>"$DOCKERD_LOG" 2>&1 </dev/null {_STREAMSVC_LOCK_FD}>&- &)
    fi
    for ((i = 0; i < 60; i++)); do
        if _docker_answers; then break; fi
        if ((i > 2)) && ! _dockerd_alive && [[ ! -d /run/systemd/system ]]; then
            tail -n 15 "$DOCKERD_LOG" >&2 || true
            _die "dockerd exited (log: $DOCKERD_LOG)"
        fi
        sleep 1
    done
    _unlock
    _docker_answers || _die "Docker engine did not answer within 60 s (log: $DOCKERD_LOG)"
    _step docker "$t0" "started engine $(docker version -f '{{.Server.Version}}' 2>/dev/null)"
}

# ---------------------------------------------------------------- image

# Path of the host's uv binary (installed into .venv from PyPI if missing).
_host_uv() {
    local venv=$STREAMSVC_ROOT/.venv
    [[ -x $venv/bin/python ]] || ensure_venv >&2
    if [[ ! -x $venv/bin/uv ]]; then
        _log "pip install uv (into .venv, for the sandbox image)"
        "$venv/bin/python" -m pip install -q --disable-pip-version-check uv >&2
    fi
    echo "$venv/bin/uv"
}

# Version of the image definition: a hash of the files in
# streamsvc/sandbox/runner/image/, the debootstrap recipe and the uv version. The image
# carries it as the label streamsvc.image-version; a change means a rebuild.
sandbox_image_version() {
    local uv
    uv=$(_host_uv)
    {
        (cd "$SANDBOX_IMAGE_DIR" &&
            find . -type f ! -name '*.pyc' -print0 | LC_ALL=C sort -z | xargs -0 sha256sum)
        printf '%s\n' "${SANDBOX_DEBOOTSTRAP_ARGS[@]}"
        "$uv" --version
    } | sha256sum | cut -c1-16
}

_image_label() {
    docker image inspect -f "{{ index .Config.Labels \"$SANDBOX_IMAGE_LABEL\" }}" \
        "$SANDBOX_IMAGE" 2>/dev/null || true
}

# dockerfile if the Dockerfile's base image can be had, else debootstrap.
_build_method() {
    local base
    case ${SANDBOX_BUILD:-auto} in
    dockerfile | debootstrap)
        echo "$SANDBOX_BUILD"
        return 0
        ;;
    auto) ;;
    *) _die "SANDBOX_BUILD must be auto, dockerfile or debootstrap (got $SANDBOX_BUILD)" ;;
    esac
    base=$(awk 'toupper($1) == "FROM" {print $2; exit}' "$SANDBOX_IMAGE_DIR/Dockerfile")
    _log "checking whether $base can be pulled"
    if timeout 20 docker pull -q "$base" >/dev/null 2>&1 ||
        docker image inspect "$base" >/dev/null 2>&1; then
        echo dockerfile
    else
        echo debootstrap
    fi
}

_build_image_dockerfile() {
    local version=$1 force=$2 uv
    local -a opts=()
    if ((force)); then opts+=(--no-cache); fi
    uv=$(_host_uv)
    (
        ctx=$(mktemp -d "$STREAMSVC_LOG_DIR/streamsvc-image-ctx.XXXXXX")
        trap 'rm -rf "$ctx"' EXIT
        cp -pR "$SANDBOX_IMAGE_DIR/." "$ctx/"
        cp -p "$uv" "$ctx/uv"
        _log "docker build (log: $STREAMSVC_LOG_DIR/streamsvc-docker-build.log)"
        _run_logged docker-build docker build "${opts[@]}" \
            --label "$SANDBOX_IMAGE_LABEL=$version" -t "$SANDBOX_IMAGE" "$ctx"
    )
}

# Tarball of a plain debootstrap of SANDBOX_DEBOOTSTRAP_ARGS, cached under
# $SANDBOX_CACHE_DIR and keyed by those args. Prints its path.
# _debootstrap_base 1 ignores (and replaces) the cached tarball.
_debootstrap_base() {
    local force=$1 key tarball
    key=$(printf '%s\n' "${SANDBOX_DEBOOTSTRAP_ARGS[@]}" | sha256sum | cut -c1-16)
    tarball=$SANDBOX_CACHE_DIR/debootstrap-$key.tar
    if ((!force)) && [[ -s $tarball ]]; then
        echo "$tarball"
        return 0
    fi
    command -v debootstrap >/dev/null || _apt_install debootstrap >&2
    mkdir -p "$SANDBOX_CACHE_DIR"
    (
        dir=$(mktemp -d "$STREAMSVC_LOG_DIR/streamsvc-debootstrap.XXXXXX")
        trap 'rm -rf "$dir"' EXIT
        _log "debootstrap ${SANDBOX_DEBOOTSTRAP_ARGS[*]} (about a minute;" \
            "log: $STREAMSVC_LOG_DIR/streamsvc-debootstrap.log)"
        _run_logged debootstrap debootstrap "${SANDBOX_DEBOOTSTRAP_ARGS[@]}" "$dir" \
            "$SANDBOX_DEBIAN_MIRROR"
        tar --numeric-owner -C "$dir" -cf "$tarball.tmp" .
        mv "$tarball.tmp" "$tarball"
    ) >&2
    # Drop tarballs of older recipes.
    find "$SANDBOX_CACHE_DIR" -maxdepth 1 -name 'debootstrap-*.tar*' ! -name "${tarball##*/}" \
        -delete
    echo "$tarball"
}

_build_image_debootstrap() {
    local version=$1 force=$2 base uv
    ((EUID == 0)) || _die "no registry for the Dockerfile build, and the debootstrap" \
        "build needs root: run scripts/build-image as root, or set SANDBOX_BUILD=dockerfile"
    uv=$(_host_uv)
    base=$(_debootstrap_base "$force")
    (
        root=$(mktemp -d "$STREAMSVC_LOG_DIR/streamsvc-rootfs.XXXXXX")
        trap 'rm -rf "$root"' EXIT
        tar --numeric-owner -C "$root" -xpf "$base"
        mkdir -p "$root/tmp/streamsvc-build"
        cp -p "$SANDBOX_IMAGE_DIR/setup.sh" "$root/tmp/streamsvc-build/"
        cp -p "$uv" "$root/tmp/streamsvc-build/uv"
        _log "setup.sh in the rootfs"
        _run_logged image-setup env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 \
            chroot "$root" /bin/sh /tmp/streamsvc-build/setup.sh
        rm -rf "$root/tmp/streamsvc-build"
        _log "docker import"
        # Keep these in step with the Dockerfile.
        tar --numeric-owner -C "$root" -c . |
            docker import \
                --change "LABEL $SANDBOX_IMAGE_LABEL=$version" \
                --change 'USER 10001' \
                --change 'WORKDIR /work' \
                --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
                --change 'ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 LANG=C.UTF-8' \
                --change 'CMD ["python3"]' \
                - "$SANDBOX_IMAGE" >/dev/null
    )
}

# Smoke-test a freshly built image; remove it and stop if it is broken.
_verify_image() {
    local out
    _log "verifying $SANDBOX_IMAGE"
    out=$(docker run --rm --network none "$SANDBOX_IMAGE" \
        python3 -c 'import json;print(json.dumps({"ok":True}))' 2>&1) || out="failed: $out"
    if [[ $out == '{"ok": true}' ]]; then
        out=$(docker run --rm --network none "$SANDBOX_IMAGE" sh -c \
            'id -u && uv --version >/dev/null && python3 -m venv /tmp/v && /tmp/v/bin/python -V' \
            2>&1) || out="failed: $out"
        [[ $out == 10001$'\n'Python* ]] && return 0
    fi
    docker rmi -f "$SANDBOX_IMAGE" >/dev/null 2>&1 || true
    _die "the new sandbox image failed its smoke test: $out"
}

# shellcheck disable=SC2120 # scripts/build-image passes --force
ensure_image() {
    local t0 force=0 version method old_id size
    t0=$(_now_ms)
    case ${1:-} in
    --force) force=1 ;;
    "") ;;
    *) _die "ensure_image: unknown argument $1" ;;
    esac
    version=$(sandbox_image_version)
    if ((!force)) && [[ $(_image_label) == "$version" ]]; then
        _step image "$t0" "$SANDBOX_IMAGE up to date ($version)"
        return 0
    fi

    _lock "$SANDBOX_CACHE_DIR/image.lock"
    if ((!force)) && [[ $(_image_label) == "$version" ]]; then
        _unlock # built meanwhile by another script
        _step image "$t0" "$SANDBOX_IMAGE up to date ($version)"
        return 0
    fi
    old_id=$(docker image inspect -f '{{.Id}}' "$SANDBOX_IMAGE" 2>/dev/null || true)
    method=$(_build_method)
    _log "building $SANDBOX_IMAGE ($method, version $version)"
    "_build_image_$method" "$version" "$force"
    _verify_image
    if [[ -n $old_id && $old_id != "$(docker image inspect -f '{{.Id}}' "$SANDBOX_IMAGE")" ]]; then
        docker rmi "$old_id" >/dev/null 2>&1 || true # still used by a container: keep it
    fi
    _unlock
    size=$(docker image inspect -f '{{.Size}}' "$SANDBOX_IMAGE" | numfmt --to=iec-i --suffix=B)
    _step image "$t0" "built $SANDBOX_IMAGE ($method, $size, version $version)"
}

# ---------------------------------------------------------------- browser

BROWSER_DIR=$STREAMSVC_ROOT/tests/browser
CHROMIUM=${CHROMIUM:-/usr/bin/chromium}

_node_major() { node -p 'process.versions.node.split(".")[0]' 2>/dev/null || echo 0; }

ensure_browser() {
    local t0 what="" stamp=$BROWSER_DIR/node_modules/.streamsvc-installed
    local -a pkgs=()
    t0=$(_now_ms)
    if [[ -n ${STREAMSVC_SKIP_BROWSER:-} ]]; then
        echo "browser: skipped (STREAMSVC_SKIP_BROWSER is set)"
        return 0
    fi
    [[ -x $CHROMIUM ]] || pkgs+=(chromium)
    command -v npm >/dev/null || pkgs+=(nodejs npm)
    if ((${#pkgs[@]})); then
        if ((EUID != 0)) || [[ ! -r /etc/debian_version ]]; then
            _die "the browser tests need ${pkgs[*]}: install them (Debian: apt-get install" \
                "${pkgs[*]}) or set STREAMSVC_SKIP_BROWSER=1"
        fi
        _lock /tmp/streamsvc-browser.lock
        _apt_install "${pkgs[@]}"
        _unlock
        what+="installed ${pkgs[*]}, "
    fi
    (($(_node_major) >= 20)) ||
        _die "playwright-core needs node >= 20 (found $(node --version 2>/dev/null || echo none))"
    if [[ ! -e $stamp || $BROWSER_DIR/package-lock.json -nt $stamp ]]; then
        _lock /tmp/streamsvc-browser.lock
        if [[ ! -e $stamp || $BROWSER_DIR/package-lock.json -nt $stamp ]]; then
            _log "npm ci in tests/browser (log: $STREAMSVC_LOG_DIR/streamsvc-npm.log)"
            _run_logged npm env PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 \
                npm ci --prefix "$BROWSER_DIR" --no-audit --no-fund
            touch "$stamp"
            what+="npm ci, "
        fi
        _unlock
    fi
    what=${what%, }
    _step browser "$t0" "$("$CHROMIUM" --version 2>/dev/null), playwright-core${what:+ ($what)}"
}

# ---------------------------------------------------------------- client SDKs

CLIENTS_DIR=$STREAMSVC_ROOT/tests/clients

# The JavaScript clients tests/test_openai_clients.py drives (ai, @ai-sdk/openai-compatible),
# from tests/clients/package-lock.json. Needs node >= 18 and npm (ensure_browser installs
# them on Debian as root); without them the AI SDK tests skip, or fail in CI.
ensure_clients() {
    local t0 stamp=$CLIENTS_DIR/node_modules/.streamsvc-installed
    t0=$(_now_ms)
    if ! command -v npm >/dev/null || (($(_node_major) < 18)); then
        [[ -z ${CI:-} ]] || _die "the client tests need node >= 18 and npm"
        echo "clients: skipped (needs node >= 18 and npm)"
        return 0
    fi
    if [[ ! -e $stamp || $CLIENTS_DIR/package-lock.json -nt $stamp ]]; then
        _lock /tmp/streamsvc-clients.lock
        if [[ ! -e $stamp || $CLIENTS_DIR/package-lock.json -nt $stamp ]]; then
            _log "npm ci in tests/clients (log: $STREAMSVC_LOG_DIR/streamsvc-npm.log)"
            _run_logged npm npm ci --prefix "$CLIENTS_DIR" --no-audit --no-fund
            touch "$stamp"
        fi
        _unlock
    fi
    _step clients "$t0" "ai $(node -p "require('$CLIENTS_DIR/node_modules/ai/package.json').version")"
}

# ---------------------------------------------------------------- redis

# The tests' private Redis: loopback only, its own directory, config, pidfile and log.
# scripts/test stops it at the end when it started it (stop_started), else leaves it.
# Persistence: appendonly, fsync every write (the tests restart Redis and check that
# nothing acknowledged is lost).
REDIS_TEST_PORT=6390
REDIS_TEST_DIR=/tmp/streamsvc-redis
STREAMSVC_TEST_REDIS_URL=${STREAMSVC_TEST_REDIS_URL:-redis://127.0.0.1:$REDIS_TEST_PORT/0}

# _redis_answers URL: a PING answered PONG.
_redis_answers() {
    [[ $(timeout 5 redis-cli -u "$1" ping 2>/dev/null) == PONG ]]
}

ensure_redis() {
    local t0 i what="" conf=$REDIS_TEST_DIR/redis.conf
    t0=$(_now_ms)
    export STREAMSVC_TEST_REDIS_URL
    if [[ -n ${STREAMSVC_SKIP_REDIS:-} ]]; then
        echo "redis: skipped (STREAMSVC_SKIP_REDIS is set)"
        return 0
    fi
    if ! command -v redis-server >/dev/null || ! command -v redis-cli >/dev/null; then
        if ((EUID != 0)) || [[ ! -r /etc/debian_version ]]; then
            _die "the Redis tests need redis-server: install it (Debian: apt-get install" \
                "redis-server) or set STREAMSVC_SKIP_REDIS=1"
        fi
        _lock /tmp/streamsvc-redis.lock
        command -v redis-server >/dev/null || _apt_install redis-server redis-tools
        _unlock
        what="installed redis-server, "
    fi
    if _redis_answers "$STREAMSVC_TEST_REDIS_URL"; then
        _step redis "$t0" "${what}$(_redact_url "$STREAMSVC_TEST_REDIS_URL") answers"
        return 0
    fi
    [[ $STREAMSVC_TEST_REDIS_URL == "redis://127.0.0.1:$REDIS_TEST_PORT/"* ]] ||
        _die "STREAMSVC_TEST_REDIS_URL=$(_redact_url "$STREAMSVC_TEST_REDIS_URL") does not" \
            "answer: start that Redis or unset the variable (a private one is started then)"
    _lock /tmp/streamsvc-redis.lock
    if ! _redis_answers "$STREAMSVC_TEST_REDIS_URL"; then
        mkdir -p "$REDIS_TEST_DIR"
        cat >"$conf" <<CONF
# Written by scripts/_lib.sh (ensure_redis): the test suite's private Redis.
bind 127.0.0.1
port $REDIS_TEST_PORT
protected-mode yes
dir $REDIS_TEST_DIR
pidfile $REDIS_TEST_DIR/redis.pid
logfile $REDIS_TEST_DIR/redis.log
daemonize yes
save ""
appendonly yes
appendfsync always
maxmemory 256mb
maxmemory-policy noeviction
CONF
        _log "starting redis-server on 127.0.0.1:$REDIS_TEST_PORT (log: $REDIS_TEST_DIR/redis.log)"
        # daemonize: it leaves this shell at once and never holds the lock's fd.
        redis-server "$conf" {_STREAMSVC_LOCK_FD}>&- >/dev/null 2>&1 ||
            _die "redis-server did not start (log: $REDIS_TEST_DIR/redis.log)"
        for ((i = 0; i < 50; i++)); do
            if _redis_answers "$STREAMSVC_TEST_REDIS_URL"; then break; fi
            sleep 0.2
        done
        what+="started, "
        _STREAMSVC_STARTED_REDIS=1
    fi
    _unlock
    _redis_answers "$STREAMSVC_TEST_REDIS_URL" ||
        _die "Redis did not answer on 127.0.0.1:$REDIS_TEST_PORT within 10 s" \
            "(log: $REDIS_TEST_DIR/redis.log)"
    _step redis "$t0" "${what}$(redis-server --version | awk '{sub("v=", "", $3); print $3}') on $STREAMSVC_TEST_REDIS_URL"
}

# A URL without its password, for messages.
_redact_url() { sed -E 's#(://[^:/@]*:)[^@]*@#\1***@#' <<<"$1"; }

# ---------------------------------------------------------------- second engine

# A second Docker engine on this machine, so the tests have two real Docker hosts.
# Its own data root, exec root (so its own managed containerd), pidfile, socket,
# cgroup parent, address pools and bridge interface; no iptables, forwarding or
# masquerading. Never `--bridge none`: a dockerd started with it deletes docker0,
# which belongs to the first engine. It never touches the first one; scripts/test stops
# it at the end when it started it (stop_started).
ENGINE2_NAME=streamsvc-docker2
STREAMSVC_TEST_DOCKER_HOST_2=${STREAMSVC_TEST_DOCKER_HOST_2:-unix:///run/$ENGINE2_NAME.sock}
ENGINE2_BRIDGE=ssvc2br0
ENGINE2_BRIDGE_ADDR=10.232.0.1/24
ENGINE2_POOLS=base=10.233.0.0/16,size=24
ENGINE2_LOG=/tmp/$ENGINE2_NAME.log

_engine2() { DOCKER_HOST=$STREAMSVC_TEST_DOCKER_HOST_2 docker "$@"; }
_engine2_answers() { timeout 10 env DOCKER_HOST="$STREAMSVC_TEST_DOCKER_HOST_2" docker info >/dev/null 2>&1; }

_start_engine2() {
    local i pid
    [[ $STREAMSVC_TEST_DOCKER_HOST_2 == "unix:///run/$ENGINE2_NAME.sock" ]] ||
        _die "STREAMSVC_TEST_DOCKER_HOST_2=$STREAMSVC_TEST_DOCKER_HOST_2 does not answer:" \
            "start that engine or unset the variable (a private one is started then)"
    ((EUID == 0)) || _die "the second Docker engine needs root to start (or set" \
        "STREAMSVC_SKIP_ENGINE2=1 outside CI)"
    command -v dockerd >/dev/null || _die "dockerd not found (ensure_docker installs it)"
    if [[ -s /run/$ENGINE2_NAME.pid ]]; then
        pid=$(<"/run/$ENGINE2_NAME.pid")
        if kill -0 "$pid" 2>/dev/null; then
            _die "the second engine (pid $pid) is alive but does not answer (log: $ENGINE2_LOG)"
        fi
    fi
    if ! ip link show "$ENGINE2_BRIDGE" >/dev/null 2>&1; then
        ip link add name "$ENGINE2_BRIDGE" type bridge
        ip addr add "$ENGINE2_BRIDGE_ADDR" dev "$ENGINE2_BRIDGE"
    fi
    mkdir -p "/var/lib/$ENGINE2_NAME" "/etc/$ENGINE2_NAME"
    [[ -e /etc/$ENGINE2_NAME/daemon.json ]] || echo '{}' >"/etc/$ENGINE2_NAME/daemon.json"
    _log "starting a second dockerd on $STREAMSVC_TEST_DOCKER_HOST_2 (log: $ENGINE2_LOG)"
    (setsid nohup dockerd \
        --config-file "/etc/$ENGINE2_NAME/daemon.json" \
        --data-root "/var/lib/$ENGINE2_NAME" \
        --exec-root "/run/$ENGINE2_NAME" \
        --pidfile "/run/$ENGINE2_NAME.pid" \
        -H "$STREAMSVC_TEST_DOCKER_HOST_2" \
        --bridge "$ENGINE2_BRIDGE" \
        --default-address-pool "$ENGINE2_POOLS" \
        --iptables=false --ip-forward=false --ip-masq=false --userland-proxy=false \
        --cgroup-parent "/$ENGINE2_NAME" \
        >>"$ENGINE2_LOG" 2>&1 </dev/null {_STREAMSVC_LOCK_FD}>&- &)
    for ((i = 0; i < 60; i++)); do
        if _engine2_answers; then return 0; fi
        sleep 1
    done
    tail -n 15 "$ENGINE2_LOG" >&2 || true
    _die "the second Docker engine did not answer within 60 s (log: $ENGINE2_LOG)"
}

ensure_second_engine() {
    local t0 what="" want have
    t0=$(_now_ms)
    export STREAMSVC_TEST_DOCKER_HOST_2
    if [[ -n ${STREAMSVC_SKIP_ENGINE2:-} ]]; then
        echo "engine2: skipped (STREAMSVC_SKIP_ENGINE2 is set)"
        return 0
    fi
    if ! _engine2_answers; then
        _lock /tmp/streamsvc-dockerd2.lock
        if ! _engine2_answers; then
            _start_engine2
            what="started, "
            _STREAMSVC_STARTED_ENGINE2=1
        fi
        _unlock
    fi
    want=$(docker image inspect -f '{{.Id}}' "$SANDBOX_IMAGE" 2>/dev/null) ||
        _die "the first engine has no $SANDBOX_IMAGE to copy (ensure_image builds it)"
    have=$(_engine2 image inspect -f '{{.Id}}' "$SANDBOX_IMAGE" 2>/dev/null || true)
    if [[ $have != "$want" ]]; then
        _lock /tmp/streamsvc-dockerd2.lock
        have=$(_engine2 image inspect -f '{{.Id}}' "$SANDBOX_IMAGE" 2>/dev/null || true)
        if [[ $have != "$want" ]]; then
            _log "docker save $SANDBOX_IMAGE | docker load (into the second engine)"
            docker save "$SANDBOX_IMAGE" | _engine2 load -q >/dev/null ||
                _die "copying $SANDBOX_IMAGE into the second engine failed"
            if [[ -n $have ]]; then _engine2 rmi "$have" >/dev/null 2>&1 || true; fi
            what+="loaded $SANDBOX_IMAGE, "
        fi
        _unlock
    fi
    what=${what%, }
    _step engine2 "$t0" "$(_engine2 version -f '{{.Server.Version}}') on\
 $STREAMSVC_TEST_DOCKER_HOST_2 with $SANDBOX_IMAGE${what:+ ($what)}"
}

# ---------------------------------------------------------------- stopping

# What this shell's ensure_redis / ensure_second_engine started (a Redis or engine that
# already ran is left alone: other checkouts' runs may be using it).
_STREAMSVC_STARTED_REDIS=${_STREAMSVC_STARTED_REDIS:-}
_STREAMSVC_STARTED_ENGINE2=${_STREAMSVC_STARTED_ENGINE2:-}

# _stop_pid PIDFILE NAME SECONDS: SIGTERM the process named in PIDFILE if its command
# line mentions NAME (a pid file may outlive its process), and wait for it to go.
_stop_pid() {
    local pid i
    [[ -s $1 ]] || return 0
    pid=$(<"$1")
    [[ $pid =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null || return 0
    grep -qF -- "$2" "/proc/$pid/cmdline" 2>/dev/null || {
        _log "pid $pid of $1 is not $2: left alone"
        return 0
    }
    kill -TERM "$pid" 2>/dev/null || return 0
    for ((i = 0; i < $3 * 5; i++)); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.2
    done
    _log "$2 (pid $pid) still runs $3 s after SIGTERM"
}

stop_redis() {
    [[ -n $_STREAMSVC_STARTED_REDIS ]] || return 0
    _STREAMSVC_STARTED_REDIS=
    _stop_pid "$REDIS_TEST_DIR/redis.pid" redis-server 10
    echo "redis: stopped (started by this run)"
}

stop_second_engine() {
    [[ -n $_STREAMSVC_STARTED_ENGINE2 ]] || return 0
    _STREAMSVC_STARTED_ENGINE2=
    _stop_pid "/run/$ENGINE2_NAME.pid" "/run/$ENGINE2_NAME.pid" 30
    echo "engine2: stopped (started by this run)"
}

# For an EXIT trap: never fails, so the script's own exit code stays.
stop_started() {
    stop_second_engine || true
    stop_redis || true
}

# ---------------------------------------------------------------- all

# Bridge sandboxes reach the internet, never this host nor private networks (cloud
# metadata, databases, whatever listens on 0.0.0.0 here) nor the host's own LAN. The
# service's network ($STREAMSVC_SANDBOX_NETWORK, default streamsvc-sandbox) is made
# here if missing, IPv4 only (the rules are IPv4), then DOCKER-USER drops its traffic
# to private ranges and to the subnets of this host's interfaces (DNS to the host's
# resolvers excepted) and INPUT drops the connections it opens to the host itself.
# The service checks these rules and refuses bridge runs without them. Needs root and
# iptables; without them a warning points to the README ("Bridge networking").
# Exports STREAMSVC_SANDBOX_FIREWALL=on|off for the test that checks it.
ensure_sandbox_firewall() {
    local t0 subnet range ns proto network=${STREAMSVC_SANDBOX_NETWORK:-streamsvc-sandbox}
    t0=$(_now_ms)
    export STREAMSVC_SANDBOX_FIREWALL=off
    # A root shell without /usr/sbin on its PATH still has it there.
    _IPTABLES=$(command -v iptables || command -v /usr/sbin/iptables || command -v /sbin/iptables) ||
        _IPTABLES=""
    docker network inspect "$network" >/dev/null 2>&1 ||
        docker network create --label streamsvc.managed=true --ipv6=false \
            -o com.docker.network.bridge.enable_icc=false "$network" >/dev/null ||
        docker network inspect "$network" >/dev/null 2>&1 || # a peer made it meanwhile
        _die "cannot create the sandbox network $network"
    subnet=$(docker network inspect "$network" -f '{{(index .IPAM.Config 0).Subnet}}')
    if [[ $(docker network inspect "$network" -f '{{.EnableIPv6}}') == true ]]; then
        _step firewall "$t0" "NOT applied: $network has IPv6, which these rules do not cover;\
 recreate it IPv4-only (docker network rm $network)"
        return 0
    fi
    if ((EUID != 0)) || [[ -z $_IPTABLES ]] ||
        ! "$_IPTABLES" -w -n -L DOCKER-USER >/dev/null 2>&1; then
        _step firewall "$t0" "NOT applied (needs root, iptables and Docker's DOCKER-USER chain):\
 the service refuses bridge sandboxes ($subnet); see README, Bridge networking"
        return 0
    fi
    for range in 10.0.0.0/8 172.16.0.0/12 192.168.0.0/16 169.254.0.0/16 100.64.0.0/10; do
        _iptables_once DOCKER-USER -s "$subnet" -d "$range" -j DROP
    done
    # The host's own LANs (a public or unusual subnet is not in the ranges above).
    while read -r range; do
        [[ $range == "$subnet" || $range == 127.* ]] && continue
        _iptables_once DOCKER-USER -s "$subnet" -d "$range" -j DROP
    done < <(ip -o -4 route list proto kernel scope link 2>/dev/null | awk '{print $1}')
    while read -r ns; do
        for proto in udp tcp; do # inserted after the drops, so matched before them
            _iptables_once DOCKER-USER -s "$subnet" -d "$ns" -p "$proto" --dport 53 -j ACCEPT
        done
    done < <(awk '$1 == "nameserver" && $2 !~ /:/ {print $2}' /etc/resolv.conf)
    # New connections only: the host may still dial a sandbox (its replies are ESTABLISHED).
    _iptables_once INPUT -s "$subnet" -m conntrack ! --ctstate ESTABLISHED,RELATED -j DROP
    export STREAMSVC_SANDBOX_FIREWALL=on
    _step firewall "$t0" "bridge sandboxes ($subnet) reach neither this host, its LAN nor private networks"
}

# _iptables_once CHAIN RULE...: insert the rule at the top of CHAIN unless it is there.
_iptables_once() {
    local chain=$1
    shift
    "$_IPTABLES" -w -C "$chain" "$@" 2>/dev/null || "$_IPTABLES" -w -I "$chain" "$@" ||
        _die "iptables refused: -I $chain $*"
}

ensure_all() {
    ensure_venv
    if [[ -n ${STREAMSVC_SKIP_DOCKER:-} ]]; then
        echo "docker: skipped (STREAMSVC_SKIP_DOCKER is set)"
        return 0
    fi
    ensure_docker
    # shellcheck disable=SC2119 # no --force here
    ensure_image
    ensure_sandbox_firewall
}
