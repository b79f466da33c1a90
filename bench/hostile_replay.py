"""Replayed and mutated traffic against a real 2-device run.

A real Mosquitto, the coordinator and two edges as `jetfed` processes (LoRA on a 1-layer MiniLM,
real SST-2), and a third client that watches every message of the run and answers each with
hostile variants: exact duplicates, bit flips, truncations, copies on another device's topic or
on a stranger's (forged senders), copies held back and released out of order, every earlier
round's updates and hellos replayed when a new round starts, chunk indices `int()` refuses
(`²`, 4,400 digits), each update again with another base digest in the device's own name (its
nack must not make the honest device give up), a profile record claiming 2**70 bytes of RSS,
records from a device that never said hello, and a forged retained `offline` for a live
device. Coordinator messages are only duplicated: forging them needs the coordinator's account
(docs/SECURITY.md).

Invariants (`violations`): the coordinator exits 0 and never logs a crash; every round
aggregates exactly the two honest devices; every ack names the honest update of its (device,
round), and replayed accepted updates of closed rounds are re-acked; neither edge abandons or
fails a round; profiles.jsonl holds only records of devices that joined, all within the
schema's bounds, and the profile tables were written; the forged `offline` is answered by a
re-announcement; `round.closed_early offline=''` never appears.

`python -m bench hostile_replay [--quick]`; tests/test_hostile_replay.py runs the short
profile.
"""

from __future__ import annotations

import hashlib
import json
import queue
import random
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Set, Tuple

import paho.mqtt.client as mqtt

from bench.broker import private_mosquitto
from bench.runner import DEFAULT_DATASETS, table
from jetfed.edge.bounds import MAX_BYTES
from tests.fleet import jetfed, read_metrics, start_edges, stop, write_config

HONEST = ("dev-0", "dev-1")
GHOST = "ghost-7"
"""Never says hello: its copies of honest messages are forged senders, its records refused."""
CHUNK_MUTATIONS_PER_UPLOAD = 3
"""Below the coordinator's 16 rejected chunks per upload, after which an upload is refused."""
CRASH_MARKS = ("message.crashed", "internal_error", "Traceback", "profiles.tables_failed")


@dataclass(frozen=True)
class Profile:
    rounds: int
    variants_per_message: int
    seed: int = 0
    local_steps: int = 2
    """Per round: rounds long enough for the attacker's replay bursts to reach the coordinator
    while it still runs (on a fast machine a 2-step round ends before a burst is delivered)."""


SHORT = Profile(rounds=2, variants_per_message=1)
LONG = Profile(rounds=5, variants_per_message=3, seed=1, local_steps=100)


@dataclass
class Observed:
    """What the attacker saw and did; the invariants are checked against it."""

    honest_updates: Dict[Tuple[str, int], str] = field(default_factory=dict)
    """(device, round) → blob digest of the first update the device itself published."""
    acks: List[Tuple[str, int, str, float]] = field(default_factory=list)
    replayed_accepted: List[Tuple[str, int, str, float, str]] = field(default_factory=list)
    """(device, round, blob digest, when, probe) of accepted updates replayed in a later round;
    `probe` names the message sent right after that replay burst."""
    probes_answered: Set[str] = field(default_factory=set)
    """Probes the coordinator nacked: it handled everything sent before them (one connection,
    one inbox, in order), so each replay of their burst must have been re-acked; a burst whose
    probe went unanswered reached a coordinator that had finished its run, and owes nothing."""
    offline_forged_s: Optional[float] = None
    reannounced: Set[str] = field(default_factory=set)
    sent: Counter[str] = field(default_factory=Counter)


class Attacker:
    """A client on the broker that captures everything and sends hostile variants back."""

    def __init__(self, broker_url: str, experiment: str, profile: Profile) -> None:
        self.root = f"jetfed/{experiment}"
        self.profile = profile
        self.rng = random.Random(profile.seed)
        self.observed = Observed()
        self._inbox: queue.Queue[Tuple[str, bytes]] = queue.Queue()
        self._mine: Counter[str] = Counter()
        self._held: List[Tuple[str, bytes]] = []
        self._captured: List[Tuple[str, bytes]] = []
        self._updates: List[Tuple[str, bytes]] = []
        self._probes: Dict[str, bytes] = {}
        self._chunk_mutations: Counter[Tuple[str, str]] = Counter()
        self._rounds_seen: Set[int] = set()
        self._pulled: Set[Tuple[str, str]] = set()
        self._stop = threading.Event()
        host, port = broker_url.removeprefix("mqtt://").split(":")
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id="attacker", protocol=mqtt.MQTTv311
        )
        self.client.on_message = lambda c, u, m: self._inbox.put((m.topic, bytes(m.payload)))
        self.client.connect(host, int(port))
        self.client.subscribe(f"{self.root}/#", qos=1)
        self.client.loop_start()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.client.disconnect()
        self.client.loop_stop()

    # ------------------------------------------------------------------ sending

    def _send(self, kind: str, topic: str, payload: bytes, retain: bool = False) -> None:
        self._mine[_key(topic, payload)] += 1
        self.observed.sent[kind] += 1
        self.client.publish(topic, payload, qos=1, retain=retain)

    def _device_topic(self, device_id: str, leaf: str) -> str:
        return f"{self.root}/devices/{device_id}/{leaf}"

    # ------------------------------------------------------------------ reacting

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                topic, payload = self._inbox.get(timeout=0.1)
            except queue.Empty:
                continue
            key = _key(topic, payload)
            if self._mine[key]:
                self._mine[key] -= 1
                continue
            self._react(topic, payload)

    def _react(self, topic: str, payload: bytes) -> None:
        if topic == f"{self.root}/task":
            self._on_task(payload)
            return
        parts = topic[len(self.root) + 1 :].split("/")
        if len(parts) < 3 or parts[0] != "devices" or parts[1] not in HONEST:
            return
        device_id, leaf, rest = parts[1], parts[2], parts[3:]
        if leaf == "ack":
            ack = json.loads(payload)
            self.observed.acks.append((device_id, ack["round_index"], ack["digest"], time.time()))
            self._first_ack(device_id)
        if leaf == "nack" and json.loads(payload).get("digest") in self._probes:
            self.observed.probes_answered.add(json.loads(payload)["digest"])
        if leaf == "pull":
            self._bad_indices(device_id, json.loads(payload)["digest"])
        if leaf in ("ack", "nack", "down", "pull"):  # the coordinator's: duplicates only
            self._send("duplicate", topic, payload)
            return
        if leaf == "update":
            update = json.loads(payload)
            key = (device_id, update["round_index"])
            if key not in self.observed.honest_updates:
                self.observed.honest_updates[key] = update["blob"]["digest"]
                if device_id == "dev-0":
                    self._updates.append((topic, payload))
                refused = dict(update, base_digest="0" * 64)
                self._send("forged_refused", topic, json.dumps(refused).encode())
        if leaf == "hello" and self.observed.offline_forged_s is not None and device_id == "dev-0":
            self.observed.reannounced.add(device_id)
        if leaf == "up":
            self._on_chunk(topic, payload, device_id, rest)
            return
        if leaf == "profile":
            self._hostile_profiles(device_id, payload)
        self._captured.append((topic, payload))
        for _ in range(self.profile.variants_per_message):
            self._variant(topic, payload, device_id, leaf)
        self._held.append((topic, payload))

    def _variant(self, topic: str, payload: bytes, device_id: str, leaf: str) -> None:
        kind = self.rng.choice(["duplicate", "bit_flip", "truncation", "forged_other", "forged"])
        if kind == "duplicate":
            self._send(kind, topic, payload)
        elif kind == "bit_flip" and payload:
            flipped = bytearray(payload)
            flipped[self.rng.randrange(len(flipped))] ^= 1 << self.rng.randrange(8)
            self._send(kind, topic, bytes(flipped))
        elif kind == "truncation":
            self._send(kind, topic, payload[: self.rng.randrange(max(1, len(payload)))])
        elif kind == "forged_other":
            other = HONEST[1 - HONEST.index(device_id)]
            self._send(kind, self._device_topic(other, leaf), payload)
        else:
            self._send(kind, self._device_topic(GHOST, leaf), payload)

    def _on_chunk(self, topic: str, payload: bytes, device_id: str, rest: List[str]) -> None:
        """Chunks of an upload: a few duplicates and corrupt copies (each is re-asked)."""
        if len(rest) != 2:
            return
        digest = rest[0]
        if self._chunk_mutations[(device_id, digest)] >= CHUNK_MUTATIONS_PER_UPLOAD:
            return
        self._chunk_mutations[(device_id, digest)] += 1
        self._send("duplicate", topic, payload)
        if payload:
            flipped = bytearray(payload)
            flipped[self.rng.randrange(len(flipped))] ^= 0x10
            self._send("bit_flip", topic, bytes(flipped))

    def _bad_indices(self, device_id: str, digest: str) -> None:
        """While the coordinator pulls an upload (its transfer is active): chunk indices that
        `str.isdigit` takes but `int` does not, or only slowly."""
        if (device_id, digest) in self._pulled:
            return
        self._pulled.add((device_id, digest))
        prefix = self._device_topic(device_id, f"up/{digest}")
        self._send("bad_index", f"{prefix}/²", b"x")
        self._send("bad_index", f"{prefix}/{'9' * 4400}", b"x")

    def _hostile_profiles(self, device_id: str, payload: bytes) -> None:
        """A record with 2**70 bytes of RSS in the device's own name, and the device's records
        re-sent as a device that never said hello."""
        try:
            batch = json.loads(payload)
            records = batch["records"]
        except (ValueError, KeyError, TypeError):
            return
        if not records:
            return
        huge = dict(records[0], peak_rss_bytes=2**70, start_unix_s=records[0]["start_unix_s"] + 1)
        self._send(
            "huge_number",
            self._device_topic(device_id, "profile"),
            json.dumps({**batch, "records": [huge]}).encode(),
        )
        ghost = {
            **batch,
            "device_id": GHOST,
            "records": [dict(r, device_id=GHOST) for r in records],
        }
        self._send(
            "never_said_hello", self._device_topic(GHOST, "profile"), json.dumps(ghost).encode()
        )

    def _probe(self, round_index: int) -> str:
        """An update in dev-0's name for a blob nobody sent (the coordinator refuses it, naming
        its digest): its nack says the replays sent before it were handled."""
        earlier = [u for u in self._updates if json.loads(u[1])["round_index"] < round_index]
        if not earlier:
            return ""
        update = json.loads(earlier[-1][1])
        update["blob"] = dict(update["blob"], digest=f"{round_index:064x}")
        payload = json.dumps(update).encode()
        digest = hashlib.sha256(payload).hexdigest()
        self._probes[digest] = payload
        return digest

    def _first_ack(self, device_id: str) -> None:
        """Once: report dev-0 offline (retained), as a stale last will or a forger would."""
        if device_id == "dev-0" and self.observed.offline_forged_s is None:
            self.observed.offline_forged_s = time.time()
            self._send("forged_offline", self._device_topic("dev-0", "status"), b"offline", True)

    def _on_task(self, payload: bytes) -> None:
        """A new round: replay the earlier rounds' traffic (updates, hellos, profiles) and
        release the held-back messages in a shuffled order."""
        if not payload:
            return
        self._send("duplicate", f"{self.root}/task", payload)
        round_index = json.loads(payload)["round_index"]
        if round_index in self._rounds_seen:
            return
        self._rounds_seen.add(round_index)
        probe = self._probe(round_index)
        for (device_id, earlier), digest in list(self.observed.honest_updates.items()):
            if earlier < round_index:
                self.observed.replayed_accepted.append(
                    (device_id, earlier, digest, time.time(), probe)
                )
        for topic, captured in self._captured:
            self._send("cross_round_replay", topic, captured)
        if probe:
            self._send("probe", self._device_topic("dev-0", "update"), self._probes[probe])
        held, self._held = self._held, []
        self.rng.shuffle(held)
        for topic, captured in held:
            self._send("reordered", topic, captured)


def _key(topic: str, payload: bytes) -> str:
    return hashlib.sha256(topic.encode() + b"\x00" + payload).hexdigest()


def violations(
    run_dir: Path, coordinator_rc: int, coord_log: str, edge_logs: Dict[str, str], seen: Observed
) -> List[str]:
    """Every broken invariant, in words (empty: the run withstood the traffic)."""
    found: List[str] = []
    if coordinator_rc != 0:
        found.append(f"coordinator exited {coordinator_rc}")
    found += [f"coordinator logged {mark}" for mark in CRASH_MARKS if mark in coord_log]
    if "offline=''" in coord_log or "offline= " in coord_log:
        found.append("round.closed_early with nobody offline")
    metrics = read_metrics(run_dir)
    for m in metrics:
        if m["status"] != "aggregated" or m["devices"] != list(HONEST) or m["num_aggregated"] != 2:
            found.append(f"round {m['round_index']}: {m['status']} of {m['devices']}")
    for device_id, round_index, digest, _ in seen.acks:
        honest = seen.honest_updates.get((device_id, round_index))
        if digest != honest:
            found.append(f"ack for {device_id} round {round_index} names {digest[:12]}")
    for device_id, round_index, digest, replayed_s, probe in seen.replayed_accepted:
        if probe not in seen.probes_answered:
            continue
        if not any(
            a[:3] == (device_id, round_index, digest) and a[3] >= replayed_s for a in seen.acks
        ):
            found.append(f"replayed accepted update {device_id}/{round_index} was not re-acked")
    for device_id, log in edge_logs.items():
        for mark in ("round.abandoned", "round.failed", "Traceback"):
            if mark in log:
                found.append(f"{device_id} logged {mark}")
    found += _profile_violations(run_dir)
    if seen.offline_forged_s is not None and "dev-0" not in seen.reannounced:
        found.append("dev-0 did not re-announce after the forged offline")
    return found


def _profile_violations(run_dir: Path) -> List[str]:
    found = []
    path = run_dir / "profiles.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    strangers = {row["device_id"] for row in rows} - set(HONEST)
    if strangers:
        found.append(f"profiles.jsonl holds records of {sorted(strangers)}")
    if any((row.get("peak_rss_bytes") or 0) > MAX_BYTES for row in rows):
        found.append("profiles.jsonl holds an out-of-range peak_rss_bytes")
    if not (run_dir / "profiles.csv").exists():
        found.append("profiles.csv was not written")
    return found


@dataclass
class Outcome:
    violations: List[str]
    sent: Dict[str, int]
    replays_checked: int
    """Replays of accepted updates whose burst the coordinator handled (its probe answered)."""
    replays_total: int
    rounds: int
    wall_s: float


def run_hostile_replay(workdir: Path, datasets: Path, profile: Profile) -> Outcome:
    """One run under attack; the coordinator's and edges' logs stay in `workdir`."""
    name = "hostile-replay"
    config = write_config(
        workdir,
        name,
        "lora",
        datasets / "sst2",
        rounds=profile.rounds,
        model={"num_hidden_layers": 1},
        training={"local_steps": profile.local_steps},
        transfer={"chunk_size_bytes": 16 << 10, "retry_after_s": 1.0},
    )
    started = time.monotonic()
    with private_mosquitto() as broker:
        attacker = Attacker(broker.url, name, profile)
        coord_log = workdir / "coordinator.log"
        coordinator = jetfed(
            "-v", "coordinator", "run", str(config), "--broker", broker.url, log=coord_log
        )
        edges = start_edges(broker.url, name, datasets / "sst2", len(HONEST), workdir / "edges")
        try:
            rc = coordinator.wait(timeout=600)
        finally:
            stop([coordinator, *edges])
            attacker.close()
    edge_logs = {d: (workdir / "edges" / f"{d}.log").read_text(errors="replace") for d in HONEST}
    found = violations(
        workdir / "runs" / name,
        rc,
        coord_log.read_text(errors="replace"),
        edge_logs,
        attacker.observed,
    )
    seen = attacker.observed
    return Outcome(
        found,
        dict(seen.sent),
        sum(entry[4] in seen.probes_answered for entry in seen.replayed_accepted),
        len(seen.replayed_accepted),
        len(read_metrics(workdir / "runs" / name)),
        time.monotonic() - started,
    )


def run(quick: bool, datasets: Path = DEFAULT_DATASETS) -> Dict[str, Any]:
    profile = SHORT if quick else LONG
    with tempfile.TemporaryDirectory(prefix="jetfed-hostile-") as tmp:
        outcome = run_hostile_replay(Path(tmp), datasets, profile)
    return {
        "rounds": profile.rounds,
        "variants_per_message": profile.variants_per_message,
        "rounds_completed": outcome.rounds,
        "hostile_messages": outcome.sent,
        "violations": outcome.violations,
        "replays_checked": outcome.replays_checked,
        "replays_of_accepted_updates": outcome.replays_total,
        "wall_s": outcome.wall_s,
    }


def markdown(results: Dict[str, Any]) -> str:
    sent = results["hostile_messages"]
    lines = [
        f"{results['rounds_completed']} of {results['rounds']} rounds completed in "
        f"{results['wall_s']:.0f} s under {sum(sent.values())} hostile messages "
        f"({results['variants_per_message']} variant(s) per captured message); "
        f"{len(results['violations'])} invariant violations. Replays of accepted updates the "
        f"coordinator handled (each burst's probe answered), all of which must be re-acked: "
        f"{results['replays_checked']} of {results['replays_of_accepted_updates']}.",
        "",
        table(["variant", "messages"], [[kind, count] for kind, count in sorted(sent.items())]),
    ]
    lines += [f"- VIOLATION: {v}" for v in results["violations"]]
    return "\n".join(lines)
