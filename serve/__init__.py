"""The translation service: REST API, dynamic batching and a web page around one model."""
