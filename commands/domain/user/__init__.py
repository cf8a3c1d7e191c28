"""The user aggregate: a directory entry (display name, email)."""
