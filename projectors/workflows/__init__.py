"""The PostgreSQL read model (workflow-projector): `store` applies events to it,
`versions` builds, switches, verifies and repairs its versions (`read_model_vN`
schemas behind the `read_model` views)."""
