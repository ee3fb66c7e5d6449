"""The broker: stores partition replicas, leads some (produce, fetch) and follows others."""
