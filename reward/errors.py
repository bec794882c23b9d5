"""The one exception `reward` raises for what a user gave it."""


class RewardError(ValueError):
    """A reward spec, reward/classifier directory, reward function or its output that cannot be used
    as given. The message names the spec or file and what was expected (the CLI prints it and exits 2)."""
