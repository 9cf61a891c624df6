"""gradwire: a Tinker-compatible Python SDK for the gradwire gRPC training service.

    import gradwire
    service = gradwire.ServiceClient(base_url="localhost:50051")
    tc = service.create_lora_training_client(base_model="tiny-random", rank=8)
    out = tc.forward_backward(data, "cross_entropy").result()
    tc.optim_step(gradwire.AdamParams(learning_rate=1e-3)).result()
"""
from gradwire import types
from gradwire.client import ServiceClient, TrainingClient
from gradwire.errors import (AbortedError, APIConnectionError, APIError, APIStatusError,
                             APITimeoutError, AuthenticationError, BadRequestError, ConflictError,
                             CustomLossError, GradwireError, InternalServerError, NotFoundError,
                             PermissionDeniedError, RateLimitError, RequestCancelledError)
from gradwire.futures import APIFuture
from gradwire.rest_client import RestClient
from gradwire.sampling_client import SamplingClient
from gradwire.types import (AdamParams, Checkpoint, Datum, EncodedTextChunk, ForwardBackwardOutput,
                            GetInfoResponse, GetServerCapabilitiesResponse, LoadWeightsResponse,
                            LoraConfig, ModelInput, OptimStepResponse, SampledSequence, SampledTokens,
                            SampleResponse, SamplingParams, SaveWeightsForSamplerResponse,
                            SaveWeightsResponse, SupportedModel, TensorData, TrainingRun,
                            UnloadModelResponse)

__all__ = [
    "APIConnectionError", "APIError", "APIFuture", "APIStatusError", "APITimeoutError",
    "AbortedError", "AdamParams", "AuthenticationError", "BadRequestError", "Checkpoint",
    "ConflictError", "CustomLossError", "Datum", "EncodedTextChunk", "ForwardBackwardOutput",
    "GetInfoResponse", "GetServerCapabilitiesResponse", "GradwireError", "InternalServerError",
    "LoadWeightsResponse", "LoraConfig", "ModelInput", "NotFoundError", "OptimStepResponse",
    "PermissionDeniedError", "RateLimitError", "RequestCancelledError", "RestClient",
    "SampleResponse", "SampledSequence", "SampledTokens", "SamplingClient", "SamplingParams",
    "SaveWeightsForSamplerResponse", "SaveWeightsResponse", "ServiceClient", "SupportedModel",
    "TensorData", "TrainingClient", "TrainingRun", "UnloadModelResponse", "types",
]
