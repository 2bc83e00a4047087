"""Flower for a backup host: the web UI and HTTP API that show every grab.

Flower runs in this process (``bakgrab flower``) on the Celery app of
:mod:`bakgrab.tasks.app`, so it reads the broker with the same JSON-only settings as
the worker and the client.

Invariants:

* no authentication, no Flower: :func:`serve` refuses to start without
  ``flower_basic_auth`` (a :class:`ConfigError`, exit 3);
* it listens on ``flower_address``, loopback unless an operator says
  otherwise (then it warns): view it through ``ssh -L``;
* read-only: Flower's ``read_only`` option is on, so every endpoint that
  would act (apply a task, revoke, terminate, rate limits, pool and worker
  control) answers 403; it can only watch;
* the password reaches Flower through ``FLOWER_BASIC_AUTH`` in this
  process's own environment (how Flower 2 reads any option from the
  environment), never through a child's argv nor a log line; its argv holds
  no secret;
* the tasks page shows :data:`TASKS_COLUMNS`; its ``kwargs`` column is the
  redacted request (:func:`bakgrab.tasks.request.redacted`: backup name, address,
  host key fingerprint, ``<redacted>`` for the key), the one place a row says
  which host it is about;
* Flower's own ``flowerconfig.py`` is not read (it is Python that Flower
  would execute from the working directory); other Flower options can still
  be given as ``FLOWER_*`` variables, but bakgrab's settings win for the ones
  above.
"""

from __future__ import annotations

import ipaddress
import logging
import os

from bakgrab.tasks.app import make_app
from bakgrab.tasks.config import Settings
from bakgrab.tasks.errors import ConfigError
from bakgrab.worker import progress

log = logging.getLogger(__name__)

TASKS_COLUMNS = "name,state,runtime,retries,received,started,worker,uuid,kwargs"
"""Columns of Flower's tasks page, in order (Flower's ``tasks_columns`` slugs):
the task name (always ``bakgrab.grab``), its state, runtime and retries first."""

AUTH_ENV = "FLOWER_BASIC_AUTH"
"""The variable Flower reads its basic-auth ``user:password`` pairs from."""

NO_AUTH_MESSAGE = (
    "Flower needs authentication: set flower_basic_auth to USER:PASSWORD "
    "(BAKGRAB_FLOWER_BASIC_AUTH or a 0600 config file; never on the command line); "
    "it shows every backup job, so it never runs open"
)


def check_basic_auth(value: str) -> list[str]:
    """The ``user:password`` pairs in ``value`` (comma separated), or ConfigError.

    Messages never echo the value: it holds passwords."""
    if not value.strip():
        raise ConfigError(NO_AUTH_MESSAGE)
    pairs = value.split(",")
    for i, pair in enumerate(pairs, 1):
        user, sep, password = pair.partition(":")
        if not sep or not user.strip() or not password:
            raise ConfigError(
                f"flower_basic_auth: entry {i} is not USER:PASSWORD (both non-empty; "
                "a password cannot contain a comma, which separates entries)"
            )
    return pairs


def is_loopback(address: str) -> bool:
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def flower_argv(settings: Settings) -> list[str]:
    """The ``celery flower`` arguments for ``settings``; they never hold a secret."""
    return [
        "flower",
        f"--address={settings.flower_address}",
        f"--port={settings.flower_port}",
        f"--tasks_columns={TASKS_COLUMNS}",
        "--read_only=true",
        # Flower would exec ./flowerconfig.py by default; bakgrab's settings are
        # the one place of configuration.
        "--conf=/dev/null",
    ]


def serve(settings: Settings) -> int:
    """Run Flower for ``settings.broker`` until it is stopped; its exit status."""
    check_basic_auth(settings.flower_basic_auth)
    if not is_loopback(settings.flower_address):
        log.warning("Flower listens on %s, which is not loopback: anyone who reaches it "
                    "can try the password; prefer 127.0.0.1 and ssh -L",
                    settings.flower_address)
    # Only this process reads it: Flower runs here and starts no child.
    os.environ[AUTH_ENV] = settings.flower_basic_auth
    app = make_app(settings)
    progress.install()  # issue 17: a running grab's numbers in the task view
    return int(app.start(flower_argv(settings)) or 0)
