"""CLI subcommands of soaplab.experiments (being written)."""


def register(sub) -> None:
    pass
