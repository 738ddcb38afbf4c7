"""Ray Serve request router of the replicated server (exllamav2/server/cluster.py): prefix affinity over
`PrefixTable` (exllamav2/server/cluster_prefix.py), else the least-loaded replica.

The router runs in the gateway's process (the caller of the engine deployment's handle), so its table is that
gateway's view of what it sent where; with one gateway replica (the default) that view is complete."""

from __future__ import annotations

from ray.serve.request_router import RequestRouter

from .cluster_prefix import BLOCK_CHARS, IMBALANCE_LIMIT, PrefixTable, count_decision


class PrefixAffinityRouter(RequestRouter):
    """Requests are `RoutedRequest`s (exllamav2/server/ray_replica.py) whose `routing_text` carries the prompt.

    Ray Serve asks `choose_replicas` for ranks of replicas and sends the request to the first rank with room
    (max_ongoing_requests). The ranks here hold one replica each, in PrefixTable's order over the replicas with
    room as far as Ray's queue-length cache knows, so the first is the one the request goes to unless the cache was
    stale; that replica is recorded as holding the prompt's blocks. In-flight counts follow the sends and
    completions Ray reports."""

    def initialize_state(self, block_chars: int = BLOCK_CHARS, imbalance_limit: int = IMBALANCE_LIMIT):
        self.table = PrefixTable(block_chars, imbalance_limit)
        self.recorded: dict[str, None] = {}  # request ids whose blocks were recorded (choose may run again)

    @staticmethod
    def _text(pending_request) -> str:
        for arg in (pending_request.args if pending_request is not None else ()):
            text = getattr(arg, "routing_text", None)
            if isinstance(text, str):
                return text
        return ""

    async def choose_replicas(self, candidate_replicas, pending_request=None):
        self.table.keep_only(self.curr_replicas.keys())
        available = self.select_available_replicas(candidate_replicas) or list(candidate_replicas)
        by_id = {r.replica_id: r for r in available}
        text = self._text(pending_request)
        order, how = self.table.choose(list(by_id), text)
        request_id = getattr(getattr(pending_request, "metadata", None), "internal_request_id", None)
        if order and request_id is not None and request_id not in self.recorded:
            self.recorded[request_id] = None
            if len(self.recorded) > 10_000:
                self.recorded.pop(next(iter(self.recorded)))
            count_decision(how)
            self.table.remember(order[0], text)
        # one rank per replica: the preferred one first, the next one when its queue is full
        return [[by_id[r]] for r in order]

    def on_send_request(self, replica_id) -> None:
        super().on_send_request(replica_id)
        self.table.started(replica_id)

    def on_request_completed(self, replica_id, internal_request_id) -> None:
        self.table.completed(replica_id)

    def on_replica_actor_died(self, replica_id):
        super().on_replica_actor_died(replica_id)
        self.table.keep_only([r for r in self.curr_replicas if r != replica_id])
