"""tinker.lib.public_interfaces.service_client: gradwire's ServiceClient, configured
from Tinker's environment variables."""
from __future__ import annotations

import os
from typing import Any

import gradwire

__all__ = ["ServiceClient"]


class ServiceClient(gradwire.ServiceClient):
    """gradwire.ServiceClient whose base_url and api_key default to $TINKER_BASE_URL and
    $TINKER_API_KEY (then to gradwire's own $GRADWIRE_BASE_URL / $GRADWIRE_API_KEY), so
    code written for Tinker reaches a gradwire server by setting TINKER_BASE_URL.
    $TINKER_API_KEY is sent to that server as a bearer token: point it at servers you trust."""

    def __init__(self, user_metadata: dict[str, str] | None = None, project_id: str | None = None, *,
                 display_name: str | None = None, base_url: str | None = None, api_key: str | None = None,
                 **kwargs: Any):
        super().__init__(user_metadata, project_id, display_name=display_name,
                         base_url=base_url or os.environ.get("TINKER_BASE_URL"),
                         api_key=api_key or os.environ.get("TINKER_API_KEY"), **kwargs)
