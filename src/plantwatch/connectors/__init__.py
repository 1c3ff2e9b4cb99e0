"""Connectors: how telemetry reaches the ingest pipeline from devices.

- `mqtt`: topic handling, device checks and dead letters shared by every MQTT path,
  and the ingest subscriber for an external broker (shared subscription, PUBACK only
  after the pipeline committed).
- `mqtt_broker`: the embedded broker (amqtt) that `plantwatch up` starts; devices log
  in with their keys and their messages are ingested inside the broker.
- `mqtt_role`: the `ingest` role that runs one or the other.
- `mqtt_load`: a fast publisher for load tests and benchmarks.
"""
