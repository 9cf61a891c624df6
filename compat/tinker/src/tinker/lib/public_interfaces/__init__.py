"""tinker.lib.public_interfaces: the clients and APIFuture, as Tinker lays them out."""
from tinker.lib.public_interfaces.api_future import APIFuture
from tinker.lib.public_interfaces.rest_client import RestClient
from tinker.lib.public_interfaces.sampling_client import SamplingClient
from tinker.lib.public_interfaces.service_client import ServiceClient
from tinker.lib.public_interfaces.training_client import TrainingClient

__all__ = ["APIFuture", "RestClient", "SamplingClient", "ServiceClient", "TrainingClient"]
