"""`ldm finetune`: placeholder registration, replaced by the module's real implementation."""


def register(sub) -> None:
    sub.add_parser("finetune", help="(not yet available)")
