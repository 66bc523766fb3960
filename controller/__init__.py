"""The controller library: the Pool API (map / imap / imap_unordered) over an Achilles cluster."""
