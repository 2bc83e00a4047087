"""The contract both sides share: Celery app, task names, request and result.

The client imports only this package and ``client``; the worker imports this
package and ``worker``. Nothing here imports either side.
"""

GRAB = "bakgrab.grab"
"""Task name of a backup pull, sent by name so the client never imports worker/."""

RESTORE = "bakgrab.restore"
"""Task name of a restore push into the client's staging directory."""

DEFAULT_QUEUE = "bakgrab"
"""Queue a worker serves and a client sends to when none is configured."""


def request_key_name(queue: str) -> str:
    """Redis key where the workers of ``queue`` publish their request public key."""
    return f"bakgrab:request-key:{queue}"
