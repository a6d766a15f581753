"""Payload encryption of telemetry (device -> edge): ChaCha20-Poly1305 with per-device keys.

Each device has one or more random 32-byte keys, each named by a key id `<device>.<n>` and kept
in `<keys dir>/aead/<device>.<n>.key` (`0600`, the raw 32 bytes). Keys are never derived from a
passphrase: `provision` draws them from the OS random source. A device seals with its newest key;
an edge accepts every key it holds, so a rotation (`fogline keys devices --rotate`) is seamless
and an old key stops working when its file is removed.

The associated data binds a ciphertext to where it belongs: `f"{src}|{seq}|{topic}|{key_id}"`.
Moving a sealed body to another topic, device or message number makes it fail authentication.
The nonce is 12 random bytes per message (never a counter: the simulator restarts its counters).
"""

from __future__ import annotations

import functools
import os
import re
import secrets
import statistics
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from fogline import codec
from fogline.codec import Envelope, Sealed, Telemetry
from fogline.errors import DecodeError, FoglineError

__all__ = [
    "AEAD_DIR",
    "ALGORITHM",
    "KEY_BYTES",
    "NONCE_BYTES",
    "KeyStore",
    "associated_data",
    "bench_cost",
    "default_dir",
    "open_",
    "open_telemetry",
    "provision",
    "seal",
    "seal_telemetry",
]

ALGORITHM = "ChaCha20-Poly1305"
KEY_BYTES = 32
NONCE_BYTES = 12
AEAD_DIR = "aead"
_KEY_FILE = re.compile(r"([A-Za-z0-9_-][A-Za-z0-9_.-]{0,53})\.([1-9][0-9]{0,8})\.key")


def default_dir(keys_dir: Path) -> Path:
    """The folder of device keys inside a key folder."""
    return keys_dir / AEAD_DIR


def associated_data(*, src: str, seq: int, topic: str, key_id: str) -> bytes:
    """The associated data a telemetry body is bound to."""
    return f"{src}|{seq}|{topic}|{key_id}".encode()


@functools.lru_cache(maxsize=65536)
def _cipher(key: bytes) -> ChaCha20Poly1305:
    """The cipher of a key, made once: setting one up costs about as much as sealing a message."""
    return ChaCha20Poly1305(key)


def seal(
    key: bytes, plaintext: bytes, *, src: str, seq: int, topic: str, key_id: str
) -> tuple[bytes, bytes]:
    """Encrypt and authenticate `plaintext`; return `(nonce, ciphertext)` (tag included)."""
    nonce = os.urandom(NONCE_BYTES)
    ad = associated_data(src=src, seq=seq, topic=topic, key_id=key_id)
    return nonce, _cipher(key).encrypt(nonce, plaintext, ad)


def open_(
    key: bytes, nonce: bytes, ciphertext: bytes, *, src: str, seq: int, topic: str, key_id: str
) -> bytes:
    """Authenticate and decrypt; a wrong key, nonce, ciphertext or context raises `bad_tag`."""
    ad = associated_data(src=src, seq=seq, topic=topic, key_id=key_id)
    try:
        return _cipher(key).decrypt(nonce, ciphertext, ad)
    except (InvalidTag, ValueError) as exc:
        raise DecodeError("bad_tag", f"authentication failed for key {key_id!r}") from exc


class KeyStore:
    """The device keys of one folder, by key id; `refresh()` picks up rotations and removals."""

    def __init__(self, folder: Path, *, keys: dict[str, bytes] | None = None) -> None:
        self.folder = Path(folder)
        self.keys: dict[str, bytes] = dict(keys or {})
        self._stamp: int | None = None
        if keys is None:
            self.reload()

    def reload(self) -> None:
        """Read every `<device>.<n>.key` of the folder (a missing folder holds no keys)."""
        keys: dict[str, bytes] = {}
        try:
            self._stamp = self.folder.stat().st_mtime_ns
            paths = list(self.folder.iterdir())
        except FileNotFoundError:
            self._stamp, paths = None, []
        except OSError as exc:
            raise FoglineError(f"cannot read the key folder {self.folder}: {exc}") from exc
        for path in paths:
            if not _KEY_FILE.fullmatch(path.name):
                continue
            try:
                data = path.read_bytes()
            except OSError as exc:
                raise FoglineError(f"cannot read the key {path}: {exc.strerror}") from exc
            if len(data) != KEY_BYTES:
                raise FoglineError(f"{path} holds {len(data)} bytes, not a {KEY_BYTES}-byte key")
            keys[path.name.removesuffix(".key")] = data
        self.keys = keys

    def refresh(self) -> bool:
        """Reload if the folder changed since the last read; return whether it did."""
        try:
            stamp: int | None = self.folder.stat().st_mtime_ns
        except FileNotFoundError:
            stamp = None
        if stamp == self._stamp:
            return False
        self.reload()
        return True

    def get(self, key_id: str, *, device: str | None = None) -> bytes:
        """The key `key_id` (of `device` when given), or DecodeError `unknown_key`."""
        key = self.keys.get(key_id)
        if key is None or (device is not None and _device_of(key_id) != device):
            owner = f" of device {device!r}" if device is not None else ""
            raise DecodeError("unknown_key", f"no key {key_id!r}{owner} in {self.folder}")
        return key

    def key_ids(self, device: str) -> list[str]:
        """The key ids of `device`, oldest first."""
        ids = [k for k in self.keys if _device_of(k) == device]
        return sorted(ids, key=_number)

    def newest(self, device: str) -> tuple[str, bytes]:
        """The key id and key `device` seals with (its highest number)."""
        ids = self.key_ids(device)
        if not ids:
            raise FoglineError(
                f"no key for device {device!r} in {self.folder};"
                " run `fogline keys devices --devices N`"
            )
        return ids[-1], self.keys[ids[-1]]


def _device_of(key_id: str) -> str:
    return key_id.rpartition(".")[0]


def _number(key_id: str) -> int:
    return int(key_id.rpartition(".")[2])


def provision(folder: Path, devices: Iterable[str], *, rotate: bool = False) -> list[Path]:
    """Give each device a random key unless it has one; `rotate` adds a newer key to each.

    Older keys are kept (still accepted by edges) until their files are removed.
    """
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o700)
    store = KeyStore(folder)
    written: list[Path] = []
    for device in devices:
        if not _KEY_FILE.fullmatch(f"{device}.1.key") or "." in device:
            raise FoglineError(f"{device!r} is not a device id")
        ids = store.key_ids(device)
        if ids and not rotate:
            continue
        n = _number(ids[-1]) + 1 if ids else 1
        path = folder / f"{device}.{n}.key"
        _write_key(path, secrets.token_bytes(KEY_BYTES))
        written.append(path)
    return written


def _write_key(path: Path, key: bytes) -> None:
    """Create `path` with mode 0600 (never readable by others, never overwritten)."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(key)
            fh.flush()
            os.fsync(fh.fileno())
        os.link(tmp, path)  # fails rather than replace an existing key
    finally:
        tmp.unlink(missing_ok=True)


# --------------------------------------------------------------------------- telemetry


def seal_telemetry(
    tele: Telemetry, key_id: str, key: bytes, *, topic: str, seq: int, ts: float
) -> bytes:
    """Encode `tele` with its body sealed under `key` (the envelope stays in clear)."""
    plaintext = codec.encode_telemetry_body(tele)
    nonce, ct = seal(key, plaintext, src=tele.device, seq=seq, topic=topic, key_id=key_id)
    return codec.encode_sealed_telemetry(tele.device, Sealed(key_id, nonce, ct), seq=seq, ts=ts)


def open_telemetry(store: KeyStore, env: Envelope, *, topic: str) -> Telemetry:
    """Open a sealed telemetry envelope and validate its body; raises only DecodeError.

    Reasons: `unknown_key` (the key id is not one of `env.src`'s keys), `bad_tag`, then the
    usual telemetry reasons for the decrypted body.
    """
    sealed = env.body
    if not isinstance(sealed, Sealed):
        raise DecodeError("wrong_type", "telemetry body is not sealed")
    key = store.get(sealed.kid, device=env.src)
    plaintext = open_(
        key, sealed.nonce, sealed.ct, src=env.src, seq=env.seq, topic=topic, key_id=sealed.kid
    )
    return codec.decode_telemetry_body(plaintext, env.src)


# --------------------------------------------------------------------------- cost


def _pair_us(
    base: Callable[[], object], other: Callable[[], object], *, number: int, repeat: int
) -> tuple[float, float, float]:
    """Median microseconds per call of `base` and `other`, and the median of their ratios.

    The two alternate run by run, so a busy machine slows both alike and the ratio holds.
    """
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeat):
        for fn, runs in ((base, times[0]), (other, times[1])):
            start = time.perf_counter()
            for _ in range(number):
                fn()
            runs.append((time.perf_counter() - start) / number * 1e6)
    ratios = [b / a for a, b in zip(*times, strict=True)]
    return statistics.median(times[0]), statistics.median(times[1]), statistics.median(ratios)


def bench_cost(
    *, samples: int = 10, fields: int = 7, number: int = 2000, repeat: int = 7
) -> dict[str, float]:
    """Time encode+seal vs encode, open+decode vs decode per message; print and return them.

    Returns the medians in microseconds and the ratios `seal_ratio` and `open_ratio`.
    """
    rng = np.random.default_rng(0)
    tele = Telemetry(
        device="d00007", first=0, t0=1.7e9, dt=6.0,
        fields=tuple(f"f{i}" for i in range(fields)),
        values=rng.standard_normal((samples, fields)).astype("<f4"),
    )  # fmt: skip
    key_id, key = "d00007.1", secrets.token_bytes(KEY_BYTES)
    store = KeyStore(Path("."), keys={key_id: key})
    topic = "fl/v1/dev/e0/d00007/tele"
    clear = codec.encode_telemetry(tele, seq=1, ts=1.7e9)
    sealed = seal_telemetry(tele, key_id, key, topic=topic, seq=1, ts=1.7e9)

    def decode_sealed() -> Telemetry:
        return open_telemetry(store, codec.decode(sealed, expect="tele"), topic=topic)

    enc, enc_seal, seal_ratio = _pair_us(
        lambda: codec.encode_telemetry(tele, seq=1, ts=1.7e9),
        lambda: seal_telemetry(tele, key_id, key, topic=topic, seq=1, ts=1.7e9),
        number=number,
        repeat=repeat,
    )
    dec, open_dec, open_ratio = _pair_us(
        lambda: codec.decode(clear, expect="tele"), decode_sealed, number=number, repeat=repeat
    )
    out = {
        "encode_us": enc,
        "encode_seal_us": enc_seal,
        "seal_ratio": seal_ratio,
        "decode_us": dec,
        "open_decode_us": open_dec,
        "open_ratio": open_ratio,
        "bytes_clear": float(len(clear)),
        "bytes_sealed": float(len(sealed)),
    }
    print(f"AEAD cost ({ALGORITHM}), one telemetry message of {samples} x {fields} float32,")
    print(f"medians of {repeat} alternating runs of {number} (ratio: median of per-run ratios):")
    print(f"  encode        {out['encode_us']:8.2f} us   encode+seal  {out['encode_seal_us']:8.2f}"
          f" us   x{out['seal_ratio']:.2f}")  # fmt: skip
    print(f"  decode        {out['decode_us']:8.2f} us   open+decode  {out['open_decode_us']:8.2f}"
          f" us   x{out['open_ratio']:.2f}")  # fmt: skip
    print(f"  size          {int(out['bytes_clear'])} B clear, {int(out['bytes_sealed'])} B sealed")
    return out


if __name__ == "__main__":
    bench_cost()
