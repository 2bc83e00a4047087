#!/usr/bin/env bash
# Set up a host to be backed up by a bakgrab backup host (idempotent: run it
# again to upgrade, to add the broker credentials or to change an option).
# See deploy/README.md. Run as root from a checkout of bakgrab.
set -euo pipefail
# shellcheck source=deploy/lib.sh
. "$(dirname "$0")/../lib.sh"
HERE=$DEPLOY_DIR/client

usage() {
    cat <<'EOF'
Usage: deploy/client/install.sh --backup-host HOST[:PORT] [OPTIONS]

Set up this machine to be backed up by the bakgrab backup host HOST:
  * the client user (default bakgrab-client; shell /bin/sh, no password,
    not locked: sshd runs the one-shot sshd's command through its shell);
    the backup runs as this user with CAP_DAC_READ_SEARCH only;
  * its state directory (the one-shot sshd's host key, which is also its
    bakgrab key: it signs every request) and its SSH key for the tunnel to
    the backup host; both public lines are printed for
    deploy/backup-host/add-client.sh (--key and the tunnel key);
  * /etc/bakgrab/exclude, the default exclude list (kept if you edited it);
  * bakgrab-backup.service and bakgrab-backup.timer (daily, spread over an
    hour, catching up missed days), or a cron entry with --cron;
  * bakgrab itself, in a virtualenv in /opt/bakgrab (unless --bakgrab).
The timer is enabled once /etc/bakgrab/client.env (the credentials from the
backup host) is in place and systemd runs (not with --prefix).
Options given once are remembered (/etc/bakgrab/deploy-client.conf).

Options:
  --backup-host HOST[:PORT]  the backup host, as this host reaches its sshd
  --backup-host-key KEY      its SSH host key ("ssh-ed25519 AAAA..."; printed
                             by the backup host's install.sh), for known_hosts
  --broker-env FILE          install FILE (NAME.env from add-client.sh) as
                             /etc/bakgrab/client.env, 0600 root
  --name NAME                backup name (default: %H, systemd's host name)
  --source DIR               what to back up (default: /)
  --user NAME                the client user (default: bakgrab-client)
  --tunnel-user NAME         the backup host's tunnel user (default: bakgrab-tunnel)
  --cron                     also write /etc/cron.d/bakgrab-backup (for a host
                             without systemd; then do not enable the timer)
  --no-cron                  undo --cron: remove that file
  --bakgrab PATH             use this bakgrab executable; no virtualenv
  --prefix DIR               install under DIR instead of / (paths in the
                             generated files include DIR; nothing is started)
  --no-start                 do not enable or start the timer
  -h, --help                 show this help
EOF
}

PREFIX="" BACKUP_HOST="" HOST_KEY="" BROKER_ENV="" BACKUP_NAME="" SOURCE=""
CLIENT_USER="" TUNNEL_USER="" BAKGRAB="" CRON="" START=yes
while [ $# -gt 0 ]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --prefix) PREFIX=${2:?--prefix needs a directory}; shift ;;
        --backup-host) BACKUP_HOST=${2:?--backup-host needs HOST[:PORT]}; shift ;;
        --backup-host-key) HOST_KEY=${2:?--backup-host-key needs a key}; shift ;;
        --broker-env) BROKER_ENV=${2:?--broker-env needs a file}; shift ;;
        --name) BACKUP_NAME=${2:?--name needs a name}; shift ;;
        --source) SOURCE=${2:?--source needs a directory}; shift ;;
        --user) CLIENT_USER=${2:?--user needs a name}; shift ;;
        --tunnel-user) TUNNEL_USER=${2:?--tunnel-user needs a name}; shift ;;
        --cron) CRON=yes ;;
        --no-cron) CRON=no ;;
        --bakgrab) BAKGRAB=${2:?--bakgrab needs a path}; shift ;;
        --no-start) START=no ;;
        *) usage >&2; die "unknown option $1" ;;
    esac
    shift
done

need_root
resolve_prefix
ETC=$PREFIX/etc/bakgrab
DEPLOY_CONF=$ETC/deploy-client.conf
load_conf "$DEPLOY_CONF" BACKUP_HOST BACKUP_NAME SOURCE CLIENT_USER TUNNEL_USER BAKGRAB CRON
[ -n "$BACKUP_HOST" ] || { usage >&2; die "give --backup-host HOST[:PORT]"; }
BACKUP_NAME=${BACKUP_NAME:-%H}
SOURCE=${SOURCE:-/}
CLIENT_USER=${CLIENT_USER:-bakgrab-client}
TUNNEL_USER=${TUNNEL_USER:-bakgrab-tunnel}
CRON=${CRON:-no}

[[ $BACKUP_HOST =~ $HOST_RE ]] || die "--backup-host $BACKUP_HOST: expected HOST or HOST:PORT"
[ "$BACKUP_NAME" = %H ] || [[ $BACKUP_NAME =~ $NAME_RE ]] \
    || die "--name $BACKUP_NAME: 1-64 letters, digits and _.-"
[[ $SOURCE = /* && $SOURCE =~ ^[A-Za-z0-9_./+-]+$ ]] \
    || die "--source $SOURCE: an absolute path of letters, digits and _./+-"
for v in CLIENT_USER TUNNEL_USER; do
    [[ ${!v} =~ $USER_RE ]] || die "${v,,} ${!v}: not a valid user name"
done
check_commands "openssh-server openssh-client rsync util-linux" sshd ssh ssh-keygen rsync rrsync setpriv

# host and port of the backup host's sshd, for known_hosts
if [[ $BACKUP_HOST =~ ^(.*):([0-9]+)$ ]]; then
    SSH_HOST=${BASH_REMATCH[1]} SSH_PORT=${BASH_REMATCH[2]}
else
    SSH_HOST=$BACKUP_HOST SSH_PORT=22
fi
SSH_HOST=${SSH_HOST#[}
SSH_HOST=${SSH_HOST%]}
if [ "$SSH_PORT" = 22 ]; then KNOWN_AS=$SSH_HOST; else KNOWN_AS="[$SSH_HOST]:$SSH_PORT"; fi

# -- software -------------------------------------------------------------------
BAKGRAB=$(install_software "$PREFIX" "$BAKGRAB")

# -- the user, its state and its keys ---------------------------------------------
CLIENT_HOME=$PREFIX/var/lib/$CLIENT_USER
ensure_user "$CLIENT_USER" "$CLIENT_HOME" /bin/sh "bakgrab client (backups of this host)"
unlock_user "$CLIENT_USER"
owner=$CLIENT_USER:$CLIENT_USER
ensure_dir "$CLIENT_HOME" 0700 "$owner"
ensure_dir "$CLIENT_HOME/.local" 0700 "$owner"
ensure_dir "$CLIENT_HOME/.local/state" 0700 "$owner"
ensure_dir "$CLIENT_HOME/.local/state/bakgrab" 0700 "$owner"
ensure_dir "$CLIENT_HOME/.ssh" 0700 "$owner"
TUNNEL_KEY=$CLIENT_HOME/.ssh/id_ed25519
if [ ! -s "$TUNNEL_KEY" ]; then
    rm -f "$TUNNEL_KEY" "$TUNNEL_KEY.pub"
    comment="bakgrab-client@$(hostname)"
    ssh-keygen -q -t ed25519 -N "" -C "$comment" -f "$TUNNEL_KEY" >/dev/null
fi
chown "$owner" "$TUNNEL_KEY" "$TUNNEL_KEY.pub"
chmod 0600 "$TUNNEL_KEY"
chmod 0644 "$TUNNEL_KEY.pub"

KNOWN_HOSTS=$CLIENT_HOME/.ssh/known_hosts
if [ -n "$HOST_KEY" ]; then
    read -r key_type key_data _ <<<"$HOST_KEY" || true
    [[ ${key_type:-} =~ ^(ssh-|ecdsa-) && ${key_data:-} =~ ^[A-Za-z0-9+/]+=*$ ]] \
        || die "--backup-host-key: expected 'ssh-ed25519 AAAA...'"
    {
        [ -f "$KNOWN_HOSTS" ] && awk -v host="$KNOWN_AS" '$1 != host' "$KNOWN_HOSTS"
        printf '%s %s %s\n' "$KNOWN_AS" "$key_type" "$key_data"
    } | put_file "$KNOWN_HOSTS" 0644 "$owner"
fi

# -- settings and credentials ---------------------------------------------------
ensure_dir "$ETC" 0755 root:root
put_file_once "$ETC/exclude" 0644 root:root <"$HERE/exclude"
CONFIG=$ETC/bakgrab.toml
put_file_once "$CONFIG" 0644 root:root <"$DEPLOY_DIR/bakgrab.toml.example"
CLIENT_ENV=$ETC/client.env
if [ -n "$BROKER_ENV" ]; then
    [ -r "$BROKER_ENV" ] || die "cannot read $BROKER_ENV"
    grep -qE '^BAKGRAB_BROKER=redis://[^[:space:]]+$' "$BROKER_ENV" \
        || die "$BROKER_ENV: expected the BAKGRAB_BROKER=redis://... line from add-client.sh"
    grep -E '^BAKGRAB_BROKER=' "$BROKER_ENV" | put_file "$CLIENT_ENV" 0600 root:root
fi
[ -e "$CLIENT_ENV" ] && { chmod 0600 "$CLIENT_ENV"; chown root:root "$CLIENT_ENV"; }

# -- schedule -------------------------------------------------------------------
UNITS=$PREFIX/etc/systemd/system
TUNNEL=$TUNNEL_USER@$BACKUP_HOST
common=(USER="$CLIENT_USER" HOME="$CLIENT_HOME" CLIENT_ENV="$CLIENT_ENV" CONFIG="$CONFIG"
        BAKGRAB="$BAKGRAB" SOURCE="$SOURCE" TUNNEL="$TUNNEL" EXCLUDE="$ETC/exclude")
# TimeoutStartSec: bakgrab's own job_timeout (12 h) plus an hour.
render "$HERE/bakgrab-backup.service.in" "${common[@]}" BACKUP_HOST="$BACKUP_HOST" \
    NAME="$BACKUP_NAME" START_TIMEOUT=13h | put_file "$UNITS/bakgrab-backup.service" 0644 root:root
render "$HERE/bakgrab-backup.timer.in" | put_file "$UNITS/bakgrab-backup.timer" 0644 root:root
if [ "$CRON" = yes ]; then
    # A fixed time per host (from its name), so clients do not all start at once.
    sum=$(hostname | cksum | cut -d' ' -f1)
    # %H is systemd's; in cron, the shell asks hostname when the job runs.
    # shellcheck disable=SC2016
    if [ "$BACKUP_NAME" = %H ]; then cron_name='"$(hostname)"'; else cron_name=$BACKUP_NAME; fi
    render "$HERE/bakgrab-backup.cron.in" "${common[@]}" CRON_NAME="$cron_name" \
        MINUTE=$((sum % 60)) HOUR=$((1 + sum / 60 % 5)) \
        | put_file "$PREFIX/etc/cron.d/bakgrab-backup" 0644 root:root
else
    rm -f "$PREFIX/etc/cron.d/bakgrab-backup"
fi

save_conf "$DEPLOY_CONF" BACKUP_HOST BACKUP_NAME SOURCE CLIENT_USER TUNNEL_USER BAKGRAB CRON

# -- what is left to do -----------------------------------------------------------
todo=()
if [ ! -s "$KNOWN_HOSTS" ] || ! awk -v host="$KNOWN_AS" '$1 == host {f=1} END {exit !f}' "$KNOWN_HOSTS"; then
    todo+=("give the backup host's SSH key: rerun with --backup-host-key \"\$(the key line printed by the backup host's install.sh)\"")
fi
if [ ! -s "$CLIENT_ENV" ]; then
    todo+=("on the backup host, run add-client.sh with the key above; copy the NAME.env it writes here and rerun with --broker-env FILE")
fi
if [ "$START" = yes ] && systemd_running && [ "${#todo[@]}" -eq 0 ] && [ "$CRON" != yes ]; then
    systemctl daemon-reload
    systemctl enable --now --quiet bakgrab-backup.timer
    note "enabled bakgrab-backup.timer; a backup now: systemctl start bakgrab-backup"
elif [ "${#todo[@]}" -eq 0 ] && [ -z "$PREFIX" ] && [ "$CRON" != yes ]; then
    todo+=("systemctl daemon-reload && systemctl enable --now bakgrab-backup.timer")
fi

# The client's bakgrab key (its one-shot sshd's host key, made now if need be,
# as the client user): the backup host registers it for NAME (issue 11).
CLIENT_KEY=$(setpriv --reuid="$CLIENT_USER" --regid="$CLIENT_USER" --init-groups \
    env -i PATH="$PATH" HOME="$CLIENT_HOME" XDG_STATE_HOME="$CLIENT_HOME/.local/state" \
    BAKGRAB_CONFIG="$CONFIG" "$BAKGRAB" key) || die "\`bakgrab key\` failed as $CLIENT_USER"

echo "bakgrab client set up: user $CLIENT_USER, tunnel $TUNNEL."
echo "Its tunnel key and its bakgrab key; on the backup host run:"
echo "deploy/backup-host/add-client.sh --key '$CLIENT_KEY' NAME <<'EOF'"
cut -d' ' -f1,2 "$TUNNEL_KEY.pub" | sed "s/\$/ bakgrab-client@$(hostname)/"
echo "EOF"
for item in "${todo[@]}"; do
    echo "To do: $item"
done
