"""Command-line settings of a tiny model that trains in seconds on a CPU (shared by the tests)."""

from dmgan.config import TINY_OVERRIDES, overrides_as_flags

TINY = [*overrides_as_flags(TINY_OVERRIDES), "--threads", "1", "--log-every", "1"]
