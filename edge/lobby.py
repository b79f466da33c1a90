"""Which experiment a device serves when it is not pinned to one: the running coordinator's.

A device installed once (a systemd service, or `jetfed edge run` with broker-config's edge.env)
listens on `jetfed/+/coordinator`, where each running coordinator keeps a retained
`Announcement` (cleared when its run ends, or by its last will). The device joins the oldest
live experiment with a fresh `EdgeAgent` — its own connection, subscribed to that experiment's
topics only, whose last will marks it offline there — serves it until the announcement is gone,
then waits for the next. Nothing of one experiment reaches another.
"""

from __future__ import annotations

import logging
import threading
from typing import Dict, Optional

from edge.agent import EdgeAgent, EdgeConfig
from edge.errors import ProtocolError
from edge.logs import log_event
from edge.mqtt import MqttLink
from edge.wire import ANNOUNCEMENTS, Announcement, announcement_experiment, parse_message

logger = logging.getLogger(__name__)


class Lobby:
    """`Lobby(config).run()`: serve whichever experiment announces itself, one at a time."""

    def __init__(self, config: EdgeConfig) -> None:
        self.config = config
        self._live: Dict[str, float] = {}
        """experiment → its coordinator's start time, for every live announcement."""
        self._lock = threading.Lock()
        self._changed = threading.Event()
        self._agent: Optional[EdgeAgent] = None
        self._stop = threading.Event()
        self.link = MqttLink(
            config.broker,
            client_id=f"jetfed-edge-{config.device_id}-lobby",
            subscriptions=[ANNOUNCEMENTS],
        )
        self.link.on_topic(lambda topic: True, self._on_announcement)

    def _on_announcement(self, topic: str, payload: bytes) -> None:
        """paho thread: record or forget an experiment; stop the agent whose run ended."""
        try:
            experiment = announcement_experiment(topic)
            started_unix_s = None
            if payload:
                announcement = parse_message(Announcement, payload)
                if announcement.experiment != experiment:
                    raise ProtocolError(f"announcement names {announcement.experiment!r}")
                started_unix_s = announcement.started_unix_s
        except ProtocolError as exc:
            log_event(logger, logging.WARNING, "announcement.rejected", topic=topic, reason=exc)
            return
        with self._lock:
            if started_unix_s is None:
                self._live.pop(experiment, None)
            else:
                self._live[experiment] = started_unix_s
            agent = self._agent
        if agent is not None and started_unix_s is None and agent.topics.experiment == experiment:
            log_event(logger, logging.INFO, "experiment.ended", experiment=experiment)
            agent.stop()
        self._changed.set()

    def _next_experiment(self) -> Optional[str]:
        with self._lock:
            if not self._live:
                return None
            return min(self._live, key=lambda name: (self._live[name], name))

    def stop(self) -> None:
        self._stop.set()
        self._changed.set()
        agent = self._agent
        if agent is not None:
            agent.stop()

    def run(self, max_rounds: Optional[int] = None) -> None:
        """Serve experiments until stopped (or, with `max_rounds`, after the first one)."""
        self.link.connect()
        try:
            while not self._stop.is_set():
                experiment = self._next_experiment()
                if experiment is None:
                    log_event(
                        logger,
                        logging.INFO,
                        "edge.waiting",
                        device_id=self.config.device_id,
                        broker=self.config.broker.url,
                        listening=ANNOUNCEMENTS,
                        experiment="any (not pinned: --experiment)",
                    )
                    self._changed.clear()
                    while self._next_experiment() is None and not self._stop.is_set():
                        self._changed.wait(1.0)
                        self._changed.clear()
                    continue
                log_event(logger, logging.INFO, "experiment.joined", experiment=experiment)
                agent = EdgeAgent(self.config.model_copy(update={"experiment": experiment}))
                with self._lock:
                    self._agent = agent
                    ended = experiment not in self._live
                if not ended:
                    agent.run(max_rounds=max_rounds)
                with self._lock:
                    self._agent = None
                    still_live = experiment in self._live
                if max_rounds is not None or still_live:
                    return
        finally:
            self.link.close()
