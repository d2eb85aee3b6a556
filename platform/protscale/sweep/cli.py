"""Sub-commands of this stage (filled in as the stage lands)."""


def add_commands(sub) -> None:
    return None
