"""What the running processes share and no ABI knows of: the event loop (`loop`), stepping a
coroutine without a task (`drive`), busy polling (`busypoll`), the metrics convention
(`metrics`), TLS credentials (`tls`) and network addresses (`net`)."""
