"""The fleet: box actions and lists sent through RabbitMQ to one worker per host (docs/fleet.md)."""
