# Redis users of a backup host and what each may do. Sourced by install.sh
# and add-client.sh (bash), which regenerate the ACL file from these rules,
# so a new install updates every client's rights.
#
# Users:
#   default          off: nothing works without a password.
#   admin            everything; for the operator (redis-cli) and for
#                    add-client.sh's ACL LOAD. Password: private/redis-admin.password.
#   worker           `bakgrab worker`: every key and channel, every command but
#                    the @dangerous ones (FLUSHALL, CONFIG, KEYS, DEBUG,
#                    MONITOR, ACL, SHUTDOWN, ...), which a Celery worker never sends.
#   flower           `bakgrab flower`: the same rights as the worker (it reads
#                    events, queue lengths and asks workers for their state).
#   client-NAME      one per backed-up host (add-client.sh): may send a grab
#                    request and read results, nothing else; see below.
#
# What a client's `bakgrab backup` (and `restore`) sends, on two connections
# (bakgrab.client.broker: RESP2 of its own, no Celery, kombu or redis-py
# since issue 19), and the rule that allows each, for queue Q (default
# "bakgrab"), database 0:
#
#   AUTH client-NAME PASSWORD        needs no rule (allowed before login)
#   GET bakgrab:request-key:Q        +get %R~bakgrab:request-key:Q: the worker's
#                                    public key the client seals its one-time
#                                    key to; read-only, so a client cannot
#                                    swap it and read other clients' keys
#   SUBSCRIBE celery-task-meta-ID    +subscribe +unsubscribe on
#                                    &celery-task-meta-*: waiting for the result
#   LPUSH Q <request>                +lpush %W~Q: write-only. A request holds
#                                    its client's one-time key (sealed): no
#                                    client may read Q (LRANGE, LPOP, BRPOP,
#                                    SORT, DUMP... are not granted, and %W~
#                                    would refuse them even if they were)
#   GET celery-task-meta-ID          +get %R~celery-task-meta-*: the result
#                                    (again after a reconnect)
#   PING                             +ping: a quiet result channel is pinged
#
# Not granted since issue 19, because no client sends them any more: kombu's
# queue declaration (MULTI/EXEC, LLEN of the queue) and binding (SADD to
# _kombu.binding.Q, which would let a client route the worker's own
# publishes to Q, its retries, into another queue too), MGET.
#
# Each group is a Redis 7 selector "(...)": a command is allowed only if one
# selector (or the root rules) allows both the command and its key or
# channel. So a client can SUBSCRIBE to a result channel but not PUBLISH
# forged results to it. No client may PUBLISH at all (issue 11, attack 9):
# not on the events channels (/0.celeryev/*: a forged task-succeeded would
# show a failed backup as SUCCESS in Flower, invented tasks too), nor on
# Celery's remote-control channel (/0.celery.pidbox), which would let it shut
# workers down. A client's bakgrab sends no task-sent event (only workers send
# events), so Flower shows only what a worker saw. Not granted, among others:
# PUBLISH, PSUBSCRIBE (would list other jobs' ids), SET/DEL on anything, KEYS,
# SCAN, FLUSHALL, CONFIG, MONITOR, CLIENT, INFO, SELECT, EVAL, reading events.
#
# What a client may LPUSH is anything, though: the worker admits each item
# before decoding it (bakgrab.worker.transport: size cap, only bakgrab.grab and
# bakgrab.restore, its own time limits, retries and eta only when the worker
# signed them) and drops the rest; docs/security.md, "Hostile messages".
#
# Known limits, by design of Celery's protocol: a client can read any
# result whose task id it knows (ids are random UUIDs it never sees for
# other clients' jobs; results hold no key); an interrupted client cannot
# revoke its queued job (revoking is remote control): the worker instead
# skips a job when it comes up and no client is subscribed to its result
# any more (JobCancelled, cancel_unwatched).

ACL_ADMIN="admin"
ACL_WORKER="worker"
ACL_FLOWER="flower"

# acl_client_rules QUEUE: the rules of a client-NAME user (see above).
acl_client_rules() {
    local q=$1
    printf '%s' "resetkeys resetchannels -@all +ping +lpush %W~$q"
    printf ' %s' "(+get %R~celery-task-meta-* %R~bakgrab:request-key:$q)"
    printf ' %s' "(+subscribe +unsubscribe &celery-task-meta-*)"
}

# tunnel_options PORT ALLOW_REVERSE: the options of a client's line in the
# tunnel user's authorized_keys: only a forward to Redis on loopback, and with
# ALLOW_REVERSE=yes also listening on loopback (ssh -R, for --reverse).
tunnel_options() {
    printf 'restrict,port-forwarding,permitopen="127.0.0.1:%s"' "$1"
    if [ "$2" = yes ]; then
        printf ',permitlisten="127.0.0.1:*"'
    fi
}

# acl_hash FILE: the SHA-256 (hex) of the password in FILE.
acl_hash() {
    read_secret "$1" | sha256_hex
}

# render_acl ETC QUEUE: the ACL file for the secrets and clients under ETC
# (PREFIX/etc/bakgrab). Redis's ACL file takes no comments: they are above.
render_acl() {
    local etc=$1 queue=$2 f name
    echo "user default off resetpass resetkeys resetchannels -@all"
    echo "user $ACL_ADMIN on #$(acl_hash "$etc/private/redis-admin.password") ~* &* +@all"
    echo "user $ACL_WORKER on #$(acl_hash "$etc/private/redis-worker.password") ~* &* +@all -@dangerous"
    echo "user $ACL_FLOWER on #$(acl_hash "$etc/private/redis-flower.password") ~* &* +@all -@dangerous"
    for f in "$etc"/clients/*.hash; do
        [ -e "$f" ] || continue
        name=$(basename "$f" .hash)
        echo "user client-$name on #$(read_secret "$f") $(acl_client_rules "$queue")"
    done
}

# write_acl ETC QUEUE ACL_FILE: regenerate the ACL file (0640 root:redis, so
# only Redis reads it; it holds hashes, not passwords).
write_acl() {
    local group=root
    getent group redis >/dev/null && group=redis
    render_acl "$1" "$2" | put_file "$3" 0640 "root:$group"
}

# reload_acl ETC PORT: ask the running Redis to load the ACL file again. The
# admin password goes to redis-cli on stdin, never on its command line.
# Returns 1 (with a note) when Redis is not reachable or refuses.
reload_acl() {
    local etc=$1 port=$2 out
    command -v redis-cli >/dev/null 2>&1 || { note "redis-cli not found: reload Redis yourself"; return 1; }
    out=$({ printf 'AUTH %s %s\n' "$ACL_ADMIN" "$(read_secret "$etc/private/redis-admin.password")"
            printf 'ACL LOAD\n'; } | redis-cli -h 127.0.0.1 -p "$port" 2>&1) || true
    if [ "$out" = "$(printf 'OK\nOK')" ]; then
        return 0
    fi
    note "Redis on 127.0.0.1:$port did not reload its users: ${out//$'\n'/ }"
    return 1
}
