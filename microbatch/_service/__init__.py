"""The ``Batcher`` and its parts; the public names are re-exported by :mod:`microbatch.service`."""
