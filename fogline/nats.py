"""Start and stop a private NATS server whose MQTT listener stands in for Mosquitto."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from fogline.broker import Broker, BrokerError, find_free_port

__all__ = ["NatsBroker", "find_nats_server", "read_monitor", "server_version"]

_INSTALL_HINT = (
    "install it with `apt-get install nats-server`, or put the `nats-server` binary of a release "
    "from https://github.com/nats-io/nats-server/releases (2.2 or newer) on PATH"
)
_SBIN_DIRS = ("/usr/sbin", "/usr/local/sbin")
# The MQTT listener exists since 2.2; earlier servers reject the `mqtt` block.
_MIN_VERSION = (2, 2)


def find_nats_server() -> str:
    """Return the path of the `nats-server` binary (PATH first, then the sbin folders)."""
    found = shutil.which("nats-server")
    if not found:
        for folder in _SBIN_DIRS:
            candidate = Path(folder) / "nats-server"
            if candidate.is_file() and os.access(candidate, os.X_OK):
                found = str(candidate)
                break
    if not found:
        raise BrokerError(
            f"nats-server not found on PATH or in {', '.join(_SBIN_DIRS)}; {_INSTALL_HINT}"
        )
    version = server_version(found)
    if version is not None and version < _MIN_VERSION:
        shown = ".".join(map(str, version))
        raise BrokerError(f"{found} is nats-server {shown}, which has no MQTT; {_INSTALL_HINT}")
    return found


def server_version(binary: str) -> tuple[int, ...] | None:
    """The version of a nats-server binary as numbers, e.g. (2, 9, 10); None if it does not say."""
    try:
        out = subprocess.run(
            [binary, "--version"], capture_output=True, text=True, timeout=10
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r"v?(\d+)\.(\d+)\.(\d+)", out)
    return tuple(int(x) for x in m.groups()) if m else None


def read_monitor(base_url: str, endpoint: str, *, timeout: float = 5.0) -> dict[str, Any]:
    """The JSON of a nats-server monitoring endpoint, e.g. `varz` under `http://host:port`."""
    url = f"{base_url.rstrip('/')}/{endpoint.lstrip('/')}"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return dict(json.loads(resp.read()))
    except (OSError, urllib.error.URLError, ValueError) as exc:
        raise BrokerError(f"cannot read {url}: {exc}") from exc


class NatsBroker(Broker):
    """A nats-server with JetStream and an MQTT listener on `host:port`, in its own data folder.

    `port` is the MQTT port, so the fogline processes use it exactly like a Mosquitto one. The
    server also listens for NATS clients on `client_port` and serves its monitoring endpoints
    (`/varz`, `/connz`, `/jsz`) on `http_port`, all on `host`.
    """

    product = "nats-server"

    def __init__(
        self,
        *,
        data_dir: Path,
        host: str = "127.0.0.1",
        port: int | None = None,
        server_name: str = "fogline-nats",
        max_payload: str = "4MB",
        max_ack_pending: int = 10_000,
        ack_wait: str = "60s",
    ) -> None:
        super().__init__(data_dir=data_dir, host=host, port=port, template="nats")
        self.conf_path = self.data_dir / "nats.conf"
        self.log_path = self.data_dir / "nats.log"
        #: Where JetStream keeps the MQTT sessions, queued QoS 1 and retained messages.
        self.store_dir = self.data_dir / "jetstream"
        self.server_name = server_name
        self.max_payload = max_payload
        self.max_ack_pending = max_ack_pending
        self.ack_wait = ack_wait
        self.client_port = find_free_port(host)
        self.http_port = find_free_port(host)

    def __repr__(self) -> str:
        state = "running" if self.is_running() else "stopped"
        return f"<NatsBroker {self.url} {state} data_dir={self.data_dir}>"

    @property
    def monitor_url(self) -> str:
        """The base URL of the server's HTTP monitoring endpoints."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.http_port}"

    def render(self) -> Path:
        """Write the nats-server config into `conf_path` and return that path."""
        if not 1 <= self.max_ack_pending <= 65535:
            raise BrokerError(f"max_ack_pending {self.max_ack_pending} must be in 1..65535")
        q = json.dumps  # a double-quoted string is valid NATS config syntax
        host = self.host
        text = f"""\
# fogline NATS broker, rendered by fogline.nats.NatsBroker; do not edit (it is rewritten).
# MQTT in NATS needs JetStream (sessions, QoS 1 messages and retained messages are streams)
# and a server name.
server_name: {q(self.server_name)}
listen: {q(f"{host}:{self.client_port}")}
http: {q(f"{host}:{self.http_port}")}

# Custody batches are at most 256 KiB plus the envelope; the default of 1 MB would do, but
# leave room for larger payloads (NATS warns above 8 MB).
max_payload: {self.max_payload}

# The server keeps its streams in STORE_DIR/jetstream.
jetstream {{
  store_dir: {q(str(self.data_dir))}
  max_memory_store: 256MB
  max_file_store: 4GB
}}

mqtt {{
  listen: {q(f"{host}:{self.port}")}
  # QoS 1 messages a session may hold unacknowledged. The default of 1024 throttles an edge
  # that acknowledges telemetry only after committing it; 65535 is the server's maximum.
  max_ack_pending: {self.max_ack_pending}
  # Redeliver an unacknowledged QoS 1 message after this long (default 30s); an edge with a
  # backlog must not get duplicates of messages it simply has not reached yet.
  ack_wait: {q(self.ack_wait)}
}}
"""
        self.conf_path.write_text(text)
        return self.conf_path

    def monitor(self, endpoint: str, timeout: float = 5.0) -> dict[str, Any]:
        """GET a monitoring endpoint such as `varz`, `connz?state=any` or `jsz?streams=true`."""
        return read_monitor(self.monitor_url, endpoint, timeout=timeout)

    def _binary(self) -> str:
        return find_nats_server()

    def _new_ports(self) -> None:
        # The error does not always say which listener lost its port: replace all of them.
        self.port = find_free_port(self.host)
        self.client_port = find_free_port(self.host)
        self.http_port = find_free_port(self.host)
