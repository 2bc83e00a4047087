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
Usage: deploy/backup-host/add-client.sh [OPTIONS] --key 'ssh-ed25519 AAAA...' NAME [KEY-FILE]
       deploy/backup-host/add-client.sh [OPTIONS] --remove NAME

Add client NAME (letters, digits, _.-), whose tunnel public key is the one
line in KEY-FILE, or on stdin when KEY-FILE is - or missing (the line that
deploy/client/install.sh printed on that client).

  * NAME registered to the client's bakgrab key (--key: what `bakgrab key`
    prints on the client, and deploy/client/install.sh too): the worker
    accepts requests for NAME only when that key signed them, and restores
    go only to it (`bakgrab trust`, run as the worker's user);

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

Running it again for NAME replaces the tunnel key and keeps the password;
with --key it re-keys NAME (a reinstalled client), without it the
registration is left as it is.

Options:
  --key KEY      the client's bakgrab key ("ssh-ed25519 AAAA..."), registered for NAME
  --from NET     with --key: the addresses or networks (CIDR, comma-separated)
                 the worker may connect to for NAME; any other is refused
  --rotate       make a new password (write a new NAME.env to copy over)
  --remove       remove client NAME: its Redis user, its tunnel key and its
                 registration
  --no-reload    do not ask the running Redis to reload its users
  --prefix DIR   the --prefix given to install.sh
  -h, --help     show this help
EOF
}

PREFIX="" ROTATE=no REMOVE=no RELOAD=yes CLIENT_KEY="" FROM=""
args=()
while [ $# -gt 0 ]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --prefix) PREFIX=${2:?--prefix needs a directory}; shift ;;
        --key) CLIENT_KEY=${2:?--key needs the client key}; shift ;;
        --from) FROM=${2:?--from needs addresses or networks}; shift ;;
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
REDIS_PORT="" QUEUE="" TUNNEL_USER="" ALLOW_REVERSE="" STORAGE="" WORKER_USER="" BAKGRAB=""
load_conf "$DEPLOY_CONF" REDIS_PORT QUEUE TUNNEL_USER ALLOW_REVERSE STORAGE WORKER_USER BAKGRAB
AUTHORIZED_KEYS=$PREFIX/var/lib/$TUNNEL_USER/.ssh/authorized_keys
ACL_FILE=$PREFIX/etc/redis/bakgrab-users.acl
TAG="bakgrab:$NAME"

# without_client: authorized_keys minus NAME's line (its comment is the tag).
without_client() {
    awk -v tag="$TAG" '$NF != tag' "$AUTHORIZED_KEYS"
}

# as_worker ARGS: `bakgrab ARGS` as the worker's user (the storage is its own:
# files root made there would lock the worker out), with this host's config.
as_worker() {
    local config=/dev/null
    [ -f "$ETC/bakgrab.toml" ] && config=$ETC/bakgrab.toml
    setpriv --reuid="$WORKER_USER" --regid="$WORKER_USER" --init-groups \
        env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/ \
        LANG=C.UTF-8 BAKGRAB_CONFIG="$config" "$BAKGRAB" "$@"
}

finish() {
    write_acl "$ETC" "$QUEUE" "$ACL_FILE"
    if [ "$RELOAD" = yes ]; then
        reload_acl "$ETC" "$REDIS_PORT" || note "run this again when Redis runs, or restart it"
    fi
}

if [ "$REMOVE" = yes ]; then
    [ -z "$CLIENT_KEY$FROM" ] || die "--remove takes no --key or --from"
    if [ -e "$STORAGE/.bakgrab/pins/$NAME.pub" ]; then
        as_worker trust --storage "$STORAGE" --remove "$NAME" >/dev/null
    fi
    without_client | put_file "$AUTHORIZED_KEYS" 0644 root:root
    rm -f "$ETC/clients/$NAME.hash" "$ETC/clients/$NAME.env"
    finish
    echo "removed client $NAME (its Redis user, tunnel key and registration)"
    exit 0
fi
[ -n "$CLIENT_KEY" ] || [ -z "$FROM" ] || die "--from needs --key (the registration it belongs to)"
if [ -n "$CLIENT_KEY" ]; then
    [[ $CLIENT_KEY =~ ^ssh-ed25519\ [A-Za-z0-9+/]{68}(\ .*)?$ ]] \
        || die "--key: expected the line \`bakgrab key\` prints on the client (ssh-ed25519 AAAA...)"
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

# -- the registration (issue 11) ------------------------------------------------
# First, as it may still refuse its input: then nothing else has changed.
registered=""
if [ -n "$CLIENT_KEY" ]; then
    registered=$(as_worker trust --storage "$STORAGE" "$NAME" --key "$CLIENT_KEY" \
        ${FROM:+--from "$FROM"}) || die "bakgrab trust refused the registration of $NAME"
elif [ ! -e "$STORAGE/.bakgrab/pins/$NAME.pub" ]; then
    note "$NAME is not registered: its requests are refused until you run this again with" \
        "--key 'KEY', KEY being what \`bakgrab key\` prints on the client"
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
[ -z "$registered" ] || echo "$registered"
echo "$env_note"
