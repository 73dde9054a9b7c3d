"""A job file whose own code fails while it is imported (exit 1, not a usage error)."""

raise RuntimeError("this job file is broken on purpose")
