"""The `tinker` package namespace backed by gradwire (distribution gradwire-tinker).

Code and libraries written for Tinker (tinker-cookbook) import `tinker` and run on a
self-hosted gradwire server: set TINKER_BASE_URL=host:port (see gradwire's README).
Names, parameters and return types follow Tinker 0.38; features of the hosted service
only (billing, projects, sessions, publishing, ...) raise tinker.UnsupportedFeatureError.
"""
from __future__ import annotations

import importlib.metadata
import warnings

from gradwire.errors import (APIConnectionError, APIError, APIResponseValidationError, APIStatusError,
                             APITimeoutError, AuthenticationError, BadRequestError, ConflictError,
                             InternalServerError, NotFoundError, PermissionDeniedError, RateLimitError,
                             RequestCancelledError, RequestErrorCategory, RequestFailedError, TinkerError,
                             UnprocessableEntityError, UnsupportedFeatureError)
from gradwire.types import (AdamOptimizerConfig, AdamParams, Checkpoint, CheckpointsListResponse, CheckpointType,
                            Cursor, Datum, EncodedTextChunk, ForwardBackwardOutput, GetInfoResponse,
                            GetServerCapabilitiesResponse, ImageAssetPointerChunk, ImageChunk,
                            LoadWeightsResponse, LoraConfig, LossFnType, ModelID, ModelInput, ModelInputChunk,
                            OptimizerConfig, OptimParams, OptimStepResponse, ParsedCheckpointTinkerPath,
                            PromptProvenanceSpan, SampledProvenanceSpan, SampledSequence, SampleResponse,
                            SamplingParams, SaveWeightsForSamplerResponse, SaveWeightsResponse, StopReason,
                            SupportedModel, TensorData, TensorDtype, TrainingRun, TrainingRunsResponse,
                            UnloadModelResponse)
from tinker import lib, types
from tinker.lib.public_interfaces import (APIFuture, RestClient, SamplingClient, ServiceClient,
                                          TrainingClient)

try:
    __version__ = importlib.metadata.version("gradwire-tinker")
except importlib.metadata.PackageNotFoundError:  # used from a source tree
    __version__ = "0+gradwire"

try:  # the official SDK installed beside this one: their files overwrite each other
    importlib.metadata.distribution("tinker")
    warnings.warn("both the official `tinker` distribution and gradwire-tinker are installed and "
                  "share the `tinker` package; uninstall one of them", stacklevel=2)
except importlib.metadata.PackageNotFoundError:
    pass

__all__ = [
    "APIConnectionError", "APIError", "APIFuture", "APIResponseValidationError", "APIStatusError",
    "APITimeoutError", "AdamOptimizerConfig", "AdamParams", "AuthenticationError", "BadRequestError",
    "Checkpoint", "CheckpointType", "CheckpointsListResponse", "ConflictError", "Cursor", "Datum",
    "EncodedTextChunk", "ForwardBackwardOutput", "GetInfoResponse", "GetServerCapabilitiesResponse",
    "ImageAssetPointerChunk", "ImageChunk", "InternalServerError", "LoadWeightsResponse", "LoraConfig",
    "LossFnType", "ModelID", "ModelInput", "ModelInputChunk", "NotFoundError", "OptimParams",
    "OptimStepResponse", "OptimizerConfig", "ParsedCheckpointTinkerPath", "PermissionDeniedError",
    "PromptProvenanceSpan", "RateLimitError", "RequestCancelledError", "RequestErrorCategory",
    "RequestFailedError", "RestClient", "SampleResponse", "SampledProvenanceSpan", "SampledSequence",
    "SamplingClient", "SamplingParams", "SaveWeightsForSamplerResponse", "SaveWeightsResponse", "ServiceClient",
    "StopReason", "SupportedModel", "TensorData", "TensorDtype", "TinkerError", "TrainingClient", "TrainingRun",
    "TrainingRunsResponse", "UnloadModelResponse", "UnprocessableEntityError", "UnsupportedFeatureError", "lib",
    "types",
]
