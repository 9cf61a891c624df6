"""gradwire: a Tinker-compatible Python SDK for the gradwire gRPC training service.

    import gradwire
    service = gradwire.ServiceClient(base_url="localhost:50051")
    tc = service.create_lora_training_client(base_model="tiny-random", rank=8)
    out = tc.forward_backward(data, "cross_entropy").result()
    tc.optim_step(gradwire.AdamParams(learning_rate=1e-3)).result()
"""
from gradwire import types
from gradwire.client import ServiceClient, TrainingClient
from gradwire.errors import (AbortedError, APIConnectionError, APIError, APIResponseValidationError,
                             APIStatusError, APITimeoutError, AuthenticationError, BadRequestError,
                             ConflictError, CustomLossError, GradwireError, InternalServerError,
                             NotFoundError, PermissionDeniedError, RateLimitError, RequestCancelledError,
                             RequestErrorCategory, RequestFailedError, TinkerError, UnprocessableEntityError,
                             UnsupportedFeatureError)
from gradwire.futures import APIFuture
from gradwire.rest_client import RestClient
from gradwire.sampling_client import SamplingClient
from gradwire.types import (AdamOptimizerConfig, AdamParams, Checkpoint, CheckpointsListResponse, CheckpointType,
                            Cursor,
                            Datum, EncodedTextChunk, ForwardBackwardOutput, GetInfoResponse,
                            GetServerCapabilitiesResponse, ImageAssetPointerChunk, ImageChunk,
                            LoadWeightsResponse, LoraConfig, LossFnType, ModelID, ModelInput, ModelInputChunk,
                            OptimizerConfig, OptimParams, OptimStepResponse, ParsedCheckpointTinkerPath,
                            PromptProvenanceSpan, SampledProvenanceSpan, SampledSequence, SampledTokens,
                            SampleResponse, SamplingParams, SaveWeightsForSamplerResponse,
                            SaveWeightsResponse, StopReason, SupportedModel, TensorData, TensorDtype, TrainingRun,
                            TrainingRunsResponse, UnloadModelResponse)

__all__ = [
    "APIConnectionError", "APIError", "APIFuture", "APIResponseValidationError", "APIStatusError",
    "APITimeoutError", "AbortedError", "AdamOptimizerConfig", "AdamParams", "AuthenticationError",
    "BadRequestError", "Checkpoint", "CheckpointType", "CheckpointsListResponse", "ConflictError", "Cursor",
    "CustomLossError", "Datum", "EncodedTextChunk", "ForwardBackwardOutput", "GetInfoResponse",
    "GetServerCapabilitiesResponse", "GradwireError", "ImageAssetPointerChunk", "ImageChunk",
    "InternalServerError", "LoadWeightsResponse", "LoraConfig", "LossFnType", "ModelID", "ModelInput",
    "ModelInputChunk", "NotFoundError", "OptimParams", "OptimStepResponse", "OptimizerConfig",
    "ParsedCheckpointTinkerPath", "PermissionDeniedError", "PromptProvenanceSpan", "RateLimitError",
    "RequestCancelledError", "RequestErrorCategory", "RequestFailedError", "RestClient", "SampleResponse",
    "SampledProvenanceSpan", "SampledSequence", "SampledTokens", "SamplingClient", "SamplingParams",
    "SaveWeightsForSamplerResponse", "SaveWeightsResponse", "ServiceClient", "StopReason", "SupportedModel",
    "TensorData", "TensorDtype", "TinkerError", "TrainingClient", "TrainingRun", "TrainingRunsResponse",
    "UnloadModelResponse", "UnprocessableEntityError", "UnsupportedFeatureError", "types",
]
