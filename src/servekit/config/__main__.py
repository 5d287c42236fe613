# python -m servekit.config: print docs/settings.md.
from servekit.config.docs import main

main()
