"""gradwire's gRPC training server. Entry point: `gradwire-server` (gradwire_server.cli)."""
