"""The networks of the reference: MMAudio's transformer and its flow objective, the encoders and
decoders around it, and the metric networks. Imports nothing from the rest of the project."""
