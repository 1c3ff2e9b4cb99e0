"""Live stream: the durable event log behind `GET /api/v1/stream` (Server-Sent Events)."""
