# Helpers shared by deploy/backup-host/*.sh and deploy/client/install.sh.
# Sourced (bash), never run.
#
# Invariants:
# * every file is written whole into a temporary file beside its target, given
#   its mode and owner, then renamed over the target: a reader never sees half
#   a file, and a secret never exists with a wider mode than its final one;
# * a secret (password) is made and hashed inside this shell (printf is a
#   builtin): it never appears in any process's argv, in the output, or in a
#   log; it is only ever written to 0600 root files;
# * --prefix DIR is prepended to every path written AND written into the
#   generated files, so a scratch install is complete and usable in place
#   (the tests run Redis, sshd and the worker from it).

set -euo pipefail
umask 077
# Root's tools (sshd, useradd) wherever this was started from (sudo, cron, su).
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
# bash 5.2 expands '&' in ${var//pattern/replacement}; render() needs it literal.
shopt -u patsub_replacement 2>/dev/null || true

DEPLOY_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(cd "$DEPLOY_DIR/.." && pwd)

# shellcheck disable=SC2034 # used by the scripts that source this file
NAME_RE='^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$'
# shellcheck disable=SC2034
USER_RE='^[a-z_][a-z0-9_-]{0,31}$'
# shellcheck disable=SC2034
HOST_RE='^([A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(:[0-9]{1,5})?$'

die() { echo "bakgrab: error: $*" >&2; exit 1; }
note() { echo "bakgrab: $*" >&2; }

# --prefix DIR installs into a scratch root (tests): normalise it, and never
# start services there.
resolve_prefix() {
    if [ -n "$PREFIX" ]; then
        PREFIX=$(realpath -m "$PREFIX")
        [ "$PREFIX" = / ] && PREFIX=""
    fi
    if [ -n "$PREFIX" ]; then START=no; fi
}

need_root() {
    [ "$(id -u)" -eq 0 ] || die "run this as root (it creates users and root-owned files)"
}

# check_commands PACKAGE-HINT CMD...: die naming what to apt-get install.
check_commands() {
    local hint=$1 missing=() cmd
    shift
    for cmd in "$@"; do
        command -v "$cmd" >/dev/null 2>&1 || [ -x "/usr/sbin/$cmd" ] || missing+=("$cmd")
    done
    if [ "${#missing[@]}" -gt 0 ]; then
        die "missing ${missing[*]}; install them first: apt-get install --no-install-recommends $hint"
    fi
}

# put_file PATH MODE OWNER:GROUP  (content on stdin)
put_file() {
    local path=$1 mode=$2 owner=$3 dir tmp
    dir=$(dirname "$path")
    (umask 022 && mkdir -p "$dir")
    tmp=$(mktemp "$dir/.bakgrab-new.XXXXXX")
    if ! cat >"$tmp" || ! chmod "$mode" "$tmp" || ! chown "$owner" "$tmp"; then
        rm -f "$tmp"
        die "cannot write $path"
    fi
    mv -f "$tmp" "$path"
}

# put_file_once PATH MODE OWNER:GROUP: like put_file, but keep an existing
# file's content (an operator may have edited it); only mode and owner are set.
put_file_once() {
    if [ -e "$1" ]; then
        cat >/dev/null
        chmod "$2" "$1"
        chown "$3" "$1"
    else
        put_file "$@"
    fi
}

# ensure_dir PATH MODE OWNER:GROUP (the directory itself only, never recursive)
ensure_dir() {
    (umask 022 && mkdir -p "$1")
    chmod "$2" "$1"
    chown "$3" "$1"
}

# render TEMPLATE NAME=VALUE...: the template with every @NAME@ replaced.
render() {
    local template=$1 text kv
    shift
    text=$(<"$template")
    for kv in "$@"; do
        text=${text//"@${kv%%=*}@"/"${kv#*=}"}
    done
    if [[ $text =~ @[A-Z_]+@ ]]; then
        die "template $template: no value for ${BASH_REMATCH[0]}"
    fi
    printf '%s\n' "$text"
}

# new_password: 32 random letters and digits (safe in URLs and env files).
new_password() {
    local pw=""
    while [ "${#pw}" -lt 32 ]; do
        pw+=$(head -c 48 /dev/urandom | base64 -w0 | tr -dc 'A-Za-z0-9')
    done
    printf '%s' "${pw:0:32}"
}

# sha256_hex: the SHA-256 of stdin, in hex (what Redis ACL '#<hash>' expects).
sha256_hex() {
    sha256sum | cut -d' ' -f1
}

# read_secret FILE: the file's first line (no trailing newline).
read_secret() {
    local line
    IFS= read -r line <"$1" || [ -n "$line" ]
    printf '%s' "$line"
}

# ensure_secret FILE: make FILE (0600 root) with a new password unless it exists.
ensure_secret() {
    if [ ! -s "$1" ]; then
        new_password | put_file "$1" 0600 root:root
    fi
    chmod 0600 "$1"
    chown root:root "$1"
}

# ensure_user NAME HOME SHELL COMMENT: a system user with its own group.
# The home directory is made by the caller (its owner and mode differ per user).
ensure_user() {
    local name=$1 home=$2 shell=$3 comment=$4
    if getent passwd "$name" >/dev/null; then
        usermod --home "$home" --shell "$shell" --comment "$comment" "$name"
    else
        useradd --system --user-group --no-create-home --home-dir "$home" \
            --shell "$shell" --comment "$comment" "$name"
    fi
}

# unlock_user NAME: sshd (with UsePAM no) refuses a locked account ('!' in
# shadow); '*' matches no password yet is not "locked".
unlock_user() {
    local field
    field=$(getent shadow "$1" | cut -d: -f2)
    case "$field" in
        '*') ;;
        ''|'!'*) usermod -p '*' "$1" ;;
        *) ;;  # a real password hash: someone set it on purpose, keep it
    esac
}

# Settings kept between runs: KEY=VALUE lines, read back without evaluating
# them (only keys the script names are taken).
# load_conf FILE KEY...: set each KEY found in FILE (unless already set).
load_conf() {
    local file=$1 key line k v
    shift
    [ -f "$file" ] || return 0
    while IFS= read -r line || [ -n "$line" ]; do
        [[ $line =~ ^([A-Z_]+)=(.*)$ ]] || continue
        k=${BASH_REMATCH[1]}
        v=${BASH_REMATCH[2]}
        for key in "$@"; do
            if [ "$k" = "$key" ] && [ -z "${!key:-}" ]; then
                printf -v "$key" '%s' "$v"
            fi
        done
    done <"$file"
}

# save_conf FILE KEY...: write each KEY=value (0644, no secrets in there).
save_conf() {
    local file=$1 key
    shift
    {
        echo "# Written by bakgrab's deploy scripts: the options of the last run,"
        echo "# reused as defaults by the next one. No secrets here."
        for key in "$@"; do
            printf '%s=%s\n' "$key" "${!key}"
        done
    } | put_file "$file" 0644 root:root
}

# install_software PREFIX BAKGRAB: echo the bakgrab executable to use: BAKGRAB
# if given, else a virtualenv in PREFIX/opt/bakgrab with this checkout installed.
install_software() {
    local prefix=$1 given=$2 venv
    if [ -n "$given" ]; then
        [ -x "$given" ] || die "--bakgrab $given: not an executable"
        printf '%s' "$given"
        return
    fi
    venv=$prefix/opt/bakgrab
    check_commands "python3 python3-venv" python3
    if [ ! -x "$venv/bin/python" ]; then
        note "creating the virtualenv $venv"
        # Debian's /usr/bin/python3: the worker and client users must be able to
        # run it (a python under root's home would not be reachable for them).
        umask 022
        /usr/bin/python3 -m venv "$venv" >&2
        umask 077
    fi
    note "installing bakgrab from $REPO_DIR into $venv"
    (umask 022 && "$venv/bin/pip" install -q --disable-pip-version-check --upgrade "$REPO_DIR" >&2) \
        || die "pip could not install bakgrab into $venv"
    printf '%s' "$venv/bin/bakgrab"
}

# systemd_running: true when systemd is PID 1 (services can be started).
systemd_running() {
    [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1
}
