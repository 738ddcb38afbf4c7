"""/metrics of the replicated server: every replica's own metrics (exllamav2/server/metrics.py), labelled
`replica="<id>"`, plus the gateway's (requests by status at the door, retries after a replica failed, back-pressure
rejections, routing decisions).

Replicas post their Prometheus text to a `MetricsBoard` actor every second (exllamav2/server/ray_replica.py); the
gateway reads the board when scraped. A replica that has not posted for `STALE_AFTER_S` (dead, or being restarted)
drops out; its restarted successor appears under a new id, its counters starting from zero."""

from __future__ import annotations

import time

import ray

STALE_AFTER_S = 10.0


@ray.remote(num_cpus=0)
class MetricsBoard:
    def __init__(self):
        self.entries: dict[str, tuple[float, str, dict]] = {}

    def put(self, replica: str, text: str, info: dict) -> None:
        self.entries[replica] = (time.time(), text, info)

    def snapshot(self, max_age_s: float = STALE_AFTER_S) -> dict[str, tuple[float, str, dict]]:
        """{replica: (seconds since its last post, metrics text, info)} of the replicas heard from lately."""
        now = time.time()
        for r in [r for r, (t, _, _) in self.entries.items() if now - t > 3 * max_age_s]:
            del self.entries[r]
        return {r: (now - t, text, info) for r, (t, text, info) in self.entries.items() if now - t <= max_age_s}


def labelled_families(texts: dict[str, str]):
    """Metric families from several replicas' Prometheus texts, one family per name, each sample labelled with
    its replica."""
    from prometheus_client.metrics_core import Metric
    from prometheus_client.parser import text_string_to_metric_families

    merged: dict[str, Metric] = {}
    for replica, text in sorted(texts.items()):
        for fam in text_string_to_metric_families(text):
            out = merged.get(fam.name)
            if out is None:
                out = merged[fam.name] = Metric(fam.name, fam.documentation, fam.type, fam.unit)
            for s in fam.samples:
                out.add_sample(s.name, {**s.labels, "replica": replica}, s.value, s.timestamp, s.exemplar)
    return list(merged.values())


class ReplicaCollector:
    """A prometheus_client collector over the families read from the board at scrape time."""

    def __init__(self, families):
        self.families = families

    def describe(self):
        return []

    def collect(self):
        yield from self.families


class GatewayMetrics:
    """The gateway's own counters, in its own registry."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter

        self.registry = CollectorRegistry(auto_describe=True)
        ns = "exllamav2_gateway"
        self.requests = Counter("requests", "HTTP requests at the gateway by route and status code",
                                ["route", "status"], namespace=ns, registry=self.registry)
        self.retries = Counter("retries", "requests sent again to another replica after theirs failed before "
                                          "answering", namespace=ns, registry=self.registry)
        self.replica_failures = Counter("replica_failures", "requests whose replica died or became unreachable",
                                        ["stage"], namespace=ns, registry=self.registry)
        self.rejected = Counter("backpressure_rejections", "requests answered 503 because every replica's queue "
                                                           "was full", namespace=ns, registry=self.registry)

    def render(self, replica_texts: dict[str, str], routing_decisions: dict[str, int]) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        decisions = CounterMetricFamily("exllamav2_gateway_routed", "requests routed to a replica that already "
                                                                    "held a prefix of the prompt, or by load alone",
                                        labels=["policy"])
        for policy, n in sorted(routing_decisions.items()):
            decisions.add_metric([policy], n)
        live = GaugeMetricFamily("exllamav2_gateway_replicas", "replicas that posted metrics lately",
                                 value=len(replica_texts))
        scrape = CollectorRegistry(auto_describe=False)
        scrape.register(ReplicaCollector(labelled_families(replica_texts) + [decisions, live]))
        return generate_latest(self.registry) + generate_latest(scrape), CONTENT_TYPE_LATEST
