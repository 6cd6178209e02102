"""Runtime helpers shared by the services: connecting to NATS, publishing safely, running a
service loop, the embedded server. No business logic lives here."""
