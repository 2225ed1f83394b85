"""The product's own state as Ray metrics, where an operator already looks: the Ray dashboard's
Metrics view (with Prometheus/Grafana set up as Ray documents) or any Prometheus scraping Ray's
metrics endpoint. The launch process publishes, from the store, every ``every_s`` seconds:

    etc_images_stored{owner, split}      committed, not quarantined images held for training
    etc_upload_bytes_per_s{owner}        bytes received (stored + partial) per second since the last publication
    etc_training_epoch{run}              last finished epoch of each run (from its metrics.jsonl)
    etc_training_test_acc{run}           that epoch's test accuracy on the keys trained on

Prometheus shows them with Ray's ``ray_`` prefix. Ray is imported here only: the store and the
status command stay usable without it.
"""
from __future__ import annotations

import threading
import time

from orchestrator.status import run_row
from orchestrator.store import ShardStore


class StoreMetrics(threading.Thread):
    """Publishes the gauges until ``stop`` is set (a daemon: it never holds the process open)."""

    def __init__(self, store: ShardStore, stop: threading.Event, every_s: float = 5.0) -> None:
        super().__init__(daemon=True, name="store-metrics")
        from ray.util.metrics import Gauge

        self.store, self.stop, self.every_s = store, stop, every_s
        self.images = Gauge("etc_images_stored", "committed images per owner and split", tag_keys=("owner", "split"))
        self.rate = Gauge("etc_upload_bytes_per_s", "bytes received per second per owner", tag_keys=("owner",))
        self.epoch = Gauge("etc_training_epoch", "last finished epoch per run", tag_keys=("run",))
        self.accuracy = Gauge("etc_training_test_acc", "test accuracy after the last epoch", tag_keys=("run",))
        self._last: tuple[float, dict[str, int]] = (time.monotonic(), store.received_bytes())

    def run(self) -> None:
        self.publish()
        while not self.stop.wait(self.every_s):
            self.publish()

    def close(self) -> None:
        """Stop and wait for a publication in progress (before the store closes)."""
        self.stop.set()
        self.join(30)

    def publish(self) -> None:
        images: dict[tuple[str, str], int] = {}
        for d in self.store.committed_datasets():
            images[(d["owner"], d["split"])] = images.get((d["owner"], d["split"]), 0) + d["images"]
        for (owner, split), count in images.items():
            self.images.set(count, tags={"owner": owner, "split": split})
        now, received = time.monotonic(), self.store.received_bytes()
        then, before = self._last
        for owner, total in received.items():
            self.rate.set(max(0, total - before.get(owner, 0)) / max(now - then, 1e-3), tags={"owner": owner})
        self._last = (now, received)
        runs = self.store.root / "runs"
        for folder in sorted(runs.iterdir()) if runs.is_dir() else []:
            row = run_row(folder)
            if row["epoch"] is not None:
                self.epoch.set(row["epoch"], tags={"run": row["run"]})
            if row["test_acc"] is not None:
                self.accuracy.set(row["test_acc"], tags={"run": row["run"]})
