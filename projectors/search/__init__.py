"""The OpenSearch read model (search-indexer): `store` indexes events into it and makes
them searchable; `versions` builds, switches and verifies its versions (indices behind
the alias)."""
