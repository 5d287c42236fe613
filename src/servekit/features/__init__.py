# The production layer: one concern per module, each a mix-in or option that composes
# with the compatibility core. Imports servekit.core, servekit.protocols, servekit.knobs
# and servekit.errors; never servekit.process, servekit.config or servekit.cli.
