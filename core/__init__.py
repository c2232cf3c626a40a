"""The lowest layer: typed site config, typed results, pure planning, and the primitives
(command runner, files, secret store, logging) that every layer above uses."""
