"""One exception type for problems the user can fix; the CLI prints it as a single message."""


class LtsftError(Exception):
    """Bad input or configuration. The message names the file/parameter and says how to fix it."""
