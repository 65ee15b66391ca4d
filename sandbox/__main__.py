"""`python -m sandbox` runs the local SendGrid sandbox (the same as `python -m shared sandbox`)."""

from sandbox.server import main

raise SystemExit(main())
