"""CLI subcommands: each module exposes ``register(subparsers)`` and owns one group of commands."""
