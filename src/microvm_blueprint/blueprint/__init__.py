"""L1: the microVM jobs and the read-only query API, wired on ``runtime`` and ``tangle``."""
