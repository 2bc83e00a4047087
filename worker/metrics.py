"""``/metrics`` over HTTP, from the official ``prometheus_client`` (issue 17).

Each scrape reads the storage afresh with :func:`bakgrab.worker.status.collect`
(read-only, safe while grabs run), so the numbers are those of ``bakgrab
status`` and of its textfile (:data:`bakgrab.worker.status.METRICS`: the same
names, help and types). Invariants: it listens on a loopback address only
(the storage's names are not for the network; scrape it through an SSH
tunnel or a local Prometheus); it serves nothing but metrics and never writes.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from bakgrab.tasks.config import Settings, parse_duration
from bakgrab.tasks.errors import ConfigError
from bakgrab.worker import status
from bakgrab.worker.storage import Storage

log = logging.getLogger(__name__)


class StatusCollector(Collector):
    """Every name's status as Prometheus metrics, read at each scrape."""

    def __init__(self, storage: Storage, stale_after: float) -> None:
        self.storage, self.stale_after = storage, stale_after

    def collect(self) -> Iterator[Metric]:
        statuses = status.collect(self.storage, self.stale_after)
        for metric, kind, help_text, field in status.METRICS:
            family: Any = (CounterMetricFamily if kind == "counter" else GaugeMetricFamily)(
                metric, help_text, labels=["name"])
            for s in statuses:
                value = getattr(s, field)
                if value is not None:
                    family.add_metric([s.name], float(value))
            yield family
        partial = GaugeMetricFamily("bakgrab_last_success_partial",
                                    "1 if the name's last snapshot is partial, else 0.",
                                    labels=["name"])
        for s in statuses:
            if s.snapshot is not None:
                partial.add_metric([s.name], float(s.partial))
        yield partial


def listen_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` of ``metrics_listen``, a loopback address; ConfigError if not."""
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    try:
        if not sep or not ipaddress.ip_address(host).is_loopback:
            raise ValueError(text)
        number = int(port)
        if not 0 <= number <= 65535:
            raise ValueError(text)
    except ValueError:
        raise ConfigError(f"metrics_listen {text!r}: a loopback address and port, "
                          "e.g. 127.0.0.1:9464") from None
    return host, number


def serve(settings: Settings) -> str:
    """Start ``/metrics`` in a daemon thread; the ``HOST:PORT`` it listens on."""
    host, port = listen_address(settings.metrics_listen)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatusCollector(Storage(settings.storage),
                                      parse_duration(settings.stale_after)))
    server, _thread = start_http_server(port, addr=host, registry=registry)
    bound_host, bound_port = str(server.server_address[0]), int(server.server_address[1])
    address = f"[{bound_host}]:{bound_port}" if ":" in bound_host else f"{bound_host}:{bound_port}"
    log.info("metrics on http://%s/metrics", address)
    return address
