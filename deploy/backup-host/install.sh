#!/usr/bin/env bash
# Set up a bakgrab backup host (idempotent: run it again to upgrade or to
# change an option; passwords and an edited config file are kept).
# See deploy/README.md. Run as root from a checkout of bakgrab.
set -euo pipefail
# shellcheck source=deploy/lib.sh
. "$(dirname "$0")/../lib.sh"
# shellcheck source=deploy/backup-host/acl.sh
. "$DEPLOY_DIR/backup-host/acl.sh"
HERE=$DEPLOY_DIR/backup-host

usage() {
    cat <<'EOF'
Usage: deploy/backup-host/install.sh [OPTIONS]

Set up this machine as a bakgrab backup host:
  * the worker user (default bakgrab) and the storage (0700, that user's;
    remounted nodev,nosuid when it is a mount of its own, else a warning;
    on btrfs remounted user_subvol_rm_allowed, so the worker deletes snapshots);
  * /etc/bakgrab/bakgrab.toml (every setting, documented) and the 0600 root
    files with secrets: worker.env, flower.env, private/;
  * Redis: loopback only, users from an ACL file (default user off; one user
    each for the worker, Flower, the operator, and every client);
  * the SSH tunnel user (default bakgrab-tunnel): may only forward to Redis;
  * systemd units bakgrab-worker.service (with the capabilities rsync needs),
    bakgrab-flower.service and bakgrab-scheduler.service (stale checks);
  * bakgrab itself, in a virtualenv in /opt/bakgrab (unless --bakgrab).
Then it starts or restarts the services when systemd runs (not with --prefix).
Options given once are remembered (/etc/bakgrab/deploy-backup-host.conf).

Options:
  --storage DIR        snapshot storage (default: /srv/bakgrab)
  --user NAME          the worker's user (default: bakgrab)
  --tunnel-user NAME   the SSH tunnel user (default: bakgrab-tunnel)
  --redis-port PORT    Redis's port on loopback (default: 6379)
  --queue NAME         the queue workers serve (default: bakgrab)
  --flower-port PORT   Flower's port on loopback (default: 5555)
  --stop-timeout SECS  systemd's TimeoutStopSec for the worker; keep it above
                       the worker's shutdown_grace (default: 90)
  --allow-reverse      let clients behind NAT use `bakgrab backup --reverse`:
                       the tunnel user may then also listen on this host's
                       loopback (ssh -R); see deploy/README.md before using it
  --no-reverse         undo --allow-reverse (the default)
  --bakgrab PATH       use this bakgrab executable; do not install a virtualenv
  --prefix DIR         install everything under DIR instead of / (paths in the
                       generated files include DIR; nothing is started)
  --no-start           do not start, restart or reload any service
  -h, --help           show this help
Next: on each client run deploy/client/install.sh, then here
deploy/backup-host/add-client.sh NAME with the key it prints.
EOF
}

PREFIX="" STORAGE="" WORKER_USER="" TUNNEL_USER="" REDIS_PORT="" QUEUE=""
FLOWER_PORT="" STOP_TIMEOUT="" BAKGRAB="" ALLOW_REVERSE="" START=yes
while [ $# -gt 0 ]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --prefix) PREFIX=${2:?--prefix needs a directory}; shift ;;
        --storage) STORAGE=${2:?--storage needs a directory}; shift ;;
        --user) WORKER_USER=${2:?--user needs a name}; shift ;;
        --tunnel-user) TUNNEL_USER=${2:?--tunnel-user needs a name}; shift ;;
        --redis-port) REDIS_PORT=${2:?--redis-port needs a number}; shift ;;
        --queue) QUEUE=${2:?--queue needs a name}; shift ;;
        --flower-port) FLOWER_PORT=${2:?--flower-port needs a number}; shift ;;
        --stop-timeout) STOP_TIMEOUT=${2:?--stop-timeout needs seconds}; shift ;;
        --bakgrab) BAKGRAB=${2:?--bakgrab needs a path}; shift ;;
        --allow-reverse) ALLOW_REVERSE=yes ;;
        --no-reverse) ALLOW_REVERSE=no ;;
        --no-start) START=no ;;
        *) usage >&2; die "unknown option $1" ;;
    esac
    shift
done

need_root
resolve_prefix
ETC=$PREFIX/etc/bakgrab
DEPLOY_CONF=$ETC/deploy-backup-host.conf
CONF_KEYS=(STORAGE WORKER_USER TUNNEL_USER REDIS_PORT QUEUE FLOWER_PORT STOP_TIMEOUT BAKGRAB
           ALLOW_REVERSE)
load_conf "$DEPLOY_CONF" "${CONF_KEYS[@]}"
STORAGE=${STORAGE:-$PREFIX/srv/bakgrab}
WORKER_USER=${WORKER_USER:-bakgrab}
TUNNEL_USER=${TUNNEL_USER:-bakgrab-tunnel}
REDIS_PORT=${REDIS_PORT:-6379}
QUEUE=${QUEUE:-bakgrab}
FLOWER_PORT=${FLOWER_PORT:-5555}
STOP_TIMEOUT=${STOP_TIMEOUT:-90}
ALLOW_REVERSE=${ALLOW_REVERSE:-no}

[[ $STORAGE = /* ]] || die "--storage $STORAGE: give an absolute path"
[[ $STORAGE =~ ^[A-Za-z0-9_./+-]+$ ]] || die "--storage $STORAGE: letters, digits and _./+- only"
for v in WORKER_USER TUNNEL_USER; do
    [[ ${!v} =~ $USER_RE ]] || die "${v,,} ${!v}: not a valid user name"
done
[ "$WORKER_USER" != "$TUNNEL_USER" ] || die "the worker and tunnel users must differ"
for v in REDIS_PORT FLOWER_PORT; do
    if ! [[ ${!v} =~ ^[0-9]{1,5}$ ]] || [ "${!v}" -lt 1 ] || [ "${!v}" -gt 65535 ]; then
        die "${v,,} ${!v}: not a port number"
    fi
done
[[ $QUEUE =~ ^[A-Za-z0-9_.:-]{1,200}$ ]] || die "--queue $QUEUE: letters, digits and _.:- only"
[[ $STOP_TIMEOUT =~ ^[0-9]+$ ]] || die "--stop-timeout $STOP_TIMEOUT: seconds"

check_commands "redis-server redis-tools openssh-server rsync" redis-server redis-cli sshd rsync

# -- software -------------------------------------------------------------------
BAKGRAB=$(install_software "$PREFIX" "$BAKGRAB")

# -- users and directories ------------------------------------------------------
WORKER_HOME=$PREFIX/var/lib/$WORKER_USER
TUNNEL_HOME=$PREFIX/var/lib/$TUNNEL_USER
ensure_user "$WORKER_USER" "$WORKER_HOME" /usr/sbin/nologin "bakgrab worker"
# The tunnel user logs in over SSH: not locked, but no password and no shell.
ensure_user "$TUNNEL_USER" "$TUNNEL_HOME" /usr/sbin/nologin "bakgrab SSH tunnel to Redis"
unlock_user "$TUNNEL_USER"
ensure_dir "$WORKER_HOME" 0750 "$WORKER_USER:$WORKER_USER"
# Root owns the tunnel user's home and keys: it cannot change what it may do.
ensure_dir "$TUNNEL_HOME" 0755 root:root
ensure_dir "$TUNNEL_HOME/.ssh" 0755 root:root
AUTHORIZED_KEYS=$TUNNEL_HOME/.ssh/authorized_keys
[ -e "$AUTHORIZED_KEYS" ] || : | put_file "$AUTHORIZED_KEYS" 0644 root:root
chmod 0644 "$AUTHORIZED_KEYS"
chown root:root "$AUTHORIZED_KEYS"

ensure_dir "$ETC" 0755 root:root
ensure_dir "$ETC/private" 0700 root:root
ensure_dir "$ETC/clients" 0700 root:root
# The storage: only the worker's user (and root) may enter it. Snapshots hold
# what clients sent, as sent: device nodes, setuid files (issue 11). 0700 keeps
# other local users out; nodev,nosuid makes them inert even for root's tools.
ensure_dir "$STORAGE" 0700 "$WORKER_USER:$WORKER_USER"
storage_mount_options() {  # the per-mount options of the mount holding $STORAGE
    findmnt -n -o OPTIONS -T "$STORAGE" 2>/dev/null || true
}
if [ -z "$PREFIX" ] && command -v findmnt >/dev/null; then
    opts=",$(storage_mount_options),"
    if [[ $opts != *,nodev,* || $opts != *,nosuid,* ]]; then
        if mountpoint -q "$STORAGE"; then
            mount -o remount,nodev,nosuid "$STORAGE"
            note "remounted $STORAGE nodev,nosuid; add nodev,nosuid to its /etc/fstab options"
        else
            note "warning: $STORAGE is on a mount without nodev,nosuid: a device node or setuid"
            note "  file a client sends works as such there. Give STORAGE its own filesystem"
            note "  mounted nodev,nosuid, or bind-mount it onto itself, in /etc/fstab:"
            note "  $STORAGE $STORAGE none bind,nodev,nosuid 0 0   (see deploy/README.md)"
        fi
    fi
fi
# On btrfs each snapshot is a read-only subvolume (issue 14): the worker, without
# CAP_SYS_ADMIN, may delete one only where btrfs is mounted user_subvol_rm_allowed.
if [ -z "$PREFIX" ] && command -v findmnt >/dev/null \
        && [ "$(findmnt -n -o FSTYPE -T "$STORAGE" 2>/dev/null)" = btrfs ]; then
    if [[ ",$(findmnt -n -o FS-OPTIONS -T "$STORAGE")," != *,user_subvol_rm_allowed,* ]]; then
        target=$(findmnt -n -o TARGET -T "$STORAGE")
        mount -o remount,user_subvol_rm_allowed "$target"
        note "remounted $target user_subvol_rm_allowed (btrfs: the worker deletes old"
        note "  snapshots itself); add user_subvol_rm_allowed to its /etc/fstab options"
    fi
fi

# -- secrets and settings -------------------------------------------------------
for s in redis-admin redis-worker redis-flower flower-web; do
    ensure_secret "$ETC/private/$s.password"
done
broker_url() {  # broker_url USER PASSWORD-FILE
    printf 'redis://%s:%s@127.0.0.1:%s/0' "$1" "$(read_secret "$2")" "$REDIS_PORT"
}
printf 'BAKGRAB_BROKER=%s\n' "$(broker_url "$ACL_WORKER" "$ETC/private/redis-worker.password")" \
    | put_file "$ETC/worker.env" 0600 root:root
{
    printf 'BAKGRAB_BROKER=%s\n' "$(broker_url "$ACL_FLOWER" "$ETC/private/redis-flower.password")"
    printf 'BAKGRAB_FLOWER_BASIC_AUTH=admin:%s\n' "$(read_secret "$ETC/private/flower-web.password")"
} | put_file "$ETC/flower.env" 0600 root:root

CONFIG=$ETC/bakgrab.toml
if [ ! -e "$CONFIG" ]; then
    sed -e "s|^#storage = .*|storage = \"$STORAGE\"|" -e "s|^#queue = .*|queue = \"$QUEUE\"|" \
        "$DEPLOY_DIR/bakgrab.toml.example" | put_file "$CONFIG" 0644 root:root
else
    # Keep the operator's edits; only storage and queue follow the options.
    sed -e "s|^#\?storage = .*|storage = \"$STORAGE\"|" -e "s|^#\?queue = .*|queue = \"$QUEUE\"|" \
        "$CONFIG" | put_file "$CONFIG" 0644 root:root
fi

# -- Redis ----------------------------------------------------------------------
REDIS_DIR=$PREFIX/etc/redis
REDIS_SNIPPET=$REDIS_DIR/bakgrab.conf
ACL_FILE=$REDIS_DIR/bakgrab-users.acl
write_acl "$ETC" "$QUEUE" "$ACL_FILE"
old_snippet=$(cat "$REDIS_SNIPPET" 2>/dev/null || true)
render "$HERE/redis-bakgrab.conf.in" REDIS_PORT="$REDIS_PORT" ACL_FILE="$ACL_FILE" \
    REDIS_SNIPPET="$REDIS_SNIPPET" | put_file "$REDIS_SNIPPET" 0644 root:root
redis_restart=no
[ "$old_snippet" = "$(cat "$REDIS_SNIPPET")" ] || redis_restart=yes
if [ -f "$REDIS_DIR/redis.conf" ]; then
    if ! grep -qxF "include $REDIS_SNIPPET" "$REDIS_DIR/redis.conf"; then
        printf '\n# bakgrab (deploy/backup-host/install.sh): loopback, ACL users\ninclude %s\n' \
            "$REDIS_SNIPPET" >>"$REDIS_DIR/redis.conf"
        redis_restart=yes
    fi
else
    note "no $REDIS_DIR/redis.conf: start redis-server with $REDIS_SNIPPET included"
fi

# -- sshd -----------------------------------------------------------------------
SSHD_SNIPPET=$PREFIX/etc/ssh/sshd_config.d/bakgrab.conf
TUNNEL_OPTIONS=$(tunnel_options "$REDIS_PORT" "$ALLOW_REVERSE")
if [ "$ALLOW_REVERSE" = yes ]; then
    forwarding=(TCP_FORWARDING=yes PERMIT_LISTEN="127.0.0.1:*")
else
    forwarding=(TCP_FORWARDING=local PERMIT_LISTEN=none)
fi
render "$HERE/sshd-bakgrab.conf.in" TUNNEL_USER="$TUNNEL_USER" REDIS_PORT="$REDIS_PORT" \
    AUTHORIZED_KEYS="$AUTHORIZED_KEYS" TUNNEL_OPTIONS="$TUNNEL_OPTIONS" "${forwarding[@]}" \
    | put_file "$SSHD_SNIPPET" 0644 root:root
if [ -f "$PREFIX/etc/ssh/sshd_config" ] \
        && ! grep -qiE '^[[:space:]]*Include[[:space:]]+/etc/ssh/sshd_config\.d/' "$PREFIX/etc/ssh/sshd_config"; then
    note "warning: $PREFIX/etc/ssh/sshd_config does not include sshd_config.d/*.conf;" \
         "add 'Include /etc/ssh/sshd_config.d/*.conf' at its top"
fi
# The clients' lines (tagged bakgrab:NAME) get today's options (Redis port, reverse).
if [ -s "$AUTHORIZED_KEYS" ]; then
    awk -v opts="$TUNNEL_OPTIONS" '$NF ~ /^bakgrab:/ && NF == 4 {$1 = opts} {print}' \
        "$AUTHORIZED_KEYS" | put_file "$AUTHORIZED_KEYS" 0644 root:root
fi

# -- systemd units --------------------------------------------------------------
UNITS=$PREFIX/etc/systemd/system
render "$HERE/bakgrab-worker.service.in" USER="$WORKER_USER" STORAGE="$STORAGE" CONFIG="$CONFIG" \
    WORKER_ENV="$ETC/worker.env" BAKGRAB="$BAKGRAB" STOP_TIMEOUT="$STOP_TIMEOUT" \
    | put_file "$UNITS/bakgrab-worker.service" 0644 root:root
render "$HERE/bakgrab-flower.service.in" CONFIG="$CONFIG" FLOWER_ENV="$ETC/flower.env" \
    BAKGRAB="$BAKGRAB" FLOWER_ADDRESS=127.0.0.1 FLOWER_PORT="$FLOWER_PORT" \
    | put_file "$UNITS/bakgrab-flower.service" 0644 root:root
render "$HERE/bakgrab-scheduler.service.in" USER="$WORKER_USER" STORAGE="$STORAGE" CONFIG="$CONFIG" \
    WORKER_ENV="$ETC/worker.env" BAKGRAB="$BAKGRAB" \
    | put_file "$UNITS/bakgrab-scheduler.service" 0644 root:root

save_conf "$DEPLOY_CONF" "${CONF_KEYS[@]}"

# -- services -------------------------------------------------------------------
if [ "$START" = yes ] && systemd_running; then
    if [ "$redis_restart" = yes ]; then
        systemctl restart redis-server
    else
        reload_acl "$ETC" "$REDIS_PORT" || systemctl restart redis-server
    fi
    if sshd -t; then
        systemctl reload-or-restart ssh
    else
        die "sshd -t rejects the configuration; fix it, then run this again"
    fi
    systemctl daemon-reload
    systemctl enable --quiet bakgrab-worker.service bakgrab-flower.service \
        bakgrab-scheduler.service
    systemctl restart bakgrab-worker.service bakgrab-flower.service bakgrab-scheduler.service
    note "started bakgrab-worker, bakgrab-flower and bakgrab-scheduler (journalctl -u bakgrab-worker)"
elif [ -z "$PREFIX" ]; then
    note "services not started; when ready:"
    note "  systemctl restart redis-server && systemctl reload-or-restart ssh && systemctl daemon-reload"
    note "  systemctl enable --now bakgrab-worker bakgrab-flower bakgrab-scheduler"
fi

HOST_KEY=$PREFIX/etc/ssh/ssh_host_ed25519_key.pub
echo "bakgrab backup host ready: storage $STORAGE, Redis on 127.0.0.1:$REDIS_PORT, tunnel user $TUNNEL_USER."
if [ -r "$HOST_KEY" ]; then
    echo "This host's SSH key, for each client's install.sh --backup-host-key:"
    echo "  $(cut -d' ' -f1,2 "$HOST_KEY")"
fi
echo "Flower's login: admin and the password in $ETC/private/flower-web.password"
echo "Add a client: deploy/backup-host/add-client.sh${PREFIX:+ --prefix $PREFIX} NAME < its-tunnel-key.pub"
