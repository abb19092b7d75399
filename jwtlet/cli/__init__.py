"""The ``jwtlet`` command and its subcommands."""
