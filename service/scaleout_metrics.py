"""Prometheus metrics added for operations and the scaled-out mode (kept
apart from service/metrics.py): free spool space, destination reachability
and broker queue depth on the gateway; tasks, failures, stage durations and
queue depth on `brainline worker`. Labels are queue, stage, outcome and
destination names only, never patient data."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily

from .metrics import STAGE_BUCKETS


class _Collector:
    def __init__(self, fn):
        self.collect = fn


def _queue_families(depth_fn):
    """brainline_queue_depth{queue} and brainline_broker_up from ``depth_fn()``."""
    up = GaugeMetricFamily("brainline_broker_up", "1 when the Celery broker (Redis) answers")
    depth = GaugeMetricFamily("brainline_queue_depth", "Stage tasks waiting in a broker queue",
                              labels=["queue"])
    try:
        depths = depth_fn()
    except Exception:
        up.add_metric([], 0)
        return [up]
    up.add_metric([], 1)
    for queue, n in sorted(depths.items()):
        depth.add_metric([queue], n)
    return [up, depth]


def add_gateway_metrics(metrics, spool, outbox, queue_depth_fn=None) -> None:
    """Register on the gateway's registry: brainline_spool_free_bytes,
    brainline_destination_up{destination}, brainline_destination_failing_seconds
    {destination} and, in celery mode, brainline_queue_depth{queue} and
    brainline_broker_up."""
    registry = metrics.registry

    def collect():
        free = GaugeMetricFamily("brainline_spool_free_bytes",
                                 "Free space on the file system of the spool (BRAINLINE_HOME)")
        try:
            free.add_metric([], float(spool.free_bytes()))
        except OSError:
            pass
        yield free
        up = GaugeMetricFamily("brainline_destination_up",
                               "1 unless the last delivery attempt to the destination failed",
                               labels=["destination"])
        failing = GaugeMetricFamily("brainline_destination_failing_seconds",
                                    "Seconds since deliveries to the destination started failing "
                                    "(0 when the last attempt succeeded)", labels=["destination"])
        now = time.monotonic()
        for name in sorted(outbox.destinations):
            since = outbox.failing_since.get(name)
            up.add_metric([name], 0 if since is not None else 1)
            failing.add_metric([name], 0.0 if since is None else now - since)
        yield up
        yield failing
        if queue_depth_fn is not None:
            yield from _queue_families(queue_depth_fn)

    registry.register(_Collector(collect))


class WorkerMetrics:
    """Metrics of one `brainline worker` (own registry, served on
    BRAINLINE_WORKER_HTTP_PORT)."""

    def __init__(self, queue_depth_fn=None, running_fn=None) -> None:
        self.registry = r = CollectorRegistry()
        self.stage_duration = Histogram("brainline_stage_duration_seconds",
                                        "Wall-clock duration of finished pipeline stages",
                                        ["stage"], buckets=STAGE_BUCKETS, registry=r)
        self.tasks = Counter("brainline_worker_tasks", "Stage tasks handled, by stage and outcome "
                             "(done, failed, needs_input, rejected, duplicate, busy, final, error, ...)",
                             ["stage", "outcome"], registry=r)
        self.failures = Counter("brainline_worker_task_failures",
                                "Stage tasks that ended failed or raised", ["stage"], registry=r)
        self.last_task = Gauge("brainline_worker_last_task_timestamp_seconds",
                               "Unix time the last stage task ended", registry=r)
        running = Gauge("brainline_worker_tasks_running", "Stage tasks running now", registry=r)
        if running_fn is not None:
            running.set_function(running_fn)
        if queue_depth_fn is not None:
            r.register(_Collector(lambda: _queue_families(queue_depth_fn)))

    def on_stage(self, stage: str, outcome: str, seconds: float) -> None:
        self.tasks.labels(stage=stage, outcome=outcome).inc()
        if outcome in ("failed", "error"):
            self.failures.labels(stage=stage).inc()
        self.last_task.set(time.time())
