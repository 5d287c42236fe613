# Process management: the pre-fork supervisor, the mix-in that runs a server under it,
# and systemd integration (socket activation, notify, watchdog).
