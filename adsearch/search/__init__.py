"""The joint search: space (YAML -> define-by-run), objective (speaker-safe CV), studies and workers."""
