# The `servekit` command. The only package that reads argv and the environment and
# turns exceptions into exit codes.
from servekit.cli.main import main as main

__all__ = ["main"]
