"""Which experiment a device serves when it is not pinned to one: the running coordinator's.

A device installed once (a systemd service, or `jetfed edge run` with broker-config's edge.env)
listens on `jetfed/+/coordinator`, where each running coordinator keeps a retained
`Announcement` (cleared when its run ends, or by its last will). The device joins the oldest
live experiment with a fresh `EdgeAgent` — subscribed to that experiment's topics only, whose
last will marks it offline there — which serves it until the announcement is gone; then the
device waits for the next. Nothing of one experiment reaches another.

A device holds one broker connection at a time: the lobby's closes before the agent's opens.
Brokers that tie the client id to the account (`jetfed broker-config` sets Mosquitto's
`use_username_as_clientid`, against client-id takeover) would otherwise make the two
connections of one account disconnect each other forever.
"""

from __future__ import annotations

import logging
import threading
from typing import Dict, Optional

from jetfed.edge.agent import EdgeAgent, EdgeConfig
from jetfed.edge.errors import ProtocolError
from jetfed.edge.logs import log_event
from jetfed.edge.memlink import open_link
from jetfed.edge.telemetry.backends.detect import detect_backend
from jetfed.edge.topics import ANNOUNCEMENTS, announcement_experiment
from jetfed.edge.wire import Announcement, parse_message

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

    def _on_announcement(self, topic: str, payload: bytes) -> None:
        """paho thread: record or forget an experiment."""
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

    def _wait_for_experiment(self) -> Optional[str]:
        """Connect, read the live announcements, return the experiment to join (None: stopped)."""
        with self._lock:
            self._live.clear()
        link = open_link(
            self.config.broker,
            client_id=f"jetfed-edge-{self.config.device_id}",
            subscriptions=[ANNOUNCEMENTS],
        )
        link.on_topic(lambda topic: True, self._on_announcement)
        link.connect()
        try:
            log_event(
                logger,
                logging.INFO,
                "edge.waiting",
                device_id=self.config.device_id,
                broker=self.config.broker.url,
                listening=ANNOUNCEMENTS,
                experiment="any (not pinned: --experiment)",
            )
            while self._next_experiment() is None and not self._stop.is_set():
                self._changed.wait(1.0)
                self._changed.clear()
            return None if self._stop.is_set() else self._next_experiment()
        finally:
            link.close()

    def run(self, max_rounds: Optional[int] = None) -> None:
        """Serve experiments until stopped (or, with `max_rounds`, after the first one)."""
        config = self.config
        # A device that cannot measure what was asked says so now, not once a run is announced.
        detect_backend(config.telemetry, sysfs_root=config.sysfs_root).close()
        while not self._stop.is_set():
            experiment = self._wait_for_experiment()
            if experiment is None:
                return
            log_event(logger, logging.INFO, "experiment.joined", experiment=experiment)
            pinned = self.config.model_copy(update={"experiment": experiment})
            agent = EdgeAgent(pinned, follow=True)
            with self._lock:
                self._agent = agent
            if not self._stop.is_set():
                agent.run(max_rounds=max_rounds)
            with self._lock:
                self._agent = None
            if max_rounds is not None:
                return
