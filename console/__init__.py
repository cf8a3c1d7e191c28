"""The operator console (`ringiflow run console`, port 8004): lag, dead letters,
rebuilds and an event browser on one page. It calls `operations`, never the CLI."""
