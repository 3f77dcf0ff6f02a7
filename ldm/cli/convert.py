"""`ldm convert`: placeholder registration, replaced by the module's real implementation."""


def register(sub) -> None:
    sub.add_parser("convert", help="(not yet available)")
