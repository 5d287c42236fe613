# systemd integration, the I/O half for the process: telling the service manager about
# readiness and shutdown (sd_notify), and pacing the watchdog keep-alive. Adopting the
# sockets it passed (socket activation) belongs to the listeners, in
# servekit.features.activation. Every rule about the variables and the message format lives in
# servekit.protocols.sd_daemon; this module reads os.environ, touches descriptors and
# sends datagrams.
#
# Strategy.
#   * notify() opens a fresh datagram socket per message: no shared state, safe from any
#     thread, and a manager that restarted (new socket inode) is reached next time. At a
#     watchdog ping every few seconds the three system calls cost nothing.
#   * notify() never raises because the manager is absent or refuses: readiness
#     reporting must not take a working server down. It returns False and logs at debug.
#     A malformed NOTIFY_SOCKET or message is a bug in the deployment or the caller and
#     raises at once.
#   * Watchdog does no I/O on its own schedule. The serving loop calls maybe_ping() on
#     every iteration, so the ping proves the loop is turning: a loop that is stuck stops
#     pinging and systemd restarts the service, which a timer thread would hide.
from __future__ import annotations

import logging
import math
import os
import socket
import time
from collections.abc import Callable, Mapping, MutableMapping

from servekit.protocols.sd_daemon import (
    WATCHDOG_VARIABLES,
    NotifyMessageError,
    SystemdEnvironmentError,
    encode_message,
    extend_timeout_message,
    mainpid_message,
    parse_notify_socket,
    parse_watchdog,
    ready_message,
    reloading_message,
    status_message,
    stopping_message,
    watchdog_message,
)

__all__ = [
    "Notifier",
    "NotifyMessageError",
    "SystemdEnvironmentError",
    "Watchdog",
    "notify",
    "watchdog_interval",
]

log = logging.getLogger("servekit.systemd")

# How long notify() may block when the manager's receive queue is full (it holds
# net.unix.max_dgram_qlen datagrams, which systemd raises to 512). Only an overloaded
# PID 1 gets there; waiting a second beats stalling the serving loop indefinitely, and a
# watchdog ping lost this way is sent again half an interval later.
NOTIFY_SEND_TIMEOUT = 1.0

# -- notification ------------------------------------------------------------------------


def notify(message: str, *, environ: Mapping[str, str] | None = None) -> bool:
    """Send one sd_notify(3) message; True if the datagram was sent.

    False, with a debug log line, when NOTIFY_SOCKET is unset or empty (not run by a
    service manager) or the socket is missing or refuses. Raises NotifyMessageError for a
    message the manager would drop or misread, and SystemdEnvironmentError for a
    malformed NOTIFY_SOCKET, even when the manager is absent, so that both show up in
    development. environ defaults to os.environ.
    """
    data = encode_message(message)
    address = parse_notify_socket(os.environ if environ is None else environ)
    if address is None:
        log.debug("NOTIFY_SOCKET is not set; not sending %r", message)
        return False
    return _send(address, data)


def _send(address: str, data: bytes) -> bool:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.settimeout(NOTIFY_SEND_TIMEOUT)
            sock.connect(address)
            sock.send(data)
    except OSError as exc:
        # The kernel adds our credentials (SO_PASSCRED on the manager's side), so there
        # is nothing to retry with; the caller decides whether the message matters.
        log.debug("notification %r to %s not sent: %s", data, _display(address), exc)
        return False
    return True


def _display(address: str) -> str:
    return "@" + address[1:] if address.startswith("\0") else address


def _monotonic_usec() -> int:
    # CLOCK_MONOTONIC explicitly: MONOTONIC_USEC is compared with the manager's clock,
    # and time.monotonic() does not promise which clock it reads.
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


class Notifier:
    """Sends the service manager's well-known messages to the NOTIFY_SOCKET in environ.

    NOTIFY_SOCKET is read once, at construction, so a malformed value fails early and
    unsetting it later (to keep it from children) does not silence this notifier. Every
    method returns what notify() returns: False when there is no manager to tell, and
    never raises for a missing or refusing socket. Safe to share between threads.
    """

    __slots__ = ("_address", "_monotonic_usec")

    def __init__(
        self,
        environ: Mapping[str, str] | None = None,
        *,
        monotonic_usec: Callable[[], int] = _monotonic_usec,
    ) -> None:
        self._address = parse_notify_socket(os.environ if environ is None else environ)
        self._monotonic_usec = monotonic_usec

    @property
    def enabled(self) -> bool:
        """True when there is a NOTIFY_SOCKET to send to."""
        return self._address is not None

    def send(self, message: str) -> bool:
        """Send a message built by hand (see servekit.protocols.sd_daemon.format_message)."""
        data = encode_message(message)
        if self._address is None:
            return False
        return _send(self._address, data)

    def ready(self, status: str | None = None) -> bool:
        """Start-up (or a reload) is complete; the manager starts dependent units."""
        return self.send(ready_message(status))

    def stopping(self, status: str | None = None) -> bool:
        """Shutdown has begun."""
        return self.send(stopping_message(status))

    def reloading(self, status: str | None = None) -> bool:
        """A reload has begun; send ready() when it is complete. Carries MONOTONIC_USEC,
        which Type=notify-reload services must send (systemd 253 and later)."""
        return self.send(reloading_message(self._monotonic_usec(), status))

    def status(self, text: str) -> bool:
        """Free text for `systemctl status`; line breaks are escaped, not sent."""
        return self.send(status_message(text))

    def watchdog(self) -> bool:
        """One keep-alive ping. Prefer Watchdog, which paces them from the serving loop."""
        return self.send(watchdog_message())

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for seconds more before the start, stop or runtime timeout fires."""
        return self.send(extend_timeout_message(seconds))

    def mainpid(self, pid: int) -> bool:
        """Tell the manager that pid is now the service's main process."""
        return self.send(mainpid_message(pid))


# -- watchdog ------------------------------------------------------------------------------


def watchdog_interval(
    *,
    unset_environment: bool = False,
    environ: MutableMapping[str, str] | None = None,
) -> float | None:
    """The manager's watchdog timeout in seconds (WatchdogSec=), or None if it has none.

    As sd_watchdog_enabled(3): None when WATCHDOG_PID names another process. With
    unset_environment, WATCHDOG_USEC and WATCHDOG_PID are removed from environ (default
    os.environ) whether or not this succeeds, so children do not think they are watched.
    """
    env = os.environ if environ is None else environ
    try:
        return parse_watchdog(env, os.getpid())
    finally:
        if unset_environment:
            for variable in WATCHDOG_VARIABLES:
                env.pop(variable, None)


class Watchdog:
    """Decides when the serving loop sends WATCHDOG=1: at half the manager's interval.

    Call maybe_ping(time.monotonic()) on every iteration of the serving loop (a server's
    service_actions() hook), and keep the loop's poll interval at most ``period`` so that
    an idle loop still wakes in time. The first call pings at once: the manager's timer
    has been running since exec, for an unknown time. After a stall the next ping is due
    ``period`` after the late one, never in a burst. Not thread-safe: one loop owns it.
    """

    __slots__ = ("_next_due", "_ping", "interval", "period")

    def __init__(self, interval: float, ping: Callable[[], object]) -> None:
        """interval is the manager's timeout in seconds; ping sends one WATCHDOG=1."""
        if not (math.isfinite(interval) and interval > 0):
            raise ValueError(
                f"watchdog interval must be a positive number of seconds: {interval!r}"
            )
        self.interval = interval
        # sd_watchdog_enabled(3): "send a keep-alive notification message to the service
        # manager every half of the time returned here".
        self.period = interval / 2
        self._next_due: float | None = None
        self._ping = ping

    @classmethod
    def from_environment(
        cls,
        environ: MutableMapping[str, str] | None = None,
        *,
        unset_environment: bool = False,
        notifier: Notifier | None = None,
    ) -> Watchdog | None:
        """A Watchdog for WATCHDOG_USEC, pinging through notifier (default: a Notifier for
        the same environ); None when the manager set no watchdog for this process."""
        interval = watchdog_interval(unset_environment=unset_environment, environ=environ)
        if interval is None:
            return None
        if notifier is None:
            notifier = Notifier(environ)
        return cls(interval, notifier.watchdog)

    def due(self, now: float) -> bool:
        """True if a ping is due at monotonic time now."""
        return self._next_due is None or now >= self._next_due

    def time_until_due(self, now: float) -> float:
        """Seconds from now until the next ping is due; 0.0 if it is due already."""
        if self._next_due is None:
            return 0.0
        return max(0.0, self._next_due - now)

    def maybe_ping(self, now: float) -> bool:
        """Ping if one is due at monotonic time now; True if it pinged."""
        if not self.due(now):
            return False
        self._next_due = now + self.period
        self._ping()
        return True
