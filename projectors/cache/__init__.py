"""The Redis read model (cache-projector): `layout` is its key layout and Lua, shared by
the projector, the query API, operations and tests; `store` applies events to it;
`versions` builds, switches, verifies and repairs its versions (key namespaces)."""
