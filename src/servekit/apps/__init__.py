# Built-in handlers and applications: what `servekit echo` serves, and references for
# users writing their own.
