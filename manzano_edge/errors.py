"""User-facing errors: one line that names the problem and the fix, exit code 2."""


class UserError(Exception):
    """Bad input from the user (file, image, prompt, checkpoint, flag). The CLI prints it on
    one line and exits with status 2; library callers can catch it."""

    exit_code = 2
