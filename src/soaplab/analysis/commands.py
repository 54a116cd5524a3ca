"""CLI subcommands of soaplab.analysis (being written)."""


def register(sub) -> None:
    pass
