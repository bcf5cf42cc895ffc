"""The one base class of the errors a user can fix (bad params, data, sources or checkpoints).

A stage that fails with a UserError prints its message alone and exits with code 2, which the
flow never retries; any other exception is a bug and keeps its traceback. Cheap to import, so a
stage catches it before importing its heavy modules."""


class UserError(Exception):
    """Something in the params, the data or the files on disk needs the user's attention; the
    message says what and how to fix it."""
