"""What operators do, as functions (no CLI, no HTTP): rebuild and replay read models,
verify and repair them, triage dead letters, measure lag, and the audit trail of all of
it. `ringiflow`'s CLI parses, calls these and prints; the console calls them too."""
