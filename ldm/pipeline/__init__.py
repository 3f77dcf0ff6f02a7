"""The pipeline: a loaded model (``Pipeline``), its set-up (``PipelineSetup``) and the stages of a call."""

from ldm.pipeline.pipeline import GenerationOutput, Pipeline
from ldm.pipeline.setup import PipelineSetup
from ldm.pipeline.stages import NonFiniteOutputError
from ldm.residency import ReleasedWeightsError

__all__ = ["GenerationOutput", "NonFiniteOutputError", "Pipeline", "PipelineSetup", "ReleasedWeightsError"]
