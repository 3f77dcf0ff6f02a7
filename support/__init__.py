"""Code that the tests, benchmarks and scripts share and that is not part of the engine (``ldm``).

- ``shapes``: the captioned shapes dataset that the default model (weights/ldm-shapes) is trained on;
- ``shapes_score``: the deterministic pixel scorer that reads such an image back into its caption;
- ``analytic``: data distributions with an exact noise predictor, the oracle that scheduler tests and
  benchmarks/scheduler_accuracy.py run the samplers against.

It lives in the checkout, beside its users, and is not installed with ldm: ``python -m pytest`` from
the repository root finds it on the path; the scripts and benchmarks that use it put the repository
root on their path first.
"""
