"""The ARMT memory service (HTTP layer and core come with the service issue); for now the `armt` CLI."""
