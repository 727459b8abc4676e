"""Prometheus metrics of one service instance (own registry, no patient data:
labels are reasons, states and stage names only)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily

from .db import State

STAGE_BUCKETS = (0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.instances = Counter("brainline_instances_received",
                                 "DICOM instances stored in the spool (C-STORE and DICOMweb pull)",
                                 ["source"], registry=r)
        self.duplicates = Counter("brainline_instances_duplicate",
                                  "Instances received again with identical content", registry=r)
        self.conflicts = Counter("brainline_instances_conflict",
                                 "Instances received with a known SOP Instance UID but different "
                                 "content (both versions kept, study re-opened)", registry=r)
        self.connections_open = Gauge("brainline_dicom_connections_open",
                                      "Open DICOM connections (associated or not)", registry=r)
        self.associations = Counter("brainline_associations_received",
                                    "DICOM associations accepted", registry=r)
        self.rejections = Counter("brainline_rejections",
                                  "Refused connections, associations and instances, by reason "
                                     "(calling_ae_not_allowed, peer_not_allowed, called_ae_not_recognised, "
                                     "too_many_associations, too_many_associations_from_peer, "
                                     "too_many_connections, pdu_too_large, timeout, tls_handshake_failed, "
                                     "sop_class_not_accepted, too_large, malformed, out_of_resources, "
                                     "io_error)", ["reason"], registry=r)
        self.stage_duration = Histogram("brainline_stage_duration_seconds",
                                        "Wall-clock duration of finished pipeline stages",
                                        ["stage"], buckets=STAGE_BUCKETS, registry=r)
        self.studies_pending = Gauge("brainline_studies_receiving",
                                     "Studies in the spool waiting for their quiet period", registry=r)
        # Retention (service/gateway/retention.py); area: spool, conflicts, quarantine, priors,
        # incoming, workspace, outbox, leftover, vault (rows for vault).
        self.retention_purged_files = Counter("brainline_retention_purged_files",
                                              "Files (vault: rows) deleted by the retention purge, by area",
                                              ["area"], registry=r)
        self.retention_freed_bytes = Counter("brainline_retention_freed_bytes",
                                             "Bytes (apparent size) deleted by the retention purge, by area",
                                             ["area"], registry=r)
        self.retention_runs = Counter("brainline_retention_runs",
                                      "Retention purges run by the service, by outcome (ok, errors, failed)",
                                      ["outcome"], registry=r)
        self.retention_last_run = Gauge("brainline_retention_last_run_timestamp_seconds",
                                        "Unix time the last retention purge ended", registry=r)
        self.retention_kept = Gauge("brainline_retention_kept_items",
                                    "Data older than the retention period kept at the last purge (not "
                                    "delivered, not finished, under review)", registry=r)

    def add_outbox(self, depth_fn, oldest_age_fn) -> None:
        """Outbox depth and age of the oldest pending item, read at scrape time."""
        depth = Gauge("brainline_outbox_depth", "Result objects waiting for delivery",
                      registry=self.registry)
        depth.set_function(depth_fn)
        age = Gauge("brainline_outbox_oldest_age_seconds",
                    "Age of the oldest pending outbox item (0 when empty)", registry=self.registry)
        age.set_function(oldest_age_fn)

    def add_jobs_by_state(self, count_fn) -> None:
        """Register a collector that asks ``count_fn() -> {state: n}`` at scrape time."""

        class _JobsCollector:
            def collect(self_inner):
                family = GaugeMetricFamily("brainline_jobs", "Jobs by state", labels=["state"])
                counts = count_fn()
                for state in State:
                    family.add_metric([state.value], counts.get(state.value, 0))
                yield family

        self.registry.register(_JobsCollector())

    def add_storage(self, measure_fn) -> None:
        """Bytes and files held per area (spool, incoming, workspaces, outbox),
        from ``measure_fn() -> {area: (bytes, files)}`` at scrape time
        (retention.StorageUsage caches the folder walk)."""

        class _StorageCollector:
            def collect(self_inner):
                size = GaugeMetricFamily("brainline_storage_bytes",
                                         "Bytes held per area (apparent file sizes, hard links once)",
                                         labels=["area"])
                files = GaugeMetricFamily("brainline_storage_files", "Files held per area", labels=["area"])
                for area, (n_bytes, n_files) in sorted(measure_fn().items()):
                    size.add_metric([area], n_bytes)
                    files.add_metric([area], n_files)
                yield size
                yield files

        self.registry.register(_StorageCollector())
