"""`ldm txt2img`: placeholder registration, replaced by the module's real implementation."""


def register(sub) -> None:
    sub.add_parser("txt2img", help="(not yet available)")
