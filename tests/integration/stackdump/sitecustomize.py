"""Loaded by every server the integration tests start (ServerProcess puts this
directory first on PYTHONPATH): SIGUSR2 makes the process, and each worker it forks,
write every thread's stack to stderr. ServerProcess sends it when a test fails with the
server still running, so that a hang shows where each process waits."""

import faulthandler
import signal
import sys

faulthandler.register(signal.SIGUSR2, file=sys.stderr, all_threads=True)
