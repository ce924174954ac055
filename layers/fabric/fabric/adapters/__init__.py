"""Adapters: the fabric's ports implemented on RabbitMQ, AWS services and in memory."""
