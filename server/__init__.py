"""The Achilles server: authenticates peers, schedules chunks over nodes, streams results back."""
