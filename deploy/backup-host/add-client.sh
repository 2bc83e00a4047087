#!/usr/bin/env bash
# Let one backed-up host (a client) use this backup host: a Redis user that
# may only send its requests and read results, and its tunnel key. See
# deploy/README.md. Run as root, after deploy/backup-host/install.sh.
set -euo pipefail
# shellcheck source=deploy/lib.sh
. "$(dirname "$0")/../lib.sh"
# shellcheck source=deploy/backup-host/acl.sh
. "$DEPLOY_DIR/backup-host/acl.sh"

usage() {
    cat <<'EOF'
Usage: deploy/backup-host/add-client.sh [OPTIONS] NAME [KEY-FILE]
       deploy/backup-host/add-client.sh [OPTIONS] --remove NAME

Add client NAME (letters, digits, _.-), whose tunnel public key is the one
line in KEY-FILE, or on stdin when KEY-FILE is - or missing (the line that
deploy/client/install.sh printed on that client).

  * Redis user client-NAME with a new random password: it may push requests
    to the queue and read results, and nothing else (deploy/backup-host/acl.sh);
    the running Redis reloads its users at once;
  * the key, in the tunnel user's authorized_keys, limited to forwarding to
    Redis: restrict,port-forwarding,permitopen="127.0.0.1:PORT" (and
    permitlisten="127.0.0.1:*" if install.sh --allow-reverse);
  * /etc/bakgrab/clients/NAME.env (0600): the client's broker URL with its
    password. Copy it to the client as /etc/bakgrab/client.env (0600 root),
    e.g. with deploy/client/install.sh --broker-env FILE, then delete it here.
    The password is never printed.

Running it again for NAME replaces the key and keeps the password.

Options:
  --rotate       make a new password (write a new NAME.env to copy over)
  --remove       remove client NAME: its Redis user and its tunnel key
  --no-reload    do not ask the running Redis to reload its users
  --prefix DIR   the --prefix given to install.sh
  -h, --help     show this help
EOF
}

PREFIX="" ROTATE=no REMOVE=no RELOAD=yes
args=()
while [ $# -gt 0 ]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --prefix) PREFIX=${2:?--prefix needs a directory}; shift ;;
        --rotate) ROTATE=yes ;;
        --remove) REMOVE=yes ;;
        --no-reload) RELOAD=no ;;
        -) args+=("$1") ;;
        -*) usage >&2; die "unknown option $1" ;;
        *) args+=("$1") ;;
    esac
    shift
done
if [ "${#args[@]}" -lt 1 ] || [ "${#args[@]}" -gt 2 ]; then
    usage >&2
    exit 2
fi
NAME=${args[0]}
KEY_FILE=${args[1]:--}
[[ $NAME =~ $NAME_RE ]] || die "name $NAME: 1-64 letters, digits and _.- (not starting with . or -)"

need_root
if [ -n "$PREFIX" ]; then
    PREFIX=$(realpath -m "$PREFIX")
    [ "$PREFIX" = / ] && PREFIX=""
fi
ETC=$PREFIX/etc/bakgrab
DEPLOY_CONF=$ETC/deploy-backup-host.conf
[ -f "$DEPLOY_CONF" ] || die "$DEPLOY_CONF missing: run deploy/backup-host/install.sh${PREFIX:+ --prefix $PREFIX} first"
REDIS_PORT="" QUEUE="" TUNNEL_USER="" ALLOW_REVERSE=""
load_conf "$DEPLOY_CONF" REDIS_PORT QUEUE TUNNEL_USER ALLOW_REVERSE
AUTHORIZED_KEYS=$PREFIX/var/lib/$TUNNEL_USER/.ssh/authorized_keys
ACL_FILE=$PREFIX/etc/redis/bakgrab-users.acl
TAG="bakgrab:$NAME"

# without_client: authorized_keys minus NAME's line (its comment is the tag).
without_client() {
    awk -v tag="$TAG" '$NF != tag' "$AUTHORIZED_KEYS"
}

finish() {
    write_acl "$ETC" "$QUEUE" "$ACL_FILE"
    if [ "$RELOAD" = yes ]; then
        reload_acl "$ETC" "$REDIS_PORT" || note "run this again when Redis runs, or restart it"
    fi
}

if [ "$REMOVE" = yes ]; then
    without_client | put_file "$AUTHORIZED_KEYS" 0644 root:root
    rm -f "$ETC/clients/$NAME.hash" "$ETC/clients/$NAME.env"
    finish
    echo "removed client $NAME (its Redis user and tunnel key)"
    exit 0
fi

# -- the key --------------------------------------------------------------------
if [ "$KEY_FILE" = - ]; then
    key_line=$(head -n 1)
else
    [ -r "$KEY_FILE" ] || die "cannot read $KEY_FILE"
    key_line=$(head -n 1 "$KEY_FILE")
fi
read -r key_type key_data _ <<<"$key_line" || true
case "${key_type:-}" in
    ssh-ed25519|ssh-rsa|ecdsa-sha2-nistp256|ecdsa-sha2-nistp384|ecdsa-sha2-nistp521|\
    sk-ssh-ed25519@openssh.com|sk-ecdsa-sha2-nistp256@openssh.com) ;;
    *) die "expected a public key line (ssh-ed25519 AAAA... comment), got '${key_line:0:40}'" ;;
esac
[[ ${key_data:-} =~ ^[A-Za-z0-9+/]+=*$ ]] || die "the public key's data is not base64"
check=$(mktemp)
printf '%s %s\n' "$key_type" "$key_data" >"$check"
if ! ssh-keygen -l -f "$check" >/dev/null 2>&1; then
    rm -f "$check"
    die "ssh-keygen does not accept that public key"
fi
rm -f "$check"
if awk -v tag="$TAG" -v data="$key_data" '$NF != tag && $(NF-1) == data {found=1} END {exit !found}' \
        "$AUTHORIZED_KEYS"; then
    die "that key is already another client's: give each client its own key"
fi

# -- the Redis user -------------------------------------------------------------
ensure_dir "$ETC/clients" 0700 root:root
if [ ! -s "$ETC/clients/$NAME.hash" ] || [ "$ROTATE" = yes ]; then
    password=$(new_password)
    printf 'BAKGRAB_BROKER=redis://client-%s:%s@127.0.0.1:%s/0\n' "$NAME" "$password" "$REDIS_PORT" \
        | put_file "$ETC/clients/$NAME.env" 0600 root:root
    printf '%s' "$password" | sha256_hex | put_file "$ETC/clients/$NAME.hash" 0600 root:root
    unset password
    env_note="Copy $ETC/clients/$NAME.env to the client as /etc/bakgrab/client.env (mode 0600,
owner root), e.g. scp it there and run deploy/client/install.sh --broker-env FILE;
then delete it here."
else
    env_note="Its password is unchanged (--rotate makes a new one)."
fi

# -- the tunnel key -------------------------------------------------------------
{
    without_client
    printf '%s %s %s %s\n' "$(tunnel_options "$REDIS_PORT" "${ALLOW_REVERSE:-no}")" \
        "$key_type" "$key_data" "$TAG"
} | put_file "$AUTHORIZED_KEYS" 0644 root:root

finish
echo "added client $NAME: Redis user client-$NAME, tunnel key $(ssh-keygen -l -f "$AUTHORIZED_KEYS" 2>/dev/null | awk -v tag="$TAG" '$3 == tag {print $2}')"
echo "$env_note"
