"""``python -m microbatch``: the same as the ``microbatch`` command."""

from __future__ import annotations

from .cli import main

raise SystemExit(main())
