"""ldm: a Stable-Diffusion-style latent text-to-image engine.

``ldm.Pipeline`` is imported lazily so that ``import ldm.schedulers`` and the
command line start without loading the whole stack.
"""

__version__ = "0.1.0"
__all__ = ["Pipeline"]


def __getattr__(name: str):
    if name == "Pipeline":
        from ldm.pipeline import Pipeline

        return Pipeline
    raise AttributeError(f"module 'ldm' has no attribute {name!r}")
