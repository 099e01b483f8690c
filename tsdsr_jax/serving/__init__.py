"""Serving: the web page and HTTP API (``tsdsr-serve``), and the scheduler that batches
concurrent requests onto the device."""
