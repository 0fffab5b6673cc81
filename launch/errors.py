"""The one exception type for usage mistakes: bad command lines, configs, paths and launch environments.

Entry points (`launch.pretrain`, `launch.compare`) catch it and print a single ``error: ...`` line to stderr
with a non-zero exit status, instead of a traceback. Anything else is a bug and keeps its traceback.
"""


class LaunchError(ValueError):
    """A mistake the user can fix (the message names the key, path or value at fault)."""
