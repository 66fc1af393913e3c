"""The coordinator's side: the rules of rounds, leases and contributions (`rules`, no HTTP),
robust aggregation (`aggregation`, pure), contribution files (`payloads`), the owner's
controls (`owner`), what it publishes (`reports`, `metrics`, `dashboard`), and the HTTP
transport (`server`, with `uploads` streaming contributions to disk). Imports `run`, `wire`
and `errors`; never the volunteer's side."""
