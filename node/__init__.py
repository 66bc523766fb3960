"""The Achilles node: connects to the server and runs chunks in a pool of worker processes."""
