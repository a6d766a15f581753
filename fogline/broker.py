"""Start and stop a private Mosquitto broker rendered from a `mosquitto/` config template."""

from __future__ import annotations

import atexit
import itertools
import logging
import os
import pwd
import shutil
import signal
import socket
import string
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import paho.mqtt.client as mqtt

from fogline.errors import FoglineError
from fogline.topics import DEFAULT_ROOT

log = logging.getLogger(__name__)

__all__ = ["Broker", "BrokerError", "find_free_port", "find_mosquitto", "templates_dir"]

_INSTALL_HINT = (
    "install it with `apt-get install mosquitto mosquitto-clients` "
    "(or run `make test`, which does it when run as root)"
)
_SBIN_DIRS = ("/usr/sbin", "/usr/local/sbin")
_BUILTIN_KEYS = frozenset({"host", "port", "data_dir", "log_file", "user"})
_PORT_RETRIES = 5
_LOG_TAIL_LINES = 15
_probe_ids = itertools.count(1)
# Started brokers are held here until stopped, so one still running at interpreter exit (a
# crashed test, a forgotten stop) is stopped then instead of being orphaned.
_live: set[Broker] = set()


class BrokerError(FoglineError):
    """A broker could not be found, configured, started or stopped; the message says what to do."""

    def __init__(self, message: str, *, log_tail: str = "") -> None:
        full = (
            f"{message}\n--- last lines of the broker log ---\n{log_tail}" if log_tail else message
        )
        super().__init__(full)
        self.log_tail = log_tail


def find_free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port on `host` that is free right now (it may be taken again before use)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def find_mosquitto() -> str:
    """Return the path of the `mosquitto` binary (PATH first, then the sbin folders)."""
    found = shutil.which("mosquitto")
    if found:
        return found
    for folder in _SBIN_DIRS:
        candidate = Path(folder) / "mosquitto"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    raise BrokerError(f"mosquitto not found on PATH or in {', '.join(_SBIN_DIRS)}; {_INSTALL_HINT}")


def templates_dir() -> Path:
    """Return the top-level `mosquitto/` folder of the source tree that holds the templates."""
    folder = Path(__file__).resolve().parents[1] / "mosquitto"
    if not folder.is_dir():
        raise BrokerError(
            f"config template folder {folder} is missing; run fogline from a source checkout "
            "(pip install -e .) so the top-level mosquitto/ folder is present"
        )
    return folder


def _current_user() -> str:
    # Mosquitto started as root drops to the `mosquitto` user unless told otherwise, and then
    # cannot write the persistence files in our data dir; for non-root the setting is ignored.
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return "root" if os.geteuid() == 0 else str(os.geteuid())


def _probe_host(host: str) -> str:
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "::1"
    return host


class Broker:
    """A Mosquitto process on its own port and data folder, for tests, demos and local runs."""

    #: The broker program, as named in log lines and errors (subclasses run other brokers).
    product = "mosquitto"

    def __init__(
        self,
        *,
        data_dir: Path,
        host: str = "127.0.0.1",
        port: int | None = None,
        template: str = "dev",
        extra: dict[str, str] | None = None,
    ) -> None:
        clash = _BUILTIN_KEYS & set(extra or {})
        if clash:
            raise BrokerError(
                f"extra placeholder(s) {sorted(clash)} clash with built-in ones; "
                "pass host=/port=/data_dir= to Broker instead"
            )
        self.data_dir = Path(data_dir).resolve()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.host = host
        self._auto_port = port is None
        self.port = find_free_port(host) if port is None else port
        self.template = template
        self.extra = dict(extra or {})
        self.conf_path = self.data_dir / "mosquitto.conf"
        self.log_path = self.data_dir / "mosquitto.log"
        self.pid: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        #: TLS and login of the readiness probe (set by `render` for the secure template).
        self._probe_security: dict[str, Any] = {}

    def __repr__(self) -> str:
        state = "running" if self.is_running() else "stopped"
        return f"<Broker {self.url} {state} data_dir={self.data_dir}>"

    @property
    def url(self) -> str:
        """The broker address as `mqtt://host:port`."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"mqtt://{host}:{self.port}"

    def is_running(self) -> bool:
        """Return True while the broker process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def render(self) -> Path:
        """Render the template into `conf_path` and return that path."""
        tmpl_path = templates_dir() / f"{self.template}.conf.tmpl"
        if not tmpl_path.is_file():
            known = sorted(
                p.name.removesuffix(".conf.tmpl") for p in tmpl_path.parent.glob("*.conf.tmpl")
            )
            raise BrokerError(
                f"broker template {tmpl_path} not found; use one of {known} as template="
            )
        values = {
            **self.extra,
            "host": self.host,
            "port": str(self.port),
            "data_dir": str(self.data_dir),
            "log_file": str(self.log_path),
            "user": _current_user(),
        }
        if self.template == "secure":
            values = {**self._secure_values(), **values}
        try:
            text = string.Template(tmpl_path.read_text()).substitute(values)
        except KeyError as exc:
            raise BrokerError(
                f"template {tmpl_path} uses unknown placeholder ${{{exc.args[0]}}}; "
                f"known: {sorted(values)} (pass more with extra=)"
            ) from exc
        except ValueError as exc:
            raise BrokerError(
                f"template {tmpl_path} is malformed ({exc}); write a literal $ as $$"
            ) from exc
        self.conf_path.write_text(text)
        return self.conf_path

    def _secure_values(self) -> dict[str, str]:
        """Write the password file and ACL of the secure template from `extra["keys_dir"]`.

        Optional extras: `topic_root` (default `fl/v1`) and `broker_name` (default `broker`, the
        credential whose certificate the broker serves and whose login its probe uses).
        """
        # Imported here: only the secure template needs cryptography.
        from fogline import keys
        from fogline.security import write_broker_files

        if not self.extra.get("keys_dir"):
            raise BrokerError('the secure template needs extra={"keys_dir": ...}')
        folder = Path(self.extra["keys_dir"]).resolve()
        name = self.extra.get("broker_name", keys.BROKER)
        try:
            me = keys.credential(folder, name)
            creds = keys.credentials(folder)
            acl_template = (templates_dir() / "acl.tmpl").read_text()
            passwd, acl = write_broker_files(
                creds,
                self.data_dir,
                acl_template=acl_template,
                root=self.extra.get("topic_root", DEFAULT_ROOT),
            )
        except (FoglineError, OSError) as exc:
            raise BrokerError(f"cannot prepare the secure broker from {folder}: {exc}") from exc
        self._probe_security = {
            "ca": folder / "ca.crt",
            "cert": me.cert,
            "key": me.key,
            "username": me.name,
            "password_file": me.password_file,
        }
        values = {
            "cafile": str(folder / "ca.crt"),
            "certfile": str(me.cert),
            "keyfile": str(me.key),
            "password_file": str(passwd),
            "acl_file": str(acl),
        }
        return {k: v for k, v in values.items() if k not in self.extra}

    def start(self, timeout: float = 10.0) -> Broker:
        """Start the broker and wait until it accepts an MQTT connection; return self."""
        if self.is_running():
            return self
        binary = self._binary()
        deadline = time.monotonic() + timeout
        for attempt in itertools.count(1):
            self.render()
            offset = self.log_path.stat().st_size if self.log_path.exists() else 0
            self._spawn(binary)
            outcome = self._wait_ready(deadline)
            if outcome == "ready":
                log.info("%s started at %s (pid %s)", self.product, self.url, self.pid)
                return self
            tail = self._log_tail(offset)
            if outcome == "timeout":
                self.stop()
                raise BrokerError(
                    f"{self.product} at {self.url} did not accept an MQTT connection within "
                    f"{timeout:.1f}s; check {self.log_path}",
                    log_tail=tail,
                )
            code = self._proc.returncode if self._proc else None
            self.stop()  # reap it and forget it
            # Mosquitto says "Address already in use", nats-server "address already in use".
            in_use = "address already in use" in tail.lower()
            if in_use and self._auto_port and attempt < _PORT_RETRIES:
                old = self.port
                self._new_ports()
                log.info(
                    "port %d was taken before %s bound it; retrying on %d",
                    old,
                    self.product,
                    self.port,
                )
                continue
            hint = (
                f"port {self.port} is in use; choose another port or pass port=None"
                if in_use
                else f"see {self.log_path} and the rendered config {self.conf_path}"
            )
            raise BrokerError(
                f"{self.product} exited with code {code} during start-up; {hint}",
                log_tail=tail,
            )
        raise AssertionError("unreachable")  # pragma: no cover

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the broker with SIGTERM (SIGKILL after `timeout`); safe to call repeatedly."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning(
                    "%s pid %d ignored SIGTERM for %.1fs; killing it",
                    self.product,
                    proc.pid,
                    timeout,
                )
                proc.kill()
                proc.wait()
            log.info("%s at %s stopped", self.product, self.url)
        self._proc = None
        _live.discard(self)

    def kill(self) -> None:
        """Kill the broker with SIGKILL, without letting it save its state (for chaos tests)."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
            proc.wait()
            log.info("%s at %s killed", self.product, self.url)
        self._proc = None
        _live.discard(self)

    def __enter__(self) -> Broker:
        if not self.is_running():
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _binary(self) -> str:
        """The broker program to run as `BINARY -c CONF_PATH`."""
        return find_mosquitto()

    def _new_ports(self) -> None:
        """Pick new free ports after losing a race for one during start-up."""
        self.port = find_free_port(self.host)

    def _spawn(self, binary: str) -> None:
        with self.log_path.open("ab") as log_file:
            # A new session keeps a terminal Ctrl-C from killing the broker before the pipeline
            # processes have flushed through it; we stop it ourselves (and at exit).
            self._proc = subprocess.Popen(
                [binary, "-c", str(self.conf_path)],
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                cwd=self.data_dir,
                start_new_session=True,
            )
        self.pid = self._proc.pid
        _live.add(self)

    def _wait_ready(self, deadline: float) -> Literal["ready", "exited", "timeout"]:
        """Poll until an MQTT CONNECT succeeds, the process exits or the deadline passes."""
        assert self._proc is not None
        while True:
            if self._proc.poll() is not None:
                self._proc.wait()
                return "exited"
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return "timeout"
            if self._mqtt_connects(min(remaining, 1.0)):
                return "ready"
            time.sleep(0.02)

    def _mqtt_connects(self, timeout: float) -> bool:
        ok: list[bool] = []

        def on_connect(
            client: mqtt.Client,
            userdata: object,
            flags: mqtt.ConnectFlags,
            reason_code: mqtt.ReasonCode,
            properties: mqtt.Properties | None,
        ) -> None:
            ok.append(not reason_code.is_failure)

        client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=f"fogline-broker-probe-{os.getpid()}-{next(_probe_ids)}",
        )
        client.on_connect = on_connect
        client.connect_timeout = timeout
        if self._probe_security:
            from fogline.security import apply_client_security

            apply_client_security(client, **self._probe_security)
        try:
            client.connect(_probe_host(self.host), self.port, keepalive=10)
            end = time.monotonic() + timeout
            while not ok and time.monotonic() < end:
                # Something else may own the port (we lost a race for it): stop probing as soon
                # as our broker exits instead of waiting for a CONNACK that will never come.
                if self._proc is None or self._proc.poll() is not None:
                    break
                if client.loop(timeout=0.05) != mqtt.MQTT_ERR_SUCCESS:
                    break
            if ok and ok[0]:
                client.disconnect()
                client.loop(timeout=0.05)  # writes the DISCONNECT so the broker logs a clean exit
                return True
            return False
        except OSError:
            return False
        finally:
            sock = client.socket()
            if sock is not None:
                sock.close()

    def _log_tail(self, offset: int) -> str:
        try:
            with self.log_path.open("rb") as fh:
                fh.seek(offset)
                data = fh.read()
        except OSError:
            return ""
        lines = data.decode("utf-8", "replace").splitlines()
        return "\n".join(lines[-_LOG_TAIL_LINES:])


@atexit.register
def _stop_all() -> None:
    for broker in list(_live):
        try:
            broker.stop(timeout=2.0)
        except Exception:  # at exit, one broker's failure must not leave the others running
            log.exception("could not stop %r at exit", broker)
