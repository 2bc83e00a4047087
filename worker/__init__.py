"""The backup-host side: storage layout, locks, cleanup, the rsync pull and
the Celery task body."""
